"""Function calling's parts without a model: the tool-use chat template against the checkpoints' own, a request's
tools checked, and answers read as calls (the server's answers are in test_serve.py)."""
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
from tokenizers import Tokenizer, models
from transformers import PreTrainedTokenizerFast

from atb_models import SamplingParams
from atb_models.demo.checkpoint import CHAT_TEMPLATE
from atb_models.serve.fields import ApiError
from atb_models.serve.answers import ChoiceProgress
from atb_models.serve.protocol import ChatRequest, parse_chat_request
from atb_models.serve.tools import ToolChatFormat, answer_reader, parse_tools

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "chat_templates" / "qwen2_vl_tool_use.jinja"
WEATHER = {"type": "function", "function": {"name": "get_weather", "description": "The weather in a city",
                                            "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                           "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time"}}


def render(messages: list, template: str, **kwargs) -> str:
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.BPE()))
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, **kwargs)


def text(value: str) -> dict:
    return {"type": "text", "text": value}


CONVERSATIONS = [
    [{"role": "user", "content": [{"type": "image"}, text("What is it?")]}],
    [{"role": "system", "content": [text("Be brief.")]}, {"role": "user", "content": [text("Hi")]},
     {"role": "assistant", "content": [text("Hello")]}, {"role": "user", "content": [{"type": "video"},
                                                                                     {"type": "image"}, text("And?")]}],
    [{"role": "user", "content": "a plain string"}],
]


@pytest.mark.parametrize("messages", CONVERSATIONS, ids=["image", "history", "string"])
@pytest.mark.parametrize("kwargs", [dict(add_generation_prompt=True), dict(add_vision_id=True),
                                    dict(continue_final_message=True)], ids=["answer", "vision_ids", "continue"])
def test_without_tools_the_tool_use_template_renders_what_the_checkpoints_own_does(messages, kwargs):
    if kwargs.get("continue_final_message"):
        messages = messages + [{"role": "assistant", "content": [text("It is")]}]
    template = TEMPLATE.read_text()
    assert render(messages, template, **kwargs) == render(messages, CHAT_TEMPLATE, **kwargs)


def test_the_tool_use_template_shows_the_tools_the_calls_made_and_their_results():
    messages = [{"role": "user", "content": [text("Weather and time in Paris?")]},
                {"role": "assistant", "content": [text("Let me look.")], "tool_calls": [
                    {"id": "a", "type": "function",
                     "function": {"name": "get_weather", "arguments": {"city": "Paris"}}},
                    {"id": "b", "type": "function", "function": {"name": "get_time", "arguments": {}}}]},
                {"role": "tool", "tool_call_id": "a", "content": [text("sunny")]},
                {"role": "tool", "tool_call_id": "b", "content": "noon"}]
    rendered = render(messages, TEMPLATE.read_text(), tools=[WEATHER, TIME], add_generation_prompt=True)
    tools_block = rendered[rendered.index("<tools>\n") + 8:rendered.index("\n</tools>")]
    assert [json.loads(line) for line in tools_block.splitlines()] == [WEATHER, TIME]
    assert ('<|im_start|>assistant\nLet me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}'
            '\n</tool_call>\n<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call><|im_end|>\n') in rendered
    assert rendered.endswith("<|im_start|>user\n<tool_response>\nsunny\n</tool_response>\n<tool_response>\nnoon\n"
                             "</tool_response><|im_end|>\n<|im_start|>assistant\n")


def tools_of(**body):
    return parse_tools(dict({"tools": [WEATHER, TIME]}, **body))


def read_answer(text: str, tools) -> tuple:
    """A finished answer read as the server reads it: (content or None, [Call])."""
    return answer_reader(tools).feed(text, True)


def calls_read(text: str, tools) -> tuple:
    """read_answer's (content, [(name, arguments text)])."""
    content, calls = read_answer(text, tools)
    return content, [(call.name, call.arguments) for call in calls]


def test_an_answer_of_hermes_blocks_is_read_as_calls_and_anything_else_as_text():
    auto = tools_of()
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'
    rome = ("get_weather", '{"city": "Rome"}')
    content, calls = read_answer("I will look.\n" + call + "\n" + call.replace("get_weather", "get_time"), auto)
    assert content == "I will look." and [c.name for c in calls] == ["get_weather", "get_time"]
    assert json.loads(calls[0].arguments) == {"city": "Rome"} and calls[0].id.startswith("call_")
    assert calls[0].id != calls[1].id
    assert calls_read(call[:-len("</tool_call>")], auto) == (None, [rome])  # the last one's closing tag may be missing
    assert len(read_answer(call + call, tools_of(parallel_tool_calls=False))[1]) == 1
    for not_calls in ("no call here", call.replace("get_weather", "unknown"), call.replace("{\"city\"", "{city"),
                      call[:-len("</tool_call>")] + call, '<tool_call>["get_weather"]</tool_call>',
                      '<tool_call>{"name": "get_time", "arguments": 3}',
                      "<tool_call>" + "[" * 100_000,  # (too deep for the JSON parser)
                      call.replace('"arguments"', '"parameters"'), call.replace('"name"', '"type": "f", "name"')):
        assert read_answer(not_calls, auto) == (not_calls, []), not_calls


def test_an_auto_calls_arguments_with_a_lone_surrogate_escape_can_be_sent():
    """JSON's "\\ud800" reads as a lone surrogate, which UTF-8 cannot carry: the answer's body failed to encode (a 500,
    a stream cut short)."""
    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "\\ud800 \\u00e9\\ud83d\\ude00"}}\n</tool_call>'
    [read] = read_answer(call, tools_of())[1]
    assert json.loads(read.arguments) == {"city": "\ud800 \u00e9\U0001f600"}
    json.dumps(read.body(), ensure_ascii=False).encode("utf-8")  # (as the server sends it)


def test_what_follows_an_auto_answers_calls_and_is_no_call_is_its_content_after_the_text_before_them():
    """Nothing of the answer is lost, and the calls read stay calls (a stream has sent them already)."""
    auto = tools_of()
    call = '<tool_call>\n{"name": "get_time", "arguments": {}}\n</tool_call>'
    assert calls_read("Let me see. " + call + "\nDone. ", auto) == ("Let me see.\nDone.", [("get_time", "{}")])
    assert calls_read(call + " and text after", auto) == ("and text after", [("get_time", "{}")])
    broken = "<tool_call>{broken</tool_call>"
    assert calls_read("A.\n" + call + "\n" + broken, auto) == ("A.\n" + broken, [("get_time", "{}")])


def test_required_and_named_answers_are_read_from_their_json():
    required = tools_of(tool_choice="required")
    assert calls_read('[{"name": "get_time", "parameters": {}}, {"name": "get_weather", "parameters": '
                      '{"city": "O\\"slo}]"}}]', required) == (None, [("get_time", "{}"),
                                                                     ("get_weather", '{"city": "O\\"slo}]"}')])
    named = tools_of(tool_choice={"type": "function", "function": {"name": "get_weather"}})
    assert calls_read('{"city": "Oslo"}', named) == (None, [("get_weather", '{"city": "Oslo"}')])
    # Cut by max_tokens: the calls read so far, the last one's arguments as far as they came (OpenAI's, with
    # finish_reason "length"); cut before a call's name, the text.
    assert calls_read('{"city": "Os', named) == (None, [("get_weather", '{"city": "Os')])
    assert calls_read('[{"name": "get_time", "parameters": {}}, {"name": "get_w', required) == (
        None, [("get_time", "{}")])
    assert calls_read('[{"na', required) == ('[{"na', [])


def test_the_constraints_of_required_and_named_choices_hold_the_answer_to_calls():
    schema = json.loads(tools_of(tool_choice="required", parallel_tool_calls=False).constraint().json)
    assert schema["minItems"] == schema["maxItems"] == 1
    assert tools_of(tool_choice="required").constraint().compact  # no room for a small model's idle whitespace
    assert [c["properties"]["name"] for c in schema["items"]["anyOf"]] == [{"enum": ["get_weather"]},
                                                                           {"enum": ["get_time"]}]
    named = tools_of(tool_choice={"type": "function", "function": {"name": "get_time"}}).constraint()
    assert json.loads(named.json) == {"type": "object"}  # a function without parameters takes any object
    assert tools_of(tool_choice="auto").constraint() is None and tools_of(tool_choice="none").constraint() is None


def test_auto_with_a_strict_function_holds_calls_to_their_schemas_and_leaves_text_free():
    """OpenAI's strict mode under "auto": text is the model's own, but once a <tool_call> begins the call is held
    to the Hermes form and a given function, a strict one's arguments to its schema."""
    from atb_models.config import load_model_config, load_tokenizer
    from atb_models.demo.reader import READER_MODEL_DIR
    from atb_models.engine.structured_output import Matchers

    tokenizer, config = load_tokenizer(str(READER_MODEL_DIR)), load_model_config(str(READER_MODEL_DIR))
    matchers = Matchers(tokenizer, config.hf_config.vocab_size, config.eos_token_ids)
    strict_weather = {"type": "function", "function": dict(WEATHER["function"], strict=True)}
    constraint = parse_tools({"tools": [strict_weather, TIME]}).constraint()

    def allowed(text: str) -> bool:
        matcher = matchers.matcher(constraint)
        for token in tokenizer.encode(text, add_special_tokens=False):
            if not matcher.allowed(config.hf_config.vocab_size)[token]:
                return False
            matcher.advance(token)
        return True

    call = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>'
    assert allowed("Let me look. " + call) and allowed("No call, just text: {city} <tool") and allowed(
        '<tool_call>\n{"name": "get_time", "arguments": {"any": 1}}\n</tool_call> and after')
    for wrong in (call.replace("city", "town"), call.replace('"Paris"', "3"), call.replace("get_weather", "other"),
                  call.replace("<tool_call>\n", "<tool_call>")):
        assert not allowed(wrong), wrong
    assert parse_tools({"tools": [WEATHER, TIME]}).constraint() is None  # (no strict function: the model's own)


def test_a_calls_arguments_are_the_declared_ones_unless_the_schema_takes_others():
    """JSON Schema lets any key follow the listed ones; a model held to it invented keys until max_tokens."""
    nested = {"type": "object", "properties": {
        "properties": {"type": "object", "properties": {"a": {"type": "string"}}},  # (a property so named)
        "rows": {"type": "array", "items": {"$ref": "#/$defs/Row"}},
        "extra": {"type": "object", "properties": {}, "additionalProperties": True}},
        "$defs": {"Row": {"type": "object", "properties": {"b": {"type": "integer"}}}}}
    tools = parse_tools({"tools": [{"type": "function", "function": {"name": "f", "parameters": nested}}],
                         "tool_choice": {"type": "function", "function": {"name": "f"}}})
    schema = json.loads(tools.constraint().json)
    assert schema["additionalProperties"] is False and set(schema["properties"]) == {"properties", "rows", "extra"}
    assert schema["properties"]["properties"]["additionalProperties"] is False
    assert schema["$defs"]["Row"]["additionalProperties"] is False
    assert schema["properties"]["extra"]["additionalProperties"] is True  # (said so)
    assert "additionalProperties" not in nested  # the request's own schema, shown to the model, is as given


def test_required_gathers_the_functions_definitions_where_their_refs_find_them():
    """pydantic's nested models (openai.pydantic_function_tool) are "$ref": "#/$defs/..." of the parameters' root,
    which the schema of "required" nests: their $defs must be its own."""
    from llguidance import LLMatcher

    def tool(name, defs, ref="#/$defs/City"):
        return {"type": "function", "function": {"name": name, "parameters": {
            "type": "object", "properties": {"city": {"$ref": ref}}, "required": ["city"], **defs}}}

    city = {"type": "object", "properties": {"name": {"type": "string"}}, "required": ["name"]}
    both = [tool("get_weather", {"$defs": {"City": city}}), tool("get_time", {"$defs": {"City": city}}),
            tool("get_news", {"definitions": {"Town": city}}, "#/definitions/Town")]
    for choice in ("required", {"type": "function", "function": {"name": "get_weather"}}):
        constraint = parse_tools({"tools": both, "tool_choice": choice}).constraint()
        grammar = LLMatcher.grammar_from_json_schema(constraint.json)
        assert LLMatcher.validate_grammar(grammar) == "", choice
    clash = [tool("get_weather", {"$defs": {"City": city}}), tool("get_time", {"$defs": {"City": {"type": "string"}}})]
    with pytest.raises(ApiError, match="define \\$defs 'City' differently"):
        parse_tools({"tools": clash, "tool_choice": "required"}).constraint()


def streamed(format_: ToolChatFormat, text: str, finish_reason: str = "stop", pieces: int = 1) -> dict:
    """The answer `text` streamed `pieces` characters a step through `format_`, its chunks put together as a whole
    answer's choice the way OpenAI's clients do (a call's first delta names it, the others add to its arguments).
    A chunk that brings calls ends nothing (OpenAI's shape: its SDK's stream helper misses a call begun in the
    chunk that ends the answer)."""
    content, calls, finish, progress = "", [], None, ChoiceProgress()
    for end in [*range(pieces, len(text), pieces), len(text)]:
        done = end == len(text)
        output = SimpleNamespace(text=text[:end], token_ids=[0] * end, logprobs=None, finished=done,
                                 finish_reason=finish_reason if done else None, stop_reason=None)
        for chunk in format_.step("c", 0, output, progress):
            [choice] = chunk["choices"]
            assert finish is None, "a chunk after the finishing one"
            assert not (choice["delta"].get("tool_calls") and choice["finish_reason"]), "calls in the last chunk"
            content += choice["delta"].get("content", "")
            for delta in choice["delta"].get("tool_calls", ()):
                if delta["index"] == len(calls):
                    assert delta["id"].startswith("call_") and delta["type"] == "function"
                    calls.append({"id": delta["id"], "type": "function", "function": dict(delta["function"])})
                else:
                    assert set(delta) == {"index", "function"} and set(delta["function"]) == {"arguments"}
                    calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
            finish = choice["finish_reason"]
    message = {"role": "assistant", "content": content or None}
    if calls:
        message["tool_calls"] = calls
    return {"message": message, "finish_reason": finish}


AUTO_CALL = '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Rome"}}\n</tool_call>'


@pytest.mark.parametrize("choice, text, finish_reason", [
    ("auto", "Sure, I will look. \n" + AUTO_CALL + "\n" + AUTO_CALL.replace("get_weather", "get_time"), "stop"),
    ("auto", "a < b, and <tool_cal is no tag", "stop"),
    ("auto", AUTO_CALL + "\nDone.", "stop"),
    ("auto", "See: <tool_call>{broken}</tool_call> after", "stop"),
    ("auto", "Hi " + AUTO_CALL[:-len("</tool_call>")], "stop"),
    ("auto", "Hi " + AUTO_CALL[:30], "length"),
    ("none", "x <tool_call>", "stop"),
    ("required", '[{"name": "get_time", "parameters": {}} , {"name": "get_weather", "parameters": {"city": '
                 '"a\\"}{"}}]', "stop"),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Osl', "length"),
    ("required", '[{"name": "get_weather", "parameters": {"city": "Osl', "stop"),  # (cut by a stop string)
    ("required", '[{"na', "length"),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Oslo"}', "stop"),
    ({"type": "function", "function": {"name": "get_weather"}}, '{"city": "Os', "length"),
])
@pytest.mark.parametrize("pieces", [1, 3, 1000])
def test_a_streams_chunks_put_together_are_the_whole_answer(choice, text, finish_reason, pieces):
    """A stream sends a call's name once read and its arguments as they grow, the text around calls as it comes,
    and never takes back what it sent: put together, its chunks are the whole answer, whatever the steps."""
    chat, tools = ChatRequest(None, [], SamplingParams()), tools_of(tool_choice=choice)
    output = SimpleNamespace(text=text, token_ids=[0] * len(text), logprobs=None, finished=True,
                             finish_reason=finish_reason, stop_reason=None, prompt_token_count=1,
                             cached_prompt_tokens=0)
    [expected] = ToolChatFormat(chat, "m", None, tools).whole("c", [output])["choices"]
    format_ = ToolChatFormat(chat, "m", None, tools)
    got = streamed(format_, text, finish_reason, pieces)
    for answer in (expected, got):
        for call in answer["message"].get("tool_calls", ()):
            call["id"] = "-"  # (a call's id is drawn anew by each reading)
    assert got == {"message": expected["message"], "finish_reason": expected["finish_reason"]}


def test_openais_stream_helper_reports_each_call_done_where_the_last_comes_as_the_answer_ends():
    """A call read only at the end (an "auto" answer's last block without its closing tag, or the tag and the eos
    drawn in one step) came in the chunk with the finish_reason, which the SDK's helper never reported done."""
    from openai.lib.streaming.chat import ChatCompletionStreamState
    from openai.types.chat import ChatCompletionChunk

    chat, text = ChatRequest(None, [], SamplingParams()), "Hi " + AUTO_CALL[:-len("</tool_call>")]
    format_, progress, done = ToolChatFormat(chat, "m", None, tools_of()), ChoiceProgress(), []
    state = ChatCompletionStreamState(input_tools=[WEATHER, TIME])
    for end in (3, len(text)):
        output = SimpleNamespace(text=text[:end], token_ids=[0] * end, logprobs=None, finished=end == len(text),
                                 finish_reason="stop" if end == len(text) else None, stop_reason=None)
        for chunk in format_.opening("c", 1) * (end == 3) + format_.step("c", 0, output, progress):
            events = state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
            done += [event.name for event in events if event.type == "tool_calls.function.arguments.done"]
    assert done == ["get_weather"] and state.get_final_completion().choices[0].finish_reason == "tool_calls"


def test_calls_cut_by_a_stop_string_finish_as_stopped_not_as_calls_made():
    """A stop string may end a structured output's JSON early: its calls are then unfinished, and the finish reason
    says what ended them, as "length" does for max_tokens, where whole calls finish "tool_calls"."""
    chat = ChatRequest(None, [], SamplingParams())

    def finish_reason(text: str, stop_reason) -> str:
        output = SimpleNamespace(text=text, token_ids=[0], logprobs=None, finished=True, finish_reason="stop",
                                 stop_reason=stop_reason, prompt_token_count=1, cached_prompt_tokens=0)
        [choice_body] = ToolChatFormat(chat, "m", None, tools_of(tool_choice="required")).whole("c", [output])[
            "choices"]
        assert choice_body["message"]["tool_calls"]
        return choice_body["finish_reason"]

    assert finish_reason('[{"name": "get_time", "parameters": {"zone": "UTC"}}]', None) == "tool_calls"
    assert finish_reason('[{"name": "get_time", "parameters": {"zone": "UTC"}} , {"name": "get_time", "parameters": {',
                         "}") == "stop"


def test_a_stream_holds_back_the_text_where_a_call_may_begin_and_sends_a_named_calls_name_at_once():
    chat = ChatRequest(None, [], SamplingParams())
    auto = ToolChatFormat(chat, "m", None, tools_of())
    chunks = [auto.step("c", 0, SimpleNamespace(text=text, token_ids=[0], logprobs=None, finished=False,
                                                finish_reason=None, stop_reason=None), progress)
              for progress in [ChoiceProgress()] for text in ("Sure, <tool", "Sure, <tool_call>\n{")]
    assert chunks[0][0]["choices"][0]["delta"] == {"content": "Sure,"} and chunks[1] == []
    get_time = {"type": "function", "function": {"name": "get_time"}}
    named = ToolChatFormat(chat, "m", None, tools_of(tool_choice=get_time))
    [chunk] = named.step("c", 0, SimpleNamespace(text="{", token_ids=[0], logprobs=None, finished=False,
                                                 finish_reason=None, stop_reason=None), ChoiceProgress())
    [call] = chunk["choices"][0]["delta"]["tool_calls"]
    assert call["function"] == {"name": "get_time", "arguments": "{"} and call["index"] == 0


@pytest.mark.parametrize("body, expected", [
    ({"tool_choice": "auto"}, "tool_choice 'auto' needs tools"),
    ({"tools": []}, "tools must be a list of 1..128 tools"),
    ({"tools": [{"type": "code_interpreter"}]}, 'tools[0] must be {"type": "function"'),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "name must be 1..64 letters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "examples": []}}]}, "'examples' is not a field"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": "x"}}]}, "must be a JSON schema"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "array"}}}]},
     "must be a JSON schema of an object"),
    ({"tools": [TIME, TIME]}, "names the function 'get_time' twice"),
    ({"tools": [TIME], "tool_choice": "always"}, 'tool_choice must be "none", "auto", "required"'),
    ({"tools": [TIME], "tool_choice": {"type": "function", "function": {"name": "other"}}},
     "names the function 'other', which tools does not hold"),
    ({"tools": [TIME], "tool_choice": "required", "guided_regex": "x"}, "cannot hold it to something else"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"description": "x" * 100_000}}}],
      "tool_choice": "required"}, "tools: the structured output's json is longer than 100000 characters"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"default": float("nan")}}}],
      "tool_choice": {"type": "function", "function": {"name": "f"}}}, "tools: the JSON schema cannot be written"),
    ({"tools": [TIME], "parallel_tool_calls": "no"}, "parallel_tool_calls must be true or false"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": "yes"}}]}, "strict must be true or false"),
    ({"tools": [{"type": "function", "function": {"name": "f", "strict": True}}], "guided_regex": "x"},
     "a strict function holds the answer's function calls to their schemas"),
    ({"functions": [{"name": "f"}]}, "functions is not supported"),
    ({"messages": [{"role": "user", "content": "x", "tool_calls": []}]}, "only an assistant's message holds"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[1]"}}]}]},
     "arguments must be a JSON object's text"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [
        {"id": "a", "type": "function", "function": {"name": "f", "arguments": "[" * 100_000}}]}]},
     "arguments must be a JSON object's text"),
    ({"messages": [{"role": "tool", "content": "x", "tool_call_id": 5}]}, "tool_call_id must be a string"),
    ({"messages": [{"role": "assistant", "content": None}]}, "content must be a string or a non-empty list"),
])
def test_tools_and_tool_messages_asked_wrongly_are_400s(body, expected):
    with pytest.raises(ApiError) as error:
        parse_chat_request(dict({"messages": [{"role": "user", "content": "hi"}]}, **body))
    assert error.value.status == 400 and expected in error.value.message


def test_a_chat_template_file_missing_or_broken_stops_the_server_at_its_start_in_one_line(tiny_checkpoint, tmp_path):
    from tests.parity_utils import free_port

    broken = tmp_path / "broken.jinja"
    broken.write_text("{% for message in messages %}{{ message['role'] }}")  # an unclosed for
    for path, expected in ((tmp_path / "absent.jinja", "cannot read the chat template"),
                           (broken, "the chat template cannot render a one-line chat")):
        result = subprocess.run([sys.executable, "-m", "atb_models.serve", "--model_path", str(tiny_checkpoint()),
                                 "--chat_template", str(path), "--device", "cpu", "--dtype", "float32", "--port",
                                 str(free_port()), "--shm_name_save_path", str(tmp_path / "shm.txt")],
                                capture_output=True, text=True, timeout=300, cwd=tmp_path,
                                env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert result.returncode == 1 and expected in result.stderr, result.stderr
        assert "Traceback" not in result.stderr
