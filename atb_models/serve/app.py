"""The HTTP side: a FastAPI app whose handlers check a request, preprocess it off the event loop, hand it to the
engine thread (`engine.EngineLoop`) and answer from the events it sends back, whole or as server-sent events.

A request's handler owns its request until the engine says it finished: a client that goes away (a dropped
stream, a closed connection while waiting) gets its request aborted, which frees its KV blocks at the next step.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hmac
import itertools
import json
import logging
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import asynccontextmanager
from typing import Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from atb_models.engine.sampling_params import SEED_LIMIT
from atb_models.errors import UserError
from atb_models.multimodal.media import check_media_counts
from atb_models.serve.completions import CompletionFormat, parse_completion_request
from atb_models.serve.engine import EngineLoop, NewRequest
from atb_models.serve.media import MediaResolver
from atb_models.serve.metrics import ServerMetrics
from atb_models.serve.answers import ChatFormat, ChoiceProgress
from atb_models.serve.fields import ApiError, bad_request
from atb_models.serve.protocol import (MediaPart, parse_chat_request, parse_detokenize_request,
                                      parse_tokenize_request)
from atb_models.serve.tools import ToolChatFormat

logger = logging.getLogger("atb_models.serve")

RETRY_AFTER_S = 1
CLIENT_CLOSED_REQUEST = 499  # nginx's status for a client that left; nobody reads it


@dataclasses.dataclass(frozen=True)
class ServerConfig:
    model_name: str
    api_key: Optional[str]
    allowed_local_media_path: Optional[str]
    max_queue: int


class EngineGone(Exception):
    """The engine stopped (a shutdown or a failure) before the request finished."""


class RequestHandle:
    """One request's events from the engine thread, delivered on the event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self._loop = loop
        self._events: asyncio.Queue = asyncio.Queue()

    def put(self, event) -> None:  # called from the engine thread
        self._loop.call_soon_threadsafe(self._events.put_nowait, event)

    async def accepted(self) -> None:
        event = await self._events.get()
        if event.kind == "rejected":
            raise bad_request(event.message)
        if event.kind == "failed":
            raise ApiError(503, event.message, "server_error", "engine_unavailable")

    async def outputs(self):
        """The request's outputs, step by step, to the finished one."""
        while True:
            event = await self._events.get()
            if event.kind == "failed":
                raise EngineGone(event.message)
            yield event.output
            if event.output.finished:
                return


class ApiService:
    """The endpoints' work behind the routes (create_app): the API key and readiness checks, a request's prompts
    preprocessed off the event loop, its choices handed to the engine and answered (chat and text completions alike,
    through their answer formats), and vLLM's tokenize / detokenize."""

    def __init__(self, config: ServerConfig, engine: EngineLoop, metrics: ServerMetrics):
        self.config, self.engine, self.metrics = config, engine, metrics
        self.media = MediaResolver(config.allowed_local_media_path)
        self._ids = itertools.count()
        # One thread: the tokenizer is not meant for concurrent callers, and the engine needs the cores.
        self._preprocessing = ThreadPoolExecutor(1, thread_name_prefix="atb-preprocess")

    def check_key(self, request: Request) -> None:
        if self.config.api_key is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        # (an authentication scheme's name is case-insensitive: RFC 9110, 11.1)
        if scheme.lower() != "bearer" or not hmac.compare_digest(given.strip().encode(),
                                                                 self.config.api_key.encode()):
            raise ApiError(401, "a valid API key is required: send the header Authorization: Bearer <key>",
                           "authentication_error", "invalid_api_key")

    def check_ready(self) -> None:
        if not self.engine.ready.is_set():
            raise ApiError(503, "the model is loading; try again shortly", "server_error", "model_loading",
                           {"Retry-After": str(RETRY_AFTER_S)})

    async def chat(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self.check_key(request)
        self.check_ready()
        chat = parse_chat_request(await _json_body(request))
        if chat.tools is not None:
            chat.tools.check_template(self.engine.llm.preprocessor.takes_tools)
        self._check_media_options(chat.media_options)
        return await self._serve(request, chat, arrival,
                                 [lambda: self._prepare(chat.messages, chat.continue_final_message, chat.tools,
                                                        chat.media_options)],
                                 lambda prompts: self._chat_format(chat))

    def _check_media_options(self, options: dict) -> None:
        """mm_processor_kwargs' values, checked as an item's own keys are (against this server's bounds: a floor
        above its --max_pixels, say), in a 400 naming the field, whether or not the request holds media."""
        if not options:
            return
        try:
            self.engine.llm.preprocessor.check_request_options(options, "mm_processor_kwargs: ")
        except UserError as e:
            raise bad_request(str(e)) from None

    def _chat_format(self, chat) -> ChatFormat:
        model, token_bytes = self.config.model_name, self.engine.llm.token_bytes
        if chat.tools is None:
            return ChatFormat(chat, model, token_bytes)
        return ToolChatFormat(chat, model, token_bytes, chat.tools)

    async def completions(self, request: Request) -> Response:
        arrival = time.perf_counter()
        self.check_key(request)
        self.check_ready()
        completion = parse_completion_request(await _json_body(request), self.engine.llm.max_output_length)
        several = len(completion.prompts) > 1
        preparations = [functools.partial(self._prepare_plain, prompt, f"prompt {i}: " if several else "")
                        for i, prompt in enumerate(completion.prompts)]
        return await self._serve(request, completion, arrival, preparations, lambda prompts: CompletionFormat(
            completion, prompts, self.config.model_name, self.engine.llm.token_bytes))

    async def tokenize(self, request: Request) -> dict:
        """vLLM's /tokenize: a prompt's token ids as /v1/completions takes it, or messages' as the chat API does
        (media preprocessed, their tokens counted)."""
        self.check_key(request)
        self.check_ready()
        model, kind, value, tools, media_options = parse_tokenize_request(await _json_body(request))
        self._check_model(model)
        self._check_media_options(media_options)
        prepare = (functools.partial(self._prepare_plain, value, "") if kind == "prompt"
                   else functools.partial(self._prepare, value, False, tools, media_options))
        prompt = await asyncio.get_running_loop().run_in_executor(self._preprocessing, prepare)
        return {"count": len(prompt.token_ids), "max_model_len": self.engine.llm.max_model_len,
                "tokens": prompt.token_ids}

    async def detokenize(self, request: Request) -> dict:
        self.check_key(request)
        self.check_ready()
        model, tokens = parse_detokenize_request(await _json_body(request))
        self._check_model(model)
        # No sequence of this server holds more (vLLM's bound too); millions of ids would hold the one
        # preprocessing thread, which every request's preprocessing waits for, for seconds.
        max_model_len = self.engine.llm.max_model_len
        if len(tokens) > max_model_len:
            raise bad_request(f"tokens holds {len(tokens)} ids, more than max_model_len {max_model_len} "
                              "(--max_input_length + --max_output_length)")
        vocab_size = self.engine.llm.model_config.hf_config.vocab_size
        beyond = [t for t in tokens if not 0 <= t < vocab_size]
        if beyond:
            raise bad_request(f"token id {beyond[0]} lies outside the vocabulary (0..{vocab_size - 1})")
        text = await asyncio.get_running_loop().run_in_executor(self._preprocessing, self.engine.llm.tokenizer.decode,
                                                                tokens)
        return {"prompt": text}

    def _check_model(self, model) -> None:
        if model is not None and model != self.config.model_name:
            raise ApiError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.config.model_name!r}", "invalid_request_error", "model_not_found")

    async def _serve(self, request: Request, parsed, arrival: float, preparations: list, answer_format) -> Response:
        """A checked request (parsed: a ChatRequest or a CompletionRequest) answered: its prompts made by
        `preparations` (callables, run in the preprocessing thread), n choices of each taken by the engine, the
        answer's bodies made by `answer_format(prompts)`, sent whole or streamed."""
        self._check_model(parsed.model)
        room = self.engine.llm.scheduler.max_batch_size + self.config.max_queue
        num_choices = _engine_requests(parsed, preparations)
        if num_choices > room:  # a 503's "try again" could never come true
            asked = f"n {parsed.n}" if len(preparations) == 1 else f"{len(preparations)} prompts of n {parsed.n}"
            raise bad_request(f"{asked} ({num_choices} requests) are more than this server takes at once ({room} "
                              "requests: the batch and --max_queue): ask for fewer")
        if self.engine.queued(arriving=num_choices) > self.config.max_queue:  # (each choice is a request)
            raise ApiError(503, f"the waiting queue is full ({self.config.max_queue} requests, --max_queue); try "
                                "again shortly", "server_error", "queue_full", {"Retry-After": str(RETRY_AFTER_S)})
        prompts, choices = await self._admit(parsed, preparations)
        answer = Answer(self, answer_format(prompts), parsed, choices, arrival)
        if parsed.stream:
            return StreamingResponse(answer.events(), media_type="text/event-stream")
        return await answer.whole(request)

    async def _admit(self, parsed, preparations: list) -> tuple[list, list]:
        """The request's prompts, preprocessed once each, and taken by the engine as one engine request per choice
        (their checks passed): (prompts, [(request_id, RequestHandle)] in choice order). Choice i of a prompt
        in a seeded request draws with seed + i."""
        loop = asyncio.get_running_loop()
        num_choices = _engine_requests(parsed, preparations)
        self.engine.preparing += num_choices  # until the engine's queue counts them (an idle engine waits)
        choices = []
        try:
            try:
                prompts, choice_params = await loop.run_in_executor(self._preprocessing, self._prepare_all, parsed,
                                                                     preparations)
                # Every choice is submitted before any acceptance is awaited, and counted as preparing until then
                # (an idle engine holds its first step for them): one step takes them all, prefilled together, not
                # one choice a step with each later prefill pausing the decodes of the earlier ones.
                for prompt in prompts:
                    # (a beam search's n answers are one engine request's)
                    for params in choice_params if parsed.beams is None else [parsed.beams]:
                        request_id, handle = next(self._ids), RequestHandle(loop)
                        choices.append((request_id, handle))
                        # (one prompt for all: LLM.add_request keeps a copy of its own)
                        self.engine.submit(NewRequest(request_id, prompt, params), handle.put)
            finally:
                self.engine.preparing -= num_choices
            for number, (_, handle) in enumerate(choices):
                try:
                    await handle.accepted()
                except ApiError as e:  # the engine's refusal (too long a prompt): which one, where there are several
                    if e.status == 400 and len(preparations) > 1:
                        e.message = f"prompt {number // parsed.n}: {e.message}"
                    raise
        except BaseException:
            for request_id, _ in choices:  # a client gone meanwhile, or a refusal: the others go too (no-op if gone)
                self.engine.abort(request_id)
            raise
        self.metrics.prompt_tokens.inc(sum(len(prompt.token_ids) for prompt in prompts) * (num_choices // len(prompts)))
        return prompts, choices

    def _prepare_all(self, parsed, preparations: list) -> tuple[list, list]:
        """The request's prompts and each of its n choices' SamplingParams (choice i of a seeded request draws with
        seed + i), made in the preprocessing thread, not the event loop's (a copy checks its fields again: long
        token-id lists take tens of milliseconds); and its structured output compiled here first: a constraint
        that cannot compile is a 400 before the engine sees the request, and the engine's own compile (every
        choice's, on its thread, while the others wait) finds it compiled."""
        constraint = parsed.params.structured_output
        if constraint is not None:
            try:
                self.engine.llm.matchers.matcher(constraint)
            except UserError as e:
                raise bad_request(str(e)) from None
        params, seed = parsed.params, parsed.params.seed
        choice_params = [params if index == 0 or seed is None else
                         dataclasses.replace(params, seed=(seed + index) % SEED_LIMIT) for index in range(parsed.n)]
        return [make() for make in preparations], choice_params

    def _prepare_plain(self, prompt, where: str):
        """A completion's prompt (in the preprocessing thread); a bad one is a 400 naming it where there are
        several."""
        try:
            return self.engine.llm.preprocessor.plain(prompt)
        except UserError as e:
            raise bad_request(where + str(e)) from None

    def _prepare(self, messages: list, continue_final_message: bool = False, tools=None,
                 media_options: Optional[dict] = None):
        """The request's ProcessedPrompt (in the preprocessing thread), its ToolRequest's tools given to the chat
        template and each medium its kind's `media_options` (mm_processor_kwargs): media written to a folder of
        its own, removed once preprocessed, whatever happened; a bad medium is a 400 naming it by its part, not its
        path. A request over --limit_mm_per_prompt is refused before any of its media is written."""
        try:
            check_media_counts([part.kind for message in messages for part in message.items
                                if isinstance(part, MediaPart)], self.engine.llm.preprocessor.limit_mm_per_prompt)
        except UserError as e:
            raise bad_request(str(e)) from None
        with tempfile.TemporaryDirectory(prefix="atb_models_serve_") as folder:
            items = self.media.messages(messages, folder, media_options)
            try:
                return self.engine.llm.preprocessor(items, continue_final_message,
                                                    None if tools is None else list(tools.tools))
            except UserError as e:
                raise bad_request(str(e).replace(folder + os.sep, "")) from None


class Answer:
    """One accepted request's answer: its choices' outputs turned into a body or a stream, its metrics observed,
    and an abort sent for each unfinished choice when its client leaves before the end."""

    def __init__(self, service: ApiService, answer_format, parsed, choices: list, arrival: float):
        self.service, self.format, self.parsed, self.choices, self.arrival = (service, answer_format, parsed, choices,
                                                                              arrival)
        self.completion_id = f"{answer_format.id_prefix}-{choices[0][0]}-{int(arrival * 1e6) % 10**9}"
        self.finished: set = set()  # the indexes of the choices that ended

    async def outputs(self, index: int):
        """Choice `index`'s outputs from the engine, timed for the metrics as they come."""
        metrics, first = self.service.metrics, None
        async for output in self.choices[index][1].outputs():
            now = time.perf_counter()
            if first is None:
                first = now
                metrics.time_to_first_token.observe(now - self.arrival)
            if output.finished:
                self.finished.add(index)
                # (a beam search's answers come whole: no time between its tokens to observe)
                if len(output.token_ids) > 1 and self.parsed.beams is None:
                    metrics.time_per_output_token.observe((now - first) / (len(output.token_ids) - 1))
            yield output

    def _abort_unfinished(self) -> None:
        for index, (request_id, _) in enumerate(self.choices):
            if index not in self.finished:
                self.service.engine.abort(request_id)

    async def whole(self, request: Request) -> Response:
        collecting = asyncio.ensure_future(asyncio.gather(*(self._last_output(i) for i in range(len(self.choices)))))
        leaving = asyncio.ensure_future(_disconnected(request))
        try:
            await asyncio.wait({collecting, leaving}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            leaving.cancel()
            if not collecting.done():
                collecting.cancel()
                # A cancelled gather ends holding a CancelledError as its exception (not as cancelled): unread, asyncio
                # logs it with a traceback ("exception was never retrieved") for every client that left.
                collecting.add_done_callback(lambda future: future.cancelled() or future.exception())
                self._abort_unfinished()
        if not collecting.done() or collecting.cancelled():
            return Response(status_code=CLIENT_CLOSED_REQUEST)
        try:
            outputs = collecting.result()
        except EngineGone as e:
            raise ApiError(503, str(e), "server_error", "engine_unavailable") from None
        outputs = [piece for index, output in enumerate(outputs) for _, piece in self._choices_of(index, output)]
        return JSONResponse(self.format.whole(self.completion_id, outputs))

    def _choices_of(self, index: int, output) -> list:
        """(choice index, output) of engine request `index`'s output: the output, or a beam search's answers, its
        prompt's n choices (a search's output comes once, whole, when it ends)."""
        if self.parsed.beams is None:
            return [(index, output)]
        return list(enumerate(output.choices(), start=index * self.parsed.n))

    async def _last_output(self, index: int):
        output = None
        async for output in self.outputs(index):
            pass
        return output

    async def _merged(self):
        """(index, output) of every choice as they come, interleaved; an EngineGone of any choice is raised."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(index: int) -> None:
            try:
                async for output in self.outputs(index):
                    queue.put_nowait((index, output))
            except EngineGone as e:
                queue.put_nowait((index, e))
            queue.put_nowait((index, None))

        pumps = [asyncio.ensure_future(pump(i)) for i in range(len(self.choices))]
        try:
            running = len(pumps)
            while running:
                index, item = await queue.get()
                if isinstance(item, EngineGone):
                    raise item
                if item is None:
                    running -= 1
                else:
                    yield index, item
        finally:
            for task in pumps:
                task.cancel()

    async def events(self):
        """Server-sent events: the format's opening chunks (a chat's roles), then each choice's chunks as the
        engine's text grows, to its finish reason (choices interleaved as their tokens come), usage when asked,
        [DONE]. Closed early (the client left), it aborts the unfinished choices."""
        try:
            num_choices = len(self.choices) * (1 if self.parsed.beams is None else self.parsed.n)
            for body in self.format.opening(self.completion_id, num_choices):
                yield _sse(body)
            progress, last = [ChoiceProgress() for _ in range(num_choices)], [None] * num_choices
            async for index, output in self._merged():
                for choice, piece in self._choices_of(index, output):
                    last[choice] = piece
                    for body in self.format.step(self.completion_id, choice, piece, progress[choice]):
                        yield _sse(body)
            if self.parsed.include_usage:
                yield _sse(self.format.usage_chunk(self.completion_id, last))
        except EngineGone as e:
            self.finished.update(range(len(self.choices)))
            yield _sse(ApiError(503, str(e), "server_error", "engine_unavailable").body())
        finally:
            self._abort_unfinished()
        yield "data: [DONE]\n\n"


def _engine_requests(parsed, preparations: list) -> int:
    """The engine requests a request becomes: one a choice of each prompt, or one a prompt for a beam search
    (its n answers are one search's)."""
    return len(preparations) * (1 if parsed.beams is not None else parsed.n)


def _sse(body: dict) -> str:
    return f"data: {json.dumps(body, ensure_ascii=False)}\n\n"


async def _json_body(request: Request):
    try:
        return json.loads(await request.body())
    except (ValueError, UnicodeDecodeError):
        raise bad_request("the request body is not valid JSON") from None
    except RecursionError:
        raise bad_request("the request body is nested too deeply") from None


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


def create_app(service: ApiService) -> FastAPI:
    engine, config, metrics = service.engine, service.config, service.metrics

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        await asyncio.to_thread(engine.stop)  # connections have closed, or the grace period is over

    app = FastAPI(lifespan=lifespan, openapi_url=None, docs_url=None, redoc_url=None)

    @app.exception_handler(ApiError)
    async def api_error(request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status, headers=error.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if error.status_code == 404 else "invalid_request_error"
        return JSONResponse(ApiError(error.status_code, str(error.detail), kind).body(),
                            status_code=error.status_code)

    @app.exception_handler(Exception)
    async def internal_error(request: Request, error: Exception) -> JSONResponse:
        logger.exception("internal error on %s", request.url.path)
        return JSONResponse(ApiError(500, f"internal error: {type(error).__name__}", "server_error").body(),
                            status_code=500)

    for path, handler in (("/v1/chat/completions", service.chat), ("/v1/completions", service.completions),
                          ("/tokenize", service.tokenize), ("/detokenize", service.detokenize)):
        app.add_api_route(path, handler, methods=["POST"])

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        service.check_key(request)
        card = {"id": config.model_name, "object": "model", "created": 0, "owned_by": "atb_models"}
        if engine.ready.is_set():  # max_model_len (vLLM's): the tokens a request may hold, as the engine is sized
            card["max_model_len"] = engine.llm.max_model_len
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> Response:
        if engine.ready.is_set():
            return JSONResponse({"status": "ok"})
        return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": str(RETRY_AFTER_S)})

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    return app
