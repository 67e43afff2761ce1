"""OpenAI's function calling on the chat API: a request's `tools`, `tool_choice` and `parallel_tool_calls` checked
and turned into the kit's terms, and an answer's text turned into `tool_calls`.

The model sees the tools through the chat template (`tools`), which must show them for `tool_choice: "auto"`: the
checkpoints' Qwen2-VL template does not; examples/chat_templates/qwen2_vl_tool_use.jinja does, in the Hermes
style Qwen2.5 models were tuned on (given to the server as --chat_template). With "auto" the model decides: calls
are read from its answer's <tool_call>{"name": ..., "arguments": {...}}</tool_call> blocks; an answer holding none,
or one that does not read as calls of the given functions, is its text. With "required" or a named function the
answer is held to JSON that is such calls (a structured output), whatever the template shows: a list of
{"name", "parameters"} objects, or the named function's arguments.
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass
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
        """The StructuredOutput an answer is held to ("required", a named function), else None."""
        from atb_models.engine.structured_output import StructuredOutput

        if self.choice == "function":
            return StructuredOutput(json=_parameters(self.functions[self.name]), compact=True)
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
    if not isinstance(function.get("description", ""), str):
        raise bad_request(f"{where}.function.description must be a string")
    if not isinstance(function.get("parameters", {}), dict):
        raise bad_request(f"{where}.function.parameters must be a JSON schema (an object)")
    return {"type": "function", "function": function}


def _parameters(function: dict) -> dict:
    """The schema a call's arguments are held to: the function's parameters, where an object that lists its
    properties takes no others unless it says so (OpenAI's strict rule). JSON Schema's default lets any key
    follow, and a model held to the schema alone went on inventing keys until max_tokens."""
    schema = json.loads(json.dumps(function.get("parameters") or {"type": "object"}))  # (a copy, any depth)
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


def tool_call(name: str, arguments: dict) -> dict:
    """One entry of an answer's tool_calls (a fresh id, as OpenAI's are)."""
    return {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
            "function": {"name": name, "arguments": json.dumps(arguments, ensure_ascii=False)}}


def read_calls(text: str, tools: ToolRequest) -> Optional[tuple]:
    """(content before the calls or None, [tool_calls entries]) where the answer is calls of `tools`' functions,
    else None (the answer is its text)."""
    try:
        if tools.choice == "function":
            content, calls = None, [tool_call(tools.name, _object(json.loads(text)))]
        elif tools.choice == "required":
            content, calls = None, [tool_call(call["name"], _object(call["parameters"])) for call in json.loads(text)]
        else:
            read = _tagged_calls(text, tools.functions)
            if read is None:
                return None
            content, calls = read
            if not tools.parallel:  # (the model is not told: its first call is kept)
                calls = calls[:1]
    except (ValueError, TypeError, KeyError, RecursionError):  # (RecursionError: JSON nested too deeply to read)
        return None
    return content, calls


def _tagged_calls(text: str, functions: dict) -> Optional[tuple]:
    """An "auto" answer's <tool_call> blocks as (the text before them or None, [tool_calls entries]); None where
    it holds none, or anything but such blocks of `functions` after its text. A block's JSON that cannot be read
    raises (read_calls makes it text)."""
    start = text.find(CALL_OPEN)
    if start < 0:
        return None
    calls, blocks = [], text[start:].split(CALL_OPEN)[1:]
    for number, block in enumerate(blocks):
        inner, closed, after = block.partition(CALL_CLOSE)
        if after.strip() or not (closed or number == len(blocks) - 1):
            return None  # text between or after the calls, or an unclosed call before another
        call = json.loads(inner)
        # (another key, say "parameters" for "arguments", is not the format: its arguments would be lost)
        if not isinstance(call, dict) or call.get("name") not in functions or set(call) - {"name", "arguments"}:
            return None
        calls.append(tool_call(call["name"], _object(call.get("arguments", {}))))
    return text[:start].rstrip() or None, calls


def _object(value) -> dict:
    if not isinstance(value, dict):
        raise TypeError("a function's arguments are a JSON object")
    return value


class ToolChatFormat(ChatFormat):
    """The chat answer format for a request with tools: an answer that is calls of its functions comes back as
    `message.tool_calls` (streamed: one chunk with every call, once the answer is complete; the text before them
    as content chunks before), its finish_reason "tool_calls" ("stop" for a named function, as OpenAI's)."""

    def __init__(self, chat, model: str, token_bytes, tools: ToolRequest):
        super().__init__(chat, model, token_bytes)
        self.tools = tools

    def whole(self, completion_id: str, outputs: list) -> dict:
        body = super().whole(completion_id, outputs)
        for choice, output in zip(body["choices"], outputs):
            read = self._calls(output)
            if read is not None:
                choice["message"]["content"], choice["message"]["tool_calls"] = read
                choice["finish_reason"] = self._finish_reason(output)
        return body

    def step(self, completion_id: str, index: int, output, progress) -> Optional[dict]:
        if not output.finished:
            return self._delta_chunk(completion_id, index, output, progress, self._streamable(output.text))
        read = self._calls(output)
        if read is None:
            return self._delta_chunk(completion_id, index, output, progress, output.text, output.finish_reason)
        content, calls = read
        extra = {"tool_calls": [dict(call, index=i) for i, call in enumerate(calls)]}
        return self._delta_chunk(completion_id, index, output, progress, content or "",
                                 self._finish_reason(output), extra)

    def _calls(self, output) -> Optional[tuple]:
        if self.tools.choice == "none" or output.finish_reason not in ("stop", "length"):
            return None
        return read_calls(output.text, self.tools)

    def _finish_reason(self, output) -> str:
        if output.finish_reason != "stop":
            return output.finish_reason
        return "stop" if self.tools.choice == "function" else "tool_calls"

    def _streamable(self, text: str) -> str:
        """What a running answer's chunks may show: with "auto", its text before a call may begin (less trailing
        whitespace, which a call's text would drop); with "required" or a named function, nothing (JSON calls)."""
        if self.tools.choice in ("required", "function"):
            return ""
        if self.tools.choice == "none":
            return text
        start = text.find(CALL_OPEN)
        if start >= 0:
            return text[:start].rstrip()
        for length in range(min(len(CALL_OPEN) - 1, len(text)), 0, -1):  # the start of a call's tag, held back
            if CALL_OPEN.startswith(text[-length:]):
                text = text[:-length]
                break
        return text.rstrip()
