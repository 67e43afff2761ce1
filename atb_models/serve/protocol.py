"""The OpenAI chat-completions wire format: a request body checked and turned into the kit's terms, and the
bodies of answers, stream chunks and errors; the checks completions.py shares (fields, sampling fields,
structured output) and vLLM's /tokenize and /detokenize bodies. No I/O here: `app.py` receives and sends,
`media.py` resolves urls."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional

from atb_models.engine.sampling_params import MAX_LOGPROBS, SamplingParams
from atb_models.errors import UserError
from atb_models.multimodal.prompt import ROLES, Message, ToolCall, json_object

# OpenAI's response_format, and vLLM's extra fields for the same (engine.structured_output): at most one per request.
STRUCTURED_OUTPUT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice")
# response_format's json_schema (OpenAI's)
JSON_SCHEMA_FIELDS = frozenset({"name", "description", "schema", "strict"})
# Fields the kit cannot honour, with the value that asks for nothing: any other value is refused, never ignored.
UNSUPPORTED = {"functions": None, "function_call": None}  # (OpenAI's older names for tools: not taken)
# SamplingParams' fields a body gives under their own names (sampling_params; the chat and completions APIs alike).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "ignore_eos", "stop",
                   "presence_penalty", "frequency_penalty", "min_p", "min_tokens", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids", "bad_words",
                   "prompt_logprobs")
# The fields it reads (`user`, an end user's name for abuse monitoring, asks for nothing); any other is refused.
READ = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                  "user", "logprobs", "top_logprobs", "n", "logit_bias", "continue_final_message",
                  "add_generation_prompt", *SAMPLING_FIELDS, *STRUCTURED_OUTPUT_FIELDS, "tools", "tool_choice",
                  "parallel_tool_calls"})
MAX_CHOICES = 16  # n: answers drawn for one request
MAX_LOGIT_BIAS_ENTRIES = 1024  # token ids in a logit_bias: each is added to every step's logits of the request
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024  # stop strings (and bad_words) a request may give
MAX_STOP_TOKEN_IDS, MAX_ALLOWED_TOKEN_IDS = 1024, 2**18
MAX_TOOL_CALLS = 128  # an assistant message's tool calls


class ApiError(Exception):
    """An answer other than 200, in OpenAI's error shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, kind: str = "invalid_request_error",
                 code: Optional[str] = None, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.headers = status, message, kind, code, headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "code": self.code, "param": None}}


def bad_request(message: str) -> ApiError:
    return ApiError(400, message)


@dataclass
class MediaPart:
    """An image or video part of a message, its url not yet resolved (`media.py` does that)."""

    kind: str  # "image" | "video"
    url: str


@dataclass
class ChatRequest:
    model: Optional[str]
    # multimodal.prompt.Messages whose items are {"text": ...} or MediaParts (media.py resolves them)
    messages: list
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    n: int = 1
    # vLLM's extra: the last message, the assistant's, is continued rather than answered by a new turn
    continue_final_message: bool = False
    tools: Optional[object] = None  # a serve.tools.ToolRequest where the request gives tools
    created: int = field(default_factory=lambda: int(time.time()))


def parse_chat_request(body) -> ChatRequest:
    """The request body checked field by field; a bad one is one 400 naming the field."""
    check_fields(body, READ, UNSUPPORTED)
    model, stream, include_usage, n = stream_fields(body)
    continuing = flag(body, "continue_final_message")
    if body.get("add_generation_prompt") not in (None, not continuing):
        raise bad_request("add_generation_prompt true opens a new assistant turn and continue_final_message true "
                          "continues the last one: one of them (the server takes add_generation_prompt false only "
                          "with continue_final_message)")
    from atb_models.serve.tools import parse_tools  # (tools.py builds on this module's ChatFormat)

    tools = parse_tools(body)
    params = sampling_params(body)
    try:
        constraint = None if tools is None else tools.constraint()
    except UserError as e:  # (the functions' parameters as the answer's schema: too long, or not writable as JSON)
        raise bad_request(f"tools: {e}") from None
    if constraint is not None:  # tool_choice "required" or a named function: the answer held to calls
        if params.structured_output is not None:
            raise bad_request(f"tool_choice {body['tool_choice']!r} holds the answer to function calls; a "
                              "response_format or guided_* field cannot hold it to something else too")
        try:
            params = dataclasses.replace(params, structured_output=constraint)
        except UserError as e:
            raise bad_request(str(e)) from None
    return ChatRequest(model, _messages(body.get("messages")), params, stream, include_usage, n, continuing, tools)


def parse_tokenize_request(body) -> tuple:
    """vLLM's /tokenize: (model, "prompt", a string or token ids, None) or (model, "messages", the parsed messages,
    their serve.tools.ToolRequest or None)."""
    check_fields(body, {"model", "prompt", "messages", "tools"}, {})
    model = model_field(body)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise bad_request("give either prompt (a text as it is) or messages (a chat, tokenized as it is answered)")
    if body.get("prompt") is not None:
        if body.get("tools") is not None:
            raise bad_request("tools go with messages (a chat's template shows them), not with a prompt")
        return model, "prompt", body["prompt"], None
    from atb_models.serve.tools import parse_tools  # (tools.py builds on this module's ChatFormat)

    return model, "messages", _messages(body["messages"]), parse_tools({"tools": body.get("tools")})


def parse_detokenize_request(body) -> tuple:
    """vLLM's /detokenize: (model, token ids); their range is checked where the vocabulary is known."""
    check_fields(body, {"model", "tokens"}, {})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_token_id(t) for t in tokens):
        raise bad_request("tokens must be a list of token ids")
    return model_field(body), tokens


def is_token_id(value) -> bool:
    """An integer in JSON (true and false are not ids); its range is checked where the vocabulary is known."""
    return isinstance(value, int) and not isinstance(value, bool)


def check_fields(body, read: set, unsupported: dict) -> None:
    """A JSON object of only the fields `read`, or those `unsupported` at the value that asks for nothing."""
    if not isinstance(body, dict):
        raise bad_request("the request body must be a JSON object")
    for name, neutral in unsupported.items():
        if body.get(name) not in (None, neutral):
            raise bad_request(f"{name} is not supported by this server (got {body[name]!r})")
    unknown = sorted(set(body) - read - set(unsupported))
    if unknown:
        raise bad_request(f"{', '.join(map(repr, unknown))}: not a field this server knows; it reads "
                          f"{', '.join(sorted(read))}")


def model_field(body: dict) -> Optional[str]:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise bad_request("model must be a string")
    return model


def stream_fields(body: dict) -> tuple:
    """(model, stream, include_usage, n): the fields of a request that say what comes back, and how."""
    model = model_field(body)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise bad_request("stream_options must be an object, given with stream: true")
    if options is not None:  # (a key the server does not read is refused, as a body's field is)
        check_fields(options, {"include_usage"}, {"continuous_usage_stats": False})
    include_usage = flag(options or {}, "include_usage")
    if stream and body.get("prompt_logprobs") is not None:  # (vLLM's rule too: they come whole, with the answer)
        raise bad_request("prompt_logprobs are not available with stream: true")
    n = integer_in(body, "n", 1, MAX_CHOICES)
    return model, stream, include_usage, 1 if n is None else n


def integer_in(body: dict, name: str, low: int, high: int) -> Optional[int]:
    """An integer field within low..high, or None where it is absent or null."""
    value = body.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high):
        raise bad_request(f"{name} must be an integer in {low}..{high}, got {value!r}")
    return value


def flag(body: dict, name: str) -> bool:
    """A true-or-false field; null is its default, false (OpenAI's "boolean or null", as for the other fields)."""
    value = body.get(name)
    if value is None:
        return False
    if not isinstance(value, bool):
        raise bad_request(f"{name} must be true or false, got {value!r}")
    return value


def _messages(messages) -> list:
    if not isinstance(messages, list) or not messages:
        raise bad_request("messages must be a non-empty list")
    return [_message(message, i) for i, message in enumerate(messages)]


def _message(message, index: int) -> Message:
    where = f"messages[{index}]"
    if not isinstance(message, dict):
        raise bad_request(f"{where} must be an object with a role and a content")
    role = message.get("role")
    if role not in ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(ROLES)}, got {role!r}")
    if message.get("tool_calls") is not None and role != "assistant":
        raise bad_request(f"{where}.tool_calls: only an assistant's message holds tool calls")
    calls = _tool_calls(message.get("tool_calls"), where)
    call_id = message.get("tool_call_id") if role == "tool" else None
    if call_id is not None and not isinstance(call_id, str):
        raise bad_request(f"{where}.tool_call_id must be a string")
    content = message.get("content")
    if calls and content in (None, ""):  # an assistant's turn that only called functions
        items = ()
    elif isinstance(content, str):
        items = ({"text": content},)
    elif isinstance(content, list) and content:
        items = tuple(_part(part, f"{where}.content[{j}]") for j, part in enumerate(content))
    else:
        raise bad_request(f"{where}.content must be a string or a non-empty list of parts")
    return Message(role, items, calls, call_id)


def _tool_calls(calls, where: str) -> tuple:
    """An assistant message's tool_calls (OpenAI's entries, arguments as JSON text) as ToolCalls."""
    if calls is None:
        return ()
    if not isinstance(calls, list) or len(calls) > MAX_TOOL_CALLS:
        raise bad_request(f"{where}.tool_calls must be a list of at most {MAX_TOOL_CALLS} calls")
    checked = []
    for j, call in enumerate(calls):
        function = call.get("function") if isinstance(call, dict) else None
        name = function.get("name") if isinstance(function, dict) else None
        if not (isinstance(name, str) and isinstance(call.get("id", ""), str)):
            raise bad_request(f'{where}.tool_calls[{j}] must be {{"id": ..., "type": "function", "function": '
                              f'{{"name": ..., "arguments": "..."}}}}')
        arguments = json_object(function.get("arguments"))
        if arguments is None:
            raise bad_request(f"{where}.tool_calls[{j}].function.arguments must be a JSON object's text")
        checked.append(ToolCall(call.get("id", ""), name, json.dumps(arguments, ensure_ascii=False)))
    return tuple(checked)


def _part(part, where: str):
    kind = part.get("type") if isinstance(part, dict) else None
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise bad_request(f"{where}.text must be a string")
        return {"text": part["text"]}
    if kind in ("image_url", "video_url"):
        holder = part.get(kind)
        url = holder.get("url") if isinstance(holder, dict) else holder
        if not isinstance(url, str):
            raise bad_request(f"{where}.{kind}.url must be a string")
        return MediaPart(kind.removesuffix("_url"), url)
    raise bad_request(f"{where}: unknown content part type {kind!r}; expected text, image_url or video_url")


def _check_strings(name: str, value, noun: str) -> None:
    """Bounds on the stop strings (and bad words) a request may give: every step searches each running answer for
    each stop string and checks each bad word, so a request of thousands of them, or of long ones, would slow every
    other request of the server. OpenAI takes 4 stop strings; the kit takes a few more. A lone string is one."""
    strings = [value] if isinstance(value, str) else value
    if isinstance(strings, list) and (len(strings) > MAX_STOP_STRINGS or any(
            isinstance(s, str) and len(s) > MAX_STOP_CHARS for s in strings)):
        raise bad_request(f"{name} takes at most {MAX_STOP_STRINGS} {noun} of at most {MAX_STOP_CHARS} characters")


def _check_token_lists(body: dict) -> None:
    """Bounds on the token id lists a request may name, which every step of the request consults (a drawn token
    looked up, a mask). allowed_token_ids may name the whole vocabulary of a large model."""
    for name, most in (("stop_token_ids", MAX_STOP_TOKEN_IDS), ("allowed_token_ids", MAX_ALLOWED_TOKEN_IDS)):
        value = body.get(name)
        if isinstance(value, list) and len(value) > most:
            raise bad_request(f"{name} takes at most {most} token ids, got {len(value)}")


def sampling_params(body: dict) -> SamplingParams:
    # OpenAI's newer name and its older one: either (a null one asks for nothing), both only when they agree.
    newer, older = body.get("max_completion_tokens"), body.get("max_tokens")
    if newer is not None and older is not None and newer != older:
        raise bad_request(f"max_completion_tokens {newer!r} and max_tokens {older!r} differ; give one of them")
    max_tokens = older if newer is None else newer
    _check_strings("stop", body.get("stop"), "strings")
    _check_strings("bad_words", body.get("bad_words"), "words")
    _check_token_lists(body)
    values = {"max_tokens": max_tokens, **{name: body.get(name) for name in SAMPLING_FIELDS}}
    given = {name: value for name, value in values.items() if value is not None}
    if body.get("logit_bias") is not None:
        given["logit_bias"] = _logit_bias(body["logit_bias"])
    constraint = _structured_output(body)
    if constraint is not None:
        given["structured_output"] = constraint
    top = integer_in(body, "top_logprobs", 0, MAX_LOGPROBS)
    if flag(body, "logprobs"):
        given["logprobs"] = 0 if top is None else top
    elif top is not None:
        raise bad_request("top_logprobs needs logprobs: true")
    for name, value in given.items():
        if isinstance(value, float) and not math.isfinite(value):
            raise bad_request(f"{name} must be a finite number")
    try:
        return SamplingParams(**given)  # its checks name the field; the kit's defaults (greedy) for the rest
    except UserError as e:
        raise bad_request(str(e)) from None


def _logit_bias(value) -> list:
    """OpenAI's logit_bias, {"token id": bias}, with its keys as integers (SamplingParams checks the rest)."""
    if not isinstance(value, dict):
        raise bad_request(f"logit_bias must be an object mapping token ids to biases, got {value!r}")
    if len(value) > MAX_LOGIT_BIAS_ENTRIES:
        raise bad_request(f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} token ids, got {len(value)}")
    for key in value:
        if not (key.isascii() and key.isdigit()):  # (a JSON object's keys are strings)
            raise bad_request(f"logit_bias's keys must be token ids (digits), got {key!r}")
    return [(int(key), bias) for key, bias in value.items()]  # ("7" and "07" are one id twice: refused)


def _structured_output(body: dict):
    """The request's StructuredOutput, or None: OpenAI's response_format (text; json_object; json_schema with its
    schema) or one of vLLM's guided_json, guided_regex, guided_choice."""
    from atb_models.engine.structured_output import StructuredOutput

    asked = [name for name in STRUCTURED_OUTPUT_FIELDS if body.get(name) is not None]
    if body.get("response_format") == {"type": "text"}:  # (OpenAI's default: no constraint)
        asked.remove("response_format")
    if not asked:
        return None
    if len(asked) > 1:
        raise bad_request(f"{' and '.join(asked)} each constrain the answer: give one of them")
    name, value = asked[0], body[asked[0]]
    try:
        if name == "guided_json":
            return StructuredOutput(json=value)
        if name == "guided_regex":
            return StructuredOutput(regex=value)
        if name == "guided_choice":
            return StructuredOutput(choice=value)
        kind = value.get("type") if isinstance(value, dict) else None
        if kind == "json_object" or kind == "json_schema" and isinstance(value.get("json_schema"), dict):
            # A key the kit does not read is refused, never ignored: some APIs take {"type": "json_object",
            # "schema": {...}}, which would otherwise be answered with any object.
            outer = {"type", "json_schema"} if kind == "json_schema" else {"type"}
            inner = value.get("json_schema") if kind == "json_schema" else {}
            unread = [*sorted(set(value) - outer),
                      *(f"json_schema.{key}" for key in sorted(set(inner) - JSON_SCHEMA_FIELDS))]
            if unread:
                raise bad_request(f"response_format: {', '.join(unread)} is not a field this server reads (a "
                                  f"json_schema's are {', '.join(sorted(JSON_SCHEMA_FIELDS))})")
            schema = inner.get("schema")  # (json_object, or a json_schema without one: any JSON object)
            return StructuredOutput(json=True if schema is None else schema)
    except UserError as e:
        raise bad_request(f"{name}: {e}") from None
    raise bad_request(f"response_format must be {{\"type\": \"text\"}}, {{\"type\": \"json_object\"}} or "
                      f"{{\"type\": \"json_schema\", \"json_schema\": {{\"name\": ..., \"schema\": {{...}}}}}}, "
                      f"got {value!r}")


def usage(firsts: list, completion_tokens: int) -> dict:
    """OpenAI's usage: `firsts`, the finished RequestOutput of each prompt's first choice, give the prompt tokens
    (visual ones included; a prompt counts once, whatever its n) and those whose K/V came from the prefix cache
    (prompt_tokens_details.cached_tokens); `completion_tokens` are all choices'."""
    prompt_tokens = sum(o.prompt_token_count for o in firsts)
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": sum(o.cached_prompt_tokens for o in firsts)}}


def chat_usage(outputs: list) -> dict:
    """usage() of a chat request's finished outputs, one per choice of its one prompt."""
    return usage(outputs[:1], sum(len(o.token_ids) for o in outputs))


def logprobs_body(logprobs: Optional[list], token_bytes) -> Optional[dict]:
    """OpenAI's choice.logprobs for engine.logprobs.TokenLogprob entries (None where none were asked for):
    each token's text, logprob, UTF-8 bytes (a token may hold part of a character) and top_logprobs."""
    if logprobs is None:
        return None

    def entry(token_id: int, logprob: float) -> dict:
        text, raw = token_bytes(token_id)
        return {"token": text, "logprob": logprob, "bytes": list(raw)}

    return {"content": [dict(entry(lp.token_id, lp.logprob), top_logprobs=[entry(i, v) for i, v in lp.top])
                        for lp in logprobs]}


def prompt_logprobs_body(entries: list, token_bytes, count: int) -> list:
    """vLLM's prompt_logprobs: None for the first prompt token, then for each other a map of token ids (strings, as
    JSON's keys are) to their logprob, rank and text: the prompt's token first, then the `count` most likely."""
    def entry(lp) -> dict:
        listed = {str(lp.token_id): {"logprob": lp.logprob, "rank": lp.rank,
                                     "decoded_token": token_bytes(lp.token_id)[0]}}
        for rank, (token, logprob) in enumerate(lp.top[:count], start=1):
            listed.setdefault(str(token), {"logprob": logprob, "rank": rank, "decoded_token": token_bytes(token)[0]})
        return listed

    return [None if lp is None else entry(lp) for lp in entries]


def completion_body(completion_id: str, model: str, created: int, outputs: list, token_bytes,
                    prompt_logprobs: Optional[int] = None) -> dict:
    """The whole answer of a request that was not streamed; `outputs` are the engine's final RequestOutputs, one
    per choice, `token_bytes` the LLM's (a token id's text and bytes, for logprobs); with `prompt_logprobs` asked,
    the prompt's (vLLM's top-level field: the choices share the prompt)."""
    body = {"id": completion_id, "object": "chat.completion", "created": created, "model": model,
            "choices": [{"index": index, "message": {"role": "assistant", "content": output.text},
                         "logprobs": logprobs_body(output.logprobs, token_bytes),
                         "finish_reason": output.finish_reason, "stop_reason": output.stop_reason}
                        for index, output in enumerate(outputs)],
            "usage": chat_usage(outputs)}
    if prompt_logprobs is not None:
        body["prompt_logprobs"] = prompt_logprobs_body(outputs[0].prompt_logprobs or [], token_bytes, prompt_logprobs)
    return body


def chunk_body(completion_id: str, model: str, created: int, delta: dict, finish_reason: Optional[str],
               with_usage_field: bool, logprobs: Optional[dict] = None, index: int = 0, stop_reason=None) -> dict:
    """One streamed chunk of choice `index`; with stream_options.include_usage every chunk carries "usage": null
    but the last; `logprobs` (logprobs_body's) those of the tokens that came since the choice's chunk before;
    `stop_reason` (vLLM's field) the stop string or token id that ended it."""
    body = {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [{"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason,
                         "stop_reason": stop_reason}]}
    if with_usage_field:
        body["usage"] = None
    return body


def usage_chunk_body(completion_id: str, model: str, created: int, outputs: list) -> dict:
    return {"id": completion_id, "object": "chat.completion.chunk", "created": created, "model": model,
            "choices": [], "usage": chat_usage(outputs)}


@dataclass
class ChoiceProgress:
    """What a stream has sent of one choice: characters of its text, generated tokens (their logprobs), and
    whether it has spoken yet."""

    chars: int = 0
    tokens: int = 0
    opened: bool = False


class ChatFormat:
    """The bodies of one accepted chat request's answer, whole or as stream chunks (app.Answer sends them): the
    interface completions.CompletionFormat shares."""

    id_prefix = "chatcmpl"

    def __init__(self, chat: ChatRequest, model: str, token_bytes):
        self.request, self.model, self.token_bytes = chat, model, token_bytes

    def whole(self, completion_id: str, outputs: list) -> dict:
        return completion_body(completion_id, self.model, self.request.created, outputs, self.token_bytes,
                               self.request.params.prompt_logprobs)

    def opening(self, completion_id: str, num_choices: int) -> list:
        """Chunks before any token: each choice's role."""
        return [self._chunk(completion_id, index, {"role": "assistant", "content": ""})
                for index in range(num_choices)]

    def step(self, completion_id: str, index: int, output, progress: ChoiceProgress) -> Optional[dict]:
        """The chunk of choice `index` for its latest output, None where it adds nothing to send: the text since
        the last chunk (a token holding part of a character waits for the rest) and its tokens' logprobs."""
        return self._delta_chunk(completion_id, index, output, progress, output.text, output.finish_reason)

    def _delta_chunk(self, completion_id: str, index: int, output, progress: ChoiceProgress, text: str,
                     finish_reason: Optional[str] = None, extra: Optional[dict] = None) -> Optional[dict]:
        """The chunk that brings choice `index` to `text` (what may be shown of its output so far), with `extra`
        delta fields and the logprobs of the tokens since its last chunk; None where there is nothing to send."""
        delta = text[progress.chars:]
        if not (delta or extra or finish_reason):
            return None
        logprobs = None if output.logprobs is None else output.logprobs[progress.tokens:]
        progress.chars, progress.tokens = len(text), len(output.token_ids)
        body = dict({"content": delta} if delta else {}, **(extra or {}))
        return self._chunk(completion_id, index, body, finish_reason, logprobs_body(logprobs, self.token_bytes),
                           output.stop_reason if finish_reason else None)

    def usage_chunk(self, completion_id: str, outputs: list) -> dict:
        return usage_chunk_body(completion_id, self.model, self.request.created, outputs)

    def _chunk(self, completion_id: str, index: int, delta: dict, finish_reason=None, logprobs=None,
               stop_reason=None) -> dict:
        return chunk_body(completion_id, self.model, self.request.created, delta, finish_reason,
                          self.request.include_usage, logprobs, index, stop_reason)
