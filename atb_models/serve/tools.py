"""OpenAI's function calling on the chat API: a request's `tools`, `tool_choice` and `parallel_tool_calls` checked
and turned into the kit's terms, and an answer's text turned into `tool_calls`.

The model sees the tools through the chat template (`tools`), which must show them for `tool_choice: "auto"`: the
checkpoints' Qwen2-VL template does not; examples/chat_templates/qwen2_vl_tool_use.jinja does, in the Hermes
style Qwen2.5 models were tuned on (given to the server as --chat_template). With "auto" the model decides: calls
are read from its answer's <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks; an answer whose first
block does not read as a call of the given functions is its text, and what follows the calls read and is none is
content; where a function says strict (OpenAI's strict mode), a call is held to that form and its schema once its
<tool_call> begins (a structured output of llguidance's structural tags; the text stays free). With "required" or a named function the answer is held to JSON that is such calls (a structured output),
whatever the template shows: a list of {"name", "parameters"} objects, or the named function's arguments, which
come as the model wrote them. An AnswerReader reads an answer as it grows, so a stream and a whole answer show the
same calls.
"""

from __future__ import annotations

import json
import re
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Optional

from atb_models.serve.answers import ChatFormat
from atb_models.serve.fields import bad_request, flag

TOOL_CHOICES = ("none", "auto", "required")
FUNCTION_FIELDS = frozenset({"name", "description", "parameters", "strict"})  # OpenAI's function object
MAX_TOOLS = 128  # OpenAI's limit
NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for a function's name
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"
# Where a JSON schema holds other schemas: as a map's values, a list's items, or the keyword's value itself
SUBSCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
SUBSCHEMA_LISTS = ("anyOf", "oneOf", "allOf", "prefixItems")
SUBSCHEMAS = ("items", "additionalProperties", "not", "if", "then", "else", "contains", "propertyNames")


@dataclass(frozen=True)
class ToolRequest:
    tools: tuple          # OpenAI's tool objects, {"type": "function", "function": {...}}, for the template
    choice: str           # "none", "auto", "required", or "function": the one named
    name: Optional[str]   # the function named, with choice "function"
    parallel: bool        # whether an answer may call several functions

    @property
    def functions(self) -> dict:
        return {tool["function"]["name"]: tool["function"] for tool in self.tools}

    def check_template(self, takes_tools: bool) -> None:
        """With "auto" the model must see the tools to choose to call them: a 400 where the chat template does not
        show them (Preprocessor.takes_tools)."""
        if self.choice == "auto" and not takes_tools:
            raise bad_request("this server's chat template shows the model no tools, so it could not choose to call "
                              "them: start the server with --chat_template (examples/chat_templates/"
                              "qwen2_vl_tool_use.jinja shows them), or give tool_choice \"required\" or a function")

    def constraint(self):
        """The StructuredOutput an answer is held to ("required", a named function, "auto" with a strict function),
        else None."""
        from atb_models.engine.structured_output import StructuredOutput

        if self.choice == "function":
            return StructuredOutput(json=_parameters(self.functions[self.name]), compact=True)
        if self.choice == "auto" and any(function.get("strict") for function in self.functions.values()):
            return StructuredOutput(grammar=self._strict_calls())
        if self.choice != "required":
            return None
        parameters = {name: _parameters(function) for name, function in self.functions.items()}
        calls = [{"type": "object", "properties": {"name": {"enum": [name]}, "parameters": arguments},
                  "required": ["name", "parameters"], "additionalProperties": False}
                 for name, arguments in parameters.items()]
        schema = {"type": "array", "minItems": 1, "items": {"anyOf": calls}, **_definitions(parameters)}
        if not self.parallel:
            schema["maxItems"] = 1
        return StructuredOutput(json=schema, compact=True)


    def _strict_calls(self) -> str:
        """"auto" with a strict function (OpenAI's strict mode): the answer is free text, but a call, once its
        <tool_call> begins, is held to the Hermes form the tool template shows and to one of the functions: a strict
        one's arguments to its schema (compact JSON), another's to any object. llguidance's structural tags: the
        trigger is a lazy lexeme, so the text before it is the model's own."""
        from llguidance import StructTag

        from atb_models.engine.structured_output import COMPACT_JSON_WHITESPACE

        compact = {"x-guidance": {"whitespace_pattern": COMPACT_JSON_WHITESPACE}}
        tags = []
        for name, function in self.functions.items():
            arguments = dict(_parameters(function) if function.get("strict") else {"type": "object"}, **compact)
            tags.append(StructTag(trigger=CALL_OPEN, begin=f'{CALL_OPEN}\n{{"name": {json.dumps(name)}, "arguments": ',
                                  grammar=arguments, end=f"}}\n{CALL_CLOSE}"))
        # (text triggers: Qwen's <tool_call> is an added token but not a special one, so it is text to llguidance)
        return StructTag.to_grammar(tags, assume_special=False)


def _definitions(parameters: dict) -> dict:
    """The functions' parameters' $defs (and draft-7 definitions), for the root of the schema that holds them all
    (`parameters`: each function's, by name): their "$ref": "#/$defs/..." (pydantic's nested models) name the root
    of the schema they are in, which is no longer theirs (vLLM gathers them alike). A name two functions define
    differently is a 400."""
    gathered = {}
    for name, schema in parameters.items():
        for keyword in ("$defs", "definitions"):
            definitions = schema.get(keyword)
            if not isinstance(definitions, dict):
                continue  # (none, or not a schema's: llguidance names what is wrong)
            into = gathered.setdefault(keyword, {})
            for key, value in definitions.items():
                if into.setdefault(key, value) != value:
                    raise bad_request(f"tools: the functions' parameters define {keyword} {key!r} differently "
                                      f"({name!r} and another): tool_choice \"required\" holds the answer to one "
                                      "schema of them all")
    return gathered


def parse_tools(body: dict) -> Optional[ToolRequest]:
    """The request's ToolRequest, None where it gives no tools."""
    tools, choice = body.get("tools"), body.get("tool_choice")
    parallel = True if body.get("parallel_tool_calls") is None else flag(body, "parallel_tool_calls")
    if tools is None:
        if choice not in (None, "none"):
            raise bad_request(f"tool_choice {choice!r} needs tools")
        return None
    if not isinstance(tools, list) or not 1 <= len(tools) <= MAX_TOOLS:
        raise bad_request(f"tools must be a list of 1..{MAX_TOOLS} tools")
    checked = tuple(_tool(tool, f"tools[{i}]") for i, tool in enumerate(tools))
    names = [tool["function"]["name"] for tool in checked]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise bad_request(f"tools names the function {twice[0]!r} twice")
    if choice is None or choice in TOOL_CHOICES:
        return ToolRequest(checked, choice or "auto", None, parallel)
    named = choice.get("function") if isinstance(choice, dict) and choice.get("type") == "function" else None
    name = named.get("name") if isinstance(named, dict) else None
    if not isinstance(name, str):
        raise bad_request('tool_choice must be "none", "auto", "required" or {"type": "function", "function": '
                          f'{{"name": ...}}}}, got {choice!r}')
    if name not in names:
        raise bad_request(f"tool_choice names the function {name!r}, which tools does not hold")
    return ToolRequest(checked, "function", name, parallel)


def _tool(tool, where: str) -> dict:
    function = tool.get("function") if isinstance(tool, dict) and tool.get("type") == "function" else None
    if not isinstance(function, dict) or set(tool) - {"type", "function"}:
        raise bad_request(f'{where} must be {{"type": "function", "function": {{"name": ..., "description": ..., '
                          f'"parameters": {{...}}}}}}')
    unread = sorted(set(function) - FUNCTION_FIELDS)
    if unread:
        raise bad_request(f"{where}.function: {', '.join(map(repr, unread))} is not a field this server reads (a "
                          f"function's are {', '.join(sorted(FUNCTION_FIELDS))})")
    name = function.get("name")
    if not (isinstance(name, str) and NAME.fullmatch(name)):
        raise bad_request(f"{where}.function.name must be 1..64 letters, digits, _ or -, got {name!r}")
    if function.get("strict") not in (None, True, False):
        raise bad_request(f"{where}.function.strict must be true or false, got {function['strict']!r}")
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{where}.function.description must be a string")
    parameters = function.get("parameters", {})
    if not isinstance(parameters, dict) or parameters.get("type", "object") != "object":
        raise bad_request(f"{where}.function.parameters must be a JSON schema of an object (a call's arguments are "
                          f'one), {{"type": "object", "properties": {{...}}}}')
    return {"type": "function", "function": function}


def _parameters(function: dict) -> dict:
    """The schema a call's arguments are held to: the function's parameters, where an object that lists its
    properties takes no others unless it says so (OpenAI's strict rule). JSON Schema's default lets any key
    follow, and a model held to the schema alone went on inventing keys until max_tokens."""
    schema = json.loads(json.dumps(function.get("parameters") or {}))  # (a copy, any depth)
    schema.setdefault("type", "object")  # (a schema of no type takes any value: arguments are an object)
    stack = [schema]
    while stack:  # (not recursive: a schema may nest as deep as the JSON parser allows)
        node = stack.pop()
        if not isinstance(node, dict):
            continue
        if isinstance(node.get("properties"), dict) and "additionalProperties" not in node:
            node["additionalProperties"] = False
        for keyword in SUBSCHEMA_MAPS:  # (their values are schemas; their keys are names, never keywords)
            if isinstance(node.get(keyword), dict):
                stack.extend(node[keyword].values())
        for keyword in SUBSCHEMA_LISTS:
            if isinstance(node.get(keyword), list):
                stack.extend(node[keyword])
        stack.extend(node.get(keyword) for keyword in SUBSCHEMAS)
    return schema


@dataclass
class Call:
    """One call an answer holds: a fresh id, as OpenAI's are, the function's name, and its arguments as the model
    wrote them (JSON text, whole once the call is; a stream sends it as it grows)."""

    name: str
    arguments: str = ""
    id: str = field(default_factory=lambda: f"call_{uuid.uuid4().hex[:24]}")

    def body(self) -> dict:
        return {"id": self.id, "type": "function", "function": {"name": self.name, "arguments": self.arguments}}


class AnswerReader(ABC):
    """Reads one answer's calls as its text grows: feed() takes the text so far and gives (content, calls), what
    may be shown of the answer now. A stream sends its growth, a whole answer feeds its final text once, so both
    show the same calls with the same ids. What is shown never shrinks: content held back where a call may be
    beginning, arguments where the model may still be writing them. `complete`: whether the calls read so far are
    whole (a structured output's JSON may be cut by a stop string or max_tokens)."""

    complete = True

    def feed(self, text: str, finished: bool) -> tuple:
        content, calls = self._read(text, finished)
        if finished and not calls:
            return text, []  # an answer that is no calls is its text
        return content, calls

    @abstractmethod
    def _read(self, text: str, finished: bool) -> tuple:
        """(content, calls) of the text so far: each reader's own reading of its answer's form."""


def answer_reader(tools: ToolRequest) -> AnswerReader:
    if tools.choice == "function":
        return _ArgumentsReader(tools.name)
    if tools.choice == "required":
        return _CallListReader()
    return _TaggedReader(tools.functions, tools.parallel)


class _ArgumentsReader(AnswerReader):
    """A named function's answer: its arguments object, the whole text (a structured output)."""

    def __init__(self, name: str):
        self.call, self.arguments, self.pos = Call(name), _JsonObject(), 0

    @property
    def complete(self) -> bool:
        return self.arguments.complete

    def _read(self, text: str, finished: bool) -> tuple:
        self.pos = self.arguments.scan(text, self.pos)
        self.call.arguments = text.strip()
        return None, [self.call] if self.call.arguments else []


# A call of "required"'s answer, [{"name": "...", "parameters": {...}}, ...] in compact JSON with the keys in the
# schema's order, up to its arguments: the list's "[" or the "," after the call before, then the call's head (a
# name is 1..64 of NAME's characters, so no escapes). Then its arguments, an object, then its "}".
CALL_HEAD = re.compile(r'\s*[\[,]\s*\{\s*"name"\s*:\s*"([A-Za-z0-9_-]{1,64})"\s*,\s*"parameters"\s*:\s*')
CALL_HEAD_MOST = 128  # characters: a call's head longer than this is no head
CALL_END = re.compile(r"\s*\}")


class _CallListReader(AnswerReader):
    """"required"'s answer, a JSON list of calls (a structured output): each call as soon as its name is read, its
    arguments as they grow. Incremental: each character of the arguments is looked at once."""

    def __init__(self):
        self.calls, self.pos, self.phase = [], 0, "head"
        self.arguments = _JsonObject()
        self.complete = False  # once the list's "]" closes it

    def _read(self, text: str, finished: bool) -> tuple:
        while self.pos < len(text) and self.phase != "done":
            if self.phase == "head":
                head = CALL_HEAD.match(text, self.pos)
                if head is None or head.end() == len(text) and not finished:  # (its spaces may go on)
                    rest = text[self.pos:].strip()
                    self.complete = rest == "]" and bool(self.calls)
                    if len(text) - self.pos > CALL_HEAD_MOST or finished:
                        self.phase = "done"  # (the list's "]", or no call)
                    break
                self.calls.append(Call(head.group(1)))
                self.pos, self.phase, self.arguments = head.end(), "arguments", _JsonObject()
            elif self.phase == "arguments":
                start, self.pos = self.pos, self.arguments.scan(text, self.pos)
                self.calls[-1].arguments += text[start:self.pos]
                self.phase = "end" if self.arguments.complete else "arguments"
            else:
                end = CALL_END.match(text, self.pos)
                if end is None and not finished and not text[self.pos:].strip():
                    break
                self.pos, self.phase = (end.end(), "head") if end else (len(text), "done")
        return None, self.calls


class _JsonObject:
    """Where a JSON object's text ends, found a character at a time as it comes: its nesting depth, and whether the
    scan is within a string (and just after a backslash there)."""

    def __init__(self):
        self.depth, self.complete, self.in_string, self.escaped = 0, False, False, False

    def scan(self, text: str, pos: int) -> int:
        """Past the characters of text[pos:] that belong to the object (up to its end, once it ends)."""
        while pos < len(text) and not self.complete:
            char = text[pos]
            pos += 1
            if self.in_string:
                self.in_string = self.escaped or char != '"'
                self.escaped = not self.escaped and char == "\\"
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                self.complete = self.depth == 0
        return pos


class _TaggedReader(AnswerReader):
    """An "auto" answer: text, then <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks of the given
    functions, each a call once it closes and reads as one (the last may lack its closing tag). From the first
    thing that is not such a block on, the answer is text again (content after the text before the calls), and
    an answer whose first block does not read as a call is all text."""

    def __init__(self, functions: dict, parallel: bool):
        self.functions, self.parallel = functions, parallel
        self.calls: list = []
        self.before: Optional[str] = None  # the text before the first <tool_call>, once one is seen
        self.pos = 0                        # where the first tag may begin, then where the calls read end
        self.seen = 0                       # where the open block's closing tag is yet to be looked for
        self.rest: Optional[int] = None     # where the answer stopped being calls

    def _read(self, text: str, finished: bool) -> tuple:
        if self.rest is None:
            self._read_blocks(text, finished)
        if self.before is None:  # no call begun: the text, less what may be the start of one
            return self._shown(_held(text), finished), []
        if not self.calls:
            return self._shown(text if self.rest is not None else self.before, finished), []
        after = "" if self.rest is None else text[self.rest:]
        before = self.before.rstrip()
        return (before + (after if before else after.lstrip())).rstrip() or None, self.calls

    @staticmethod
    def _shown(text: str, finished: bool) -> str:
        return text if finished else text.rstrip()  # (trailing space waits: a call's tag would drop it)

    def _read_blocks(self, text: str, finished: bool) -> None:
        if self.before is None:
            start = text.find(CALL_OPEN, max(0, self.pos - len(CALL_OPEN)))
            if start < 0:
                self.pos = len(text)
                return
            self.before, self.pos = text[:start], start
        while True:
            stripped = text[self.pos:].lstrip()
            if not stripped:
                return
            if not stripped.startswith(CALL_OPEN):
                if not (CALL_OPEN.startswith(stripped) and not finished):  # (else a tag may be coming)
                    self.rest = self.pos
                return
            begin = len(text) - len(stripped) + len(CALL_OPEN)
            close = text.find(CALL_CLOSE, max(begin, self.seen))
            if close < 0 and not finished:
                self.seen = max(begin, len(text) - len(CALL_CLOSE) + 1)
                return
            self.seen = 0
            call = _tagged_call(text[begin:close if close >= 0 else len(text)], self.functions)
            if call is None:
                self.rest = self.pos
                return
            if self.parallel or not self.calls:  # (parallel_tool_calls false: the first; the model is not told)
                self.calls.append(call)
            self.pos = len(text) if close < 0 else close + len(CALL_CLOSE)


def _held(text: str) -> str:
    """The text less an end that may be the start of a call's tag."""
    for length in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):
        if CALL_OPEN.startswith(text[-length:]):
            return text[:-length]
    return text


def _tagged_call(block: str, functions: dict) -> Optional[Call]:
    """The call a <tool_call> block's JSON is, or None where it is not one of `functions` in the Hermes form."""
    try:
        call = json.loads(block)
    except (ValueError, RecursionError):  # (RecursionError: JSON nested too deeply to read)
        return None
    # (another key, say "parameters" for "arguments", is not the format: its arguments would be lost)
    if not isinstance(call, dict) or call.get("name") not in functions or set(call) - {"name", "arguments"}:
        return None
    arguments = call.get("arguments", {})
    if not isinstance(arguments, dict):
        return None
    text = json.dumps(arguments, ensure_ascii=False)
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:  # (a lone surrogate, JSON's "\ud800": UTF-8 cannot carry it, an escape can)
        text = json.dumps(arguments)
    return Call(call["name"], text)


class ToolChatFormat(ChatFormat):
    """The chat answer format for a request with tools: an answer's calls of its functions come back as
    `message.tool_calls`, its finish_reason "tool_calls" ("stop" for a named function, as OpenAI's). A stream
    sends a call's id and name as soon as they are read and its arguments as they grow ("auto": each call whole,
    once its block reads as one), OpenAI's deltas: the first entry of a call's index with id, type and name, the
    others with more of its arguments."""

    def __init__(self, chat, model: str, token_bytes, tools: ToolRequest):
        super().__init__(chat, model, token_bytes)
        self.tools = tools
        self.readers: dict = {}  # a choice's AnswerReader and its calls' arguments sent, by choice index

    def whole(self, completion_id: str, outputs: list) -> dict:
        body = super().whole(completion_id, outputs)
        if self.tools.choice == "none":
            return body
        for choice, output in zip(body["choices"], outputs):
            reader = answer_reader(self.tools)
            content, calls = reader.feed(output.text, True)
            if calls:
                choice["message"]["content"] = content
                choice["message"]["tool_calls"] = [call.body() for call in calls]
                choice["finish_reason"] = self._finish_reason(output, reader.complete)
        return body

    def step(self, completion_id: str, index: int, output, progress) -> list:
        if self.tools.choice == "none":
            return super().step(completion_id, index, output, progress)
        reader, sent = self.readers.setdefault(index, (answer_reader(self.tools), []))
        content, calls = reader.feed(output.text, output.finished)
        deltas = []
        for number, call in enumerate(calls):
            if number == len(sent):
                deltas.append(dict(call.body(), index=number))
                sent.append(len(call.arguments))
            elif len(call.arguments) > sent[number]:
                deltas.append({"index": number, "function": {"arguments": call.arguments[sent[number]:]}})
                sent[number] = len(call.arguments)
        finish = None
        if output.finished:
            finish = self._finish_reason(output, reader.complete) if calls else output.finish_reason
        if not deltas:
            chunk = self._delta_chunk(completion_id, index, output, progress, content or "", finish)
            return [chunk] if chunk else []
        # The finish_reason in a chunk of its own after the calls, as OpenAI's streams end: its SDK's stream helper
        # reports a call done when a later chunk begins another or ends the answer, and missed one begun in the last.
        chunk = self._delta_chunk(completion_id, index, output, progress, content or "", None, {"tool_calls": deltas})
        return [chunk] + ([self._chunk(completion_id, index, {}, finish, None, output.stop_reason, output)]
                          if finish else [])

    def _finish_reason(self, output, complete: bool) -> str:
        """"tool_calls" for an answer of whole calls ("stop" for a named function's, as OpenAI's); a cut one says
        what cut it ("length", or "stop" for a stop string, its stop_reason the string)."""
        if output.finish_reason != "stop" or not complete:
            return output.finish_reason
        return "stop" if self.tools.choice == "function" else "tool_calls"
