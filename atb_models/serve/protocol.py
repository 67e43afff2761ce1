"""The OpenAI chat-completions request: a body checked and turned into the kit's terms; the checks completions.py
shares (sampling fields, structured output) and vLLM's /tokenize and /detokenize bodies. The answers' bodies are
answers.py's, the field checks and error shape fields.py's. No I/O here: `app.py` receives and sends, `media.py`
resolves urls."""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field
from typing import Optional

from atb_models.engine.sampling_params import MAX_LOGPROBS, BeamSearchParams, SamplingParams
from atb_models.errors import UserError
from atb_models.multimodal.prompt import ITEM_OPTIONS, ROLES, Message, ToolCall, json_object
from atb_models.serve.fields import bad_request, check_fields, flag, integer_in, is_token_id, model_field
from atb_models.serve.tools import ToolRequest, parse_tools

# OpenAI's response_format, and vLLM's extra fields for the same (engine.structured_output): at most one per request.
STRUCTURED_OUTPUT_FIELDS = ("response_format", "guided_json", "guided_regex", "guided_choice", "guided_grammar")
# response_format's json_schema (OpenAI's)
JSON_SCHEMA_FIELDS = frozenset({"name", "description", "schema", "strict"})
# Fields the kit cannot honour, with the value that asks for nothing: any other value is refused, never ignored.
UNSUPPORTED = {"functions": None, "function_call": None}  # (OpenAI's older names for tools: not taken)
# SamplingParams' fields a body gives under their own names (sampling_params; the chat and completions APIs alike).
SAMPLING_FIELDS = ("temperature", "top_p", "top_k", "repetition_penalty", "seed", "ignore_eos", "stop",
                   "presence_penalty", "frequency_penalty", "min_p", "min_tokens", "stop_token_ids",
                   "include_stop_str_in_output", "skip_special_tokens", "allowed_token_ids", "bad_words",
                   "prompt_logprobs")
# vLLM's beam search fields: a request's n answers by a beam search of width n (beam_search_params)
BEAM_SEARCH_FIELDS = ("use_beam_search", "length_penalty", "early_stopping")
# The fields it reads (`user`, an end user's name for abuse monitoring, asks for nothing); any other is refused.
READ = frozenset({"model", "messages", "stream", "stream_options", "max_tokens", "max_completion_tokens",
                  "user", "logprobs", "top_logprobs", "n", "logit_bias", "continue_final_message",
                  "add_generation_prompt", *SAMPLING_FIELDS, *STRUCTURED_OUTPUT_FIELDS, "tools", "tool_choice",
                  "parallel_tool_calls", "mm_processor_kwargs", *BEAM_SEARCH_FIELDS})
# mm_processor_kwargs' keys (vLLM's field): the request's every image and video takes them as its item's own.
MEDIA_OPTIONS = tuple(sorted({key for keys in ITEM_OPTIONS.values() for key in keys}))
MAX_CHOICES = 16  # n: answers drawn for one request
# What a beam search request may give besides them: its prompt, max_tokens, n, ignore_eos, stream (each answer
# comes whole, once the search ends) and the fields that neither sample nor change what the answer holds; any other
# field away from its default is refused.
BEAM_SEARCH_TAKES = frozenset({"model", "messages", "prompt", "max_tokens", "max_completion_tokens", "n", "user",
                               "ignore_eos", "continue_final_message", "add_generation_prompt", "mm_processor_kwargs",
                               "stream", "stream_options", *BEAM_SEARCH_FIELDS})
MAX_LOGIT_BIAS_ENTRIES = 1024  # token ids in a logit_bias: each is added to every step's logits of the request
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 1024  # stop strings (and bad_words) a request may give
MAX_STOP_TOKEN_IDS, MAX_ALLOWED_TOKEN_IDS = 1024, 2**18
MAX_TOOL_CALLS = 128  # an assistant message's tool calls


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
    tools: Optional[ToolRequest] = None  # where the request gives tools
    created: int = field(default_factory=lambda: int(time.time()))
    # mm_processor_kwargs: min_pixels, max_pixels and fps for every image and video (serve.media gives each its kind's)
    media_options: dict = field(default_factory=dict)
    continuous_usage: bool = False  # stream_options.continuous_usage_stats (stream_fields)
    beams: Optional[BeamSearchParams] = None  # use_beam_search: the n answers by beam search (beam_search_params)


def parse_chat_request(body) -> ChatRequest:
    """The request body checked field by field; a bad one is one 400 naming the field."""
    check_fields(body, READ, UNSUPPORTED)
    model, stream, include_usage, continuous_usage, n = stream_fields(body)
    continuing = flag(body, "continue_final_message")
    if body.get("add_generation_prompt") not in (None, not continuing):
        raise bad_request("add_generation_prompt true opens a new assistant turn and continue_final_message true "
                          "continues the last one: one of them (the server takes add_generation_prompt false only "
                          "with continue_final_message)")
    tools = parse_tools(body)
    params = sampling_params(body)
    try:
        constraint = None if tools is None else tools.constraint()
    except UserError as e:  # (the functions' parameters as the answer's schema: too long, or not writable as JSON)
        raise bad_request(f"tools: {e}") from None
    if constraint is not None:  # tool_choice "required", a named function or a strict one: the calls held
        if params.structured_output is not None:
            holder = "a strict function" if tools.choice == "auto" else f"tool_choice {body['tool_choice']!r}"
            raise bad_request(f"{holder} holds the answer's function calls to their schemas; a response_format or "
                              "guided_* field cannot hold it to something else too")
        try:
            params = dataclasses.replace(params, structured_output=constraint)
        except UserError as e:
            raise bad_request(str(e)) from None
    return ChatRequest(model, _messages(body.get("messages")), params, stream, include_usage, n, continuing, tools,
                       media_options=media_options(body), continuous_usage=continuous_usage,
                       beams=beam_search_params(body, n, params.max_tokens))


def beam_search_params(body: dict, n: int, max_tokens: Optional[int]) -> Optional[BeamSearchParams]:
    """vLLM's use_beam_search: the request's n answers, the best first, by a beam search of width n (LLM.beam_search's
    rule), up to `max_tokens` each; None without it. A field that samples or changes what the answer holds is
    refused with it (it would be ignored), and so are length_penalty and early_stopping without it."""
    if not flag(body, "use_beam_search"):
        given = [name for name in BEAM_SEARCH_FIELDS[1:] if body.get(name) is not None]
        if given:
            raise bad_request(f"{given[0]} goes with use_beam_search: true")
        return None
    defaults = SamplingParams()
    other = sorted(name for name, value in body.items()
                   if name not in BEAM_SEARCH_TAKES and not _asks_for_nothing(name, value, defaults))
    if other:
        raise bad_request(f"use_beam_search ranks answers by their log-probabilities, without sampling: "
                          f"{', '.join(other)} cannot go with it")
    try:
        return BeamSearchParams(beam_width=n, max_tokens=max_tokens,
                                length_penalty=1.0 if body.get("length_penalty") is None else body["length_penalty"],
                                early_stopping=False if body.get("early_stopping") is None else body["early_stopping"],
                                ignore_eos=flag(body, "ignore_eos"))
    except UserError as e:
        raise bad_request(str(e)) from None


def _asks_for_nothing(name: str, value, defaults: SamplingParams) -> bool:
    """Whether a field's value is its default or off. Not by `in`: 0 == False, and a completion's logprobs 0 asks
    for each chosen token's logprob, seed 0 seeds a draw; skip_special_tokens false (its default is true) shows them."""
    default = getattr(defaults, name, None)
    if value is None or (value is False and default is not True) or value == [] or value == {}:
        return True
    return default is not None and value == default and isinstance(value, bool) == isinstance(default, bool)


def parse_tokenize_request(body) -> tuple:
    """vLLM's /tokenize: (model, "prompt", a string or token ids, None, {}) or (model, "messages", the parsed
    messages, their serve.tools.ToolRequest or None, their media options as a chat request's)."""
    check_fields(body, {"model", "prompt", "messages", "tools", "mm_processor_kwargs"}, {})
    model = model_field(body)
    if (body.get("prompt") is None) == (body.get("messages") is None):
        raise bad_request("give either prompt (a text as it is) or messages (a chat, tokenized as it is answered)")
    if body.get("prompt") is not None:
        if body.get("tools") is not None:
            raise bad_request("tools go with messages (a chat's template shows them), not with a prompt")
        if body.get("mm_processor_kwargs") is not None:  # (a prompt holds no media)
            raise bad_request("mm_processor_kwargs go with messages (their media), not with a prompt")
        return model, "prompt", body["prompt"], None, {}
    return (model, "messages", _messages(body["messages"]), parse_tools({"tools": body.get("tools")}),
            media_options(body))


def parse_detokenize_request(body) -> tuple:
    """vLLM's /detokenize: (model, token ids); their range is checked where the vocabulary is known."""
    check_fields(body, {"model", "tokens"}, {})
    tokens = body.get("tokens")
    if not isinstance(tokens, list) or not all(is_token_id(t) for t in tokens):
        raise bad_request("tokens must be a list of token ids")
    return model_field(body), tokens


def media_options(body: dict) -> dict:
    """vLLM's mm_processor_kwargs: options every image and video of the request takes as its item's own (min_pixels
    and max_pixels for images, max_pixels and fps for videos: multimodal.prompt.ITEM_OPTIONS); a null one asks for
    nothing, a key the server does not honour is refused. Their values are checked against the server's bounds
    where those are known (app.py, through the Preprocessor's one check)."""
    options = body.get("mm_processor_kwargs")
    if options is None:
        return {}
    if not isinstance(options, dict):
        raise bad_request(f"mm_processor_kwargs must be an object such as {{\"max_pixels\": 200704}}, got {options!r}")
    unknown = sorted(set(options) - set(MEDIA_OPTIONS))
    if unknown:
        raise bad_request(f"mm_processor_kwargs: {', '.join(map(repr, unknown))}: not a key this server honours; it "
                          f"reads {', '.join(MEDIA_OPTIONS)}")
    return {key: value for key, value in options.items() if value is not None}


def stream_fields(body: dict) -> tuple:
    """(model, stream, include_usage, continuous_usage, n): the fields of a request that say what comes back, and
    how. continuous_usage (vLLM's stream_options.continuous_usage_stats): every chunk of a choice carries its usage
    so far, not null; it goes with include_usage, which the last chunk's total still answers."""
    model = model_field(body)
    stream = flag(body, "stream")
    options = body.get("stream_options")
    if options is not None and not (isinstance(options, dict) and stream):
        raise bad_request("stream_options must be an object, given with stream: true")
    if options is not None:  # (a key the server does not read is refused, as a body's field is)
        check_fields(options, {"include_usage", "continuous_usage_stats"}, {})
    include_usage = flag(options or {}, "include_usage")
    continuous_usage = flag(options or {}, "continuous_usage_stats")
    if continuous_usage and not include_usage:  # (vLLM sends none then: a field that asks for nothing)
        raise bad_request("stream_options.continuous_usage_stats puts usage in every chunk: give include_usage: true "
                          "too")
    if stream and body.get("prompt_logprobs") is not None:  # (vLLM's rule too: they come whole, with the answer)
        raise bad_request("prompt_logprobs are not available with stream: true")
    n = integer_in(body, "n", 1, MAX_CHOICES)
    return model, stream, include_usage, continuous_usage, 1 if n is None else n


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
    schema) or one of vLLM's guided_json, guided_regex, guided_choice, guided_grammar."""
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
        if name == "guided_grammar":
            return StructuredOutput(grammar=value)
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
