"""OpenAI's text completions wire format (/v1/completions): a prompt as it is, no chat template, text only (as
vLLM serves it), for base-model use and log-likelihood evaluation (`echo` with `logprobs`, `max_tokens` 0). The
request checked and turned into the kit's terms, and the bodies of answers and stream chunks; `app.py` does I/O.

The chat format's rules hold here too (protocol.py): unknown fields are refused, sampling fields are checked by
SamplingParams, `n` choices of one prompt draw with seed + i. Several prompts in one request answer as
len(prompts) * n choices, choice index = prompt index * n + i.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from typing import Optional

from atb_models.engine.sampling_params import MAX_LOGPROBS
from atb_models.serve.answers import ChoiceProgress, prompt_logprobs_body, running_usage, usage
from atb_models.serve.fields import bad_request, check_fields, flag, integer_in, is_token_id
from atb_models.serve.protocol import (
    BEAM_SEARCH_FIELDS,
    SAMPLING_FIELDS,
    STRUCTURED_OUTPUT_FIELDS,
    beam_search_params,
    sampling_params,
    stream_fields,
)

READ = frozenset({"model", "prompt", "stream", "stream_options", "max_tokens", "user", "logprobs", "echo", "n",
                  "logit_bias", "best_of", *SAMPLING_FIELDS, *STRUCTURED_OUTPUT_FIELDS, *BEAM_SEARCH_FIELDS})
UNSUPPORTED = {"suffix": None}
DEFAULT_MAX_TOKENS = 16  # OpenAI's and vLLM's default for a completion (the chat API's is the server's limit)


@dataclass
class CompletionRequest:
    model: Optional[str]
    prompts: list          # each a string or a list of token ids
    params: object         # SamplingParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    echo: bool = False
    # max_tokens 0 with echo: the prompt's logprobs alone. The engine draws one token (its prefill gives the
    # logprobs) that the answer leaves out.
    prompt_only: bool = False
    logprobs: Optional[int] = None          # OpenAI's: the most likely tokens listed at each position
    prompt_logprobs: Optional[int] = None   # vLLM's: each choice's prompt_logprobs, with so many most likely
    created: int = field(default_factory=lambda: int(time.time()))
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (protocol.stream_fields)
    beams: object = None  # use_beam_search: a BeamSearchParams (protocol.beam_search_params)


def parse_completion_request(body, max_output_length: Optional[int] = None) -> CompletionRequest:
    """The request body checked field by field; a bad one is one 400 naming the field. `max_output_length`, the
    engine's, bounds the default max_tokens: a request that gives none is not refused for a value it never sent."""
    check_fields(body, READ, UNSUPPORTED)
    model, stream, include_usage, continuous_usage, n = stream_fields(body)
    best_of = body.get("best_of")
    if best_of is not None and best_of != n:  # best_of == n returns every choice drawn: it asks for nothing more
        raise bad_request(f"best_of {best_of!r} is not supported by this server unless it equals n ({n})")
    echo = flag(body, "echo")
    logprobs = integer_in(body, "logprobs", 0, MAX_LOGPROBS)  # (the most likely tokens listed at each position)
    max_tokens = body.get("max_tokens")
    prompt_only = type(max_tokens) is int and max_tokens == 0  # (0.0 and false are refused, as 2.0 is)
    if prompt_only and not echo:
        raise bad_request("max_tokens 0 asks for no completion: it is taken only with echo: true")
    if prompt_only and body.get("min_tokens") not in (None, 0):
        # (the engine's one hidden token would take min_tokens 1 and name max_tokens 1 for more)
        raise bad_request(f"min_tokens {body['min_tokens']!r} asks for generated tokens: max_tokens 0 generates none")
    common = {key: value for key, value in body.items() if key not in ("logprobs", "echo", "best_of", "prompt")}
    default = DEFAULT_MAX_TOKENS if max_output_length is None else min(DEFAULT_MAX_TOKENS, max_output_length)
    common["max_tokens"] = 1 if prompt_only else default if max_tokens is None else max_tokens
    params = sampling_params(common)
    asked = params.prompt_logprobs  # (the echoed prompt's logprobs come from the same computation)
    if logprobs is not None:
        echoed = max(logprobs, asked or 0) if echo else asked
        params = dataclasses.replace(params, logprobs=logprobs, prompt_logprobs=echoed)
    return CompletionRequest(model, _prompts(body.get("prompt")), params, stream, include_usage, n, echo,
                             prompt_only, logprobs, asked, continuous_usage=continuous_usage,
                             beams=beam_search_params(body, n, params.max_tokens))


def _prompts(prompt) -> list:
    """The prompts of a request: a string, a list of token ids, or a non-empty list of either."""
    if isinstance(prompt, str) or (isinstance(prompt, list) and prompt and all(is_token_id(t) for t in prompt)):
        return [prompt]
    if isinstance(prompt, list) and prompt and all(
            isinstance(p, str) or (isinstance(p, list) and all(is_token_id(t) for t in p)) for p in prompt):
        return prompt
    raise bad_request("prompt must be a string, a list of token ids, or a non-empty list of strings or of token-id "
                      "lists")


class CompletionFormat:
    """The bodies of one accepted completion request's answer, whole or as stream chunks (answers.ChatFormat's
    interface). A choice's text is, with echo, its prompt's first, then what the engine generated (nothing with
    max_tokens 0); logprobs' text offsets count from the start of the choice's text."""

    id_prefix = "cmpl"

    def __init__(self, request: CompletionRequest, prompts: list, model: str, token_bytes):
        """`prompts`: the request's ProcessedPrompts, in order."""
        self.request, self.prompts, self.model, self.token_bytes = request, prompts, model, token_bytes

    def whole(self, completion_id: str, outputs: list) -> dict:
        choices = []
        for index, output in enumerate(outputs):
            choice = self._choice(index, output, ChoiceProgress())
            choice["finish_reason"], choice["stop_reason"] = self._ending(output)
            if self.request.prompt_logprobs is not None:
                choice["prompt_logprobs"] = prompt_logprobs_body(output.prompt_logprobs or [], self.token_bytes,
                                                                 self.request.prompt_logprobs)
            choices.append(choice)
        return dict(self._body(completion_id, choices), usage=self._usage(outputs))

    def opening(self, completion_id: str, num_choices: int) -> list:
        return []  # (the first chunk of a choice carries its echo, if any, and its first text)

    def step(self, completion_id: str, index: int, output, progress: ChoiceProgress) -> list:
        text = self._generated(output)[0]
        if not (text[progress.chars - self._echoed(index, progress):] or output.finished or
                (self.request.echo and not progress.opened)):
            return []
        choice = self._choice(index, output, progress)
        choice["finish_reason"], choice["stop_reason"] = self._ending(output)
        body = self._body(completion_id, [choice])
        if self.request.include_usage:
            body["usage"] = running_usage(output.prompt_token_count, self._generated(output)[2]) if (
                self.request.continuous_usage) else None
        return [body]

    def usage_chunk(self, completion_id: str, outputs: list) -> dict:
        return dict(self._body(completion_id, []), usage=self._usage(outputs))

    def _echoed(self, index: int, progress: ChoiceProgress) -> int:
        """Characters of the prompt sent at the start of choice `index`."""
        return len(self.prompts[index // self.request.n].text) if self.request.echo and progress.opened else 0

    def _ending(self, output) -> tuple:
        """A choice's finish_reason and stop_reason. With max_tokens 0 nothing generated is shown: the engine's one
        hidden token ends nothing (an eos, a stop token or a stop string in it), the answer stops at its length."""
        if self.request.prompt_only and output.finish_reason in ("stop", "length"):
            return "length", None
        return output.finish_reason, output.stop_reason

    def _generated(self, output) -> tuple[str, Optional[list], int]:
        """A choice's generated text, its tokens' logprob entries (None unless asked) and its token count."""
        if self.request.prompt_only:
            return "", None if output.logprobs is None else [], 0
        return output.text, output.logprobs, len(output.token_ids)

    def _choice(self, index: int, output, progress: ChoiceProgress) -> dict:
        """Choice `index`'s text and logprobs since `progress`, which it advances."""
        text, entries, count = self._generated(output)
        echoed = self._echoed(index, progress)
        new_text = text[progress.chars - echoed:]
        new_entries = None if entries is None else entries[progress.tokens:]
        first = None
        if self.request.echo and not progress.opened:
            prompt = self.prompts[index // self.request.n]
            new_text, first = prompt.text + new_text, prompt.token_ids[0]
            if new_entries is not None:
                new_entries = (output.prompt_logprobs or []) + new_entries
        logprobs = None if new_entries is None else self._logprobs(new_entries, progress.chars, first)
        progress.opened, progress.chars, progress.tokens = True, progress.chars + len(new_text), count
        return {"index": index, "text": new_text, "logprobs": logprobs}

    def _logprobs(self, entries: list, offset: int, first_token: Optional[int]) -> dict:
        """OpenAI's completion logprobs: each token's text, logprob, most likely tokens as {text: logprob} and
        character offset in the choice's text; the prompt's first token (entry None: nothing before it predicts
        it), `first_token`, has null for its logprob and its most likely tokens. As OpenAI and vLLM do, the most
        likely tokens include the token itself (up to logprobs + 1 of them; with logprobs 0, only it)."""
        tokens, logprobs, tops, offsets = [], [], [], []
        for entry in entries:
            token = first_token if entry is None else entry.token_id
            text = self.token_bytes(token)[0]
            tokens.append(text)
            logprobs.append(None if entry is None else entry.logprob)
            top = None
            if entry is not None:
                top = {self.token_bytes(i)[0]: value for i, value in entry.top[:self.request.logprobs]}
                top.setdefault(text, entry.logprob)
            tops.append(top)
            offsets.append(offset)
            offset += len(text)
        return {"tokens": tokens, "token_logprobs": logprobs, "top_logprobs": tops, "text_offset": offsets}

    def _usage(self, outputs: list) -> dict:
        """Each prompt's tokens once (its first choice's) and every choice's generated tokens (none shown with
        max_tokens 0)."""
        return usage(outputs[::self.request.n], sum(self._generated(o)[2] for o in outputs))

    def _body(self, completion_id: str, choices: list) -> dict:
        return {"id": completion_id, "object": "text_completion", "created": self.request.created,
                "model": self.model, "choices": choices}
