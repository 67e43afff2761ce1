"""The OpenAI-compatible server (python -m atb_models.serve), driven by the real `openai` client: its greedy
answers are LLM.generate's, plain, streamed and under 16 concurrent clients; bad requests get OpenAI's error JSON
with the right status and disturb nobody; a dropped stream is aborted and its KV blocks freed; /metrics parses;
SIGTERM exits 0 leaving nothing behind. One server serves the whole module (started once: the default run's time
is short); its 2-rank torchrun twin is in the slow set."""

from __future__ import annotations

import base64
import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import pytest
import requests

from tests.parity_utils import free_port

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "test-key"
# (room for a chat with tools: the tiny tokenizer spends a token on nearly every character of their JSON)
LIMITS = dict(max_input_length=1024, max_output_length=64, block_size=16)
SERVER_FLAGS = ["--dtype", "float32", "--device", "cpu", "--max_input_length", "1024", "--max_output_length", "64",
                "--block_size", "16", "--max_batch_size", "4", "--max_queue", "16", "--limit_mm_per_prompt", "image=2"]
MAX_TOKENS = 10
# The module's server and reference engine render chats with the kit's tool-use template (the checkpoint's own
# conversation format where no tools are given: tests/test_tools.py).
TOOL_TEMPLATE = ROOT / "examples" / "chat_templates" / "qwen2_vl_tool_use.jinja"
QUESTIONS = ["What is in the picture?", "Hello, what colour is the sky?", "Count: one two three", "Describe a cat.",
             "Zebra xylophone quartz", "12345", "Tell me a story.", "Why?"]


class Server:
    def __init__(self, process: subprocess.Popen, url: str, model: str, log: Path, tmp: Path):
        self.process, self.url, self.model, self.log, self.tmp = process, url, model, log, tmp

    def post(self, body: dict, key: str | None = API_KEY, **kwargs) -> requests.Response:
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        return requests.post(f"{self.url}/v1/chat/completions", json=body, headers=headers, timeout=60, **kwargs)

    def metrics(self) -> dict:
        from prometheus_client.parser import text_string_to_metric_families

        text = requests.get(f"{self.url}/metrics", timeout=10).text
        return {sample.name + _labels(sample.labels): sample.value
                for family in text_string_to_metric_families(text) for sample in family.samples}


def _labels(labels: dict) -> str:
    return "".join(f"[{k}={v}]" for k, v in sorted(labels.items()))


def start_server(command: list, env: dict, url: str, log: Path) -> subprocess.Popen:
    with open(log, "w") as out:
        process = subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT, cwd=str(log.parent))
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        assert process.poll() is None, log.read_text()
        try:
            if requests.get(f"{url}/health", timeout=2).status_code == 200:
                return process
        except (requests.ConnectionError, requests.Timeout):  # not listening yet, or a probe slowed by the load
            pass
        time.sleep(0.2)
    process.kill()
    raise AssertionError(f"the server did not come up: {log.read_text()}")


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint) -> Path:
    return tiny_checkpoint()


@pytest.fixture(scope="module")
def media(tmp_path_factory, sample_image_path) -> dict:
    """Two images and the folder file:// urls may name (one image inside; a link inside pointing out)."""
    from atb_models.demo.checkpoint import make_image

    allowed = tmp_path_factory.mktemp("allowed")
    small = allowed / "small.png"
    make_image(small, width=96, height=72, seed=3)
    outside = tmp_path_factory.mktemp("outside") / "secret.png"
    make_image(outside, width=64, height=64, seed=4)
    (allowed / "link.png").symlink_to(outside)
    return {"allowed": allowed, "small": small, "large": Path(sample_image_path), "outside": outside}


@pytest.fixture(scope="module")
def server(checkpoint, media, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve")
    (tmp / "tmpdir").mkdir()  # the server's TMPDIR: its request folders must all be gone at the end
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(ROOT), TMPDIR=str(tmp / "tmpdir"))
    command = [sys.executable, "-m", "atb_models.serve", "--model_path", str(checkpoint), "--port", str(port),
               "--api_key", API_KEY, "--allowed_local_media_path", str(media["allowed"]),
               "--shm_name_save_path", str(tmp / "shm_names.txt"), "--chat_template", str(TOOL_TEMPLATE),
               *SERVER_FLAGS]
    process = start_server(command, env, url, tmp / "server.log")
    yield Server(process, url, checkpoint.name, tmp / "server.log", tmp)
    if process.poll() is None:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def llm(checkpoint):
    from atb_models import LLM

    return LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=16, chat_template=str(TOOL_TEMPLATE),
               **LIMITS)


@pytest.fixture(scope="module")
def client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=API_KEY, max_retries=0, timeout=60)


def data_url(path: Path) -> str:
    kind = "png" if path.suffix == ".png" else "jpeg"
    return f"data:image/{kind};base64,{base64.b64encode(path.read_bytes()).decode()}"


def chat_message(question: str, image: Path | None = None, url: str | None = None) -> dict:
    if image is None and url is None:
        return {"role": "user", "content": question}
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": url or data_url(image)}},
                                        {"type": "text", "text": question}]}


def kit_request(question: str, image: Path | None = None) -> list:
    return ([{"image": str(image)}] if image is not None else []) + [{"text": question}]


def reference(llm, requests_: list, max_tokens: int = MAX_TOKENS, **params) -> list:
    from atb_models import SamplingParams

    return llm.generate(requests_, SamplingParams(max_tokens=max_tokens, **params))


def ask(client, model: str, message: dict, stream: bool, max_tokens: int = MAX_TOKENS, **extra):
    """(text, finish_reason, usage) of one chat completion, plain or streamed (deltas joined)."""
    messages = message if isinstance(message, list) else [message]
    extra.setdefault("temperature", 0)
    if not stream:
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens, **extra)
        return answer.choices[0].message.content, answer.choices[0].finish_reason, answer.usage
    chunks = list(client.chat.completions.create(model=model, messages=messages, max_tokens=max_tokens,
                                                 stream=True, stream_options={"include_usage": True}, **extra))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert len(reasons) == 1 and chunks[-1].choices == []
    return text, reasons[0], chunks[-1].usage


def assert_same(answer: tuple, expected) -> None:
    text, finish_reason, usage = answer
    assert text == expected.text
    assert finish_reason == expected.finish_reason
    assert usage.prompt_tokens == expected.prompt_token_count
    assert usage.completion_tokens == len(expected.token_ids)


def error_of(response: requests.Response, status: int) -> dict:
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert isinstance(error["message"], str) and error["message"] and isinstance(error["type"], str)
    assert "Traceback" not in error["message"]
    return error


# --------------------------------------------------------------------------------------------- answers


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_greedy_answers_equal_generate_with_text_and_with_an_image(server, client, llm, media, stream):
    expected = reference(llm, [kit_request(QUESTIONS[1]), kit_request(QUESTIONS[0], media["large"])])
    assert_same(ask(client, server.model, chat_message(QUESTIONS[1]), stream), expected[0])
    assert_same(ask(client, server.model, chat_message(QUESTIONS[0], media["large"]), stream), expected[1])


def test_usage_counts_the_prompt_tokens_a_repeated_image_took_from_the_prefix_cache(server, client, llm, media):
    question = "Which shapes are in this picture, exactly?"
    first, second = (ask(client, server.model, chat_message(question, media["large"]), False) for _ in range(2))
    expected = reference(llm, [kit_request(question, media["large"])])[0]
    assert_same(second, expected)
    assert second[2].prompt_tokens_details.cached_tokens > 0
    assert second[2].prompt_tokens_details.cached_tokens >= first[2].prompt_tokens_details.cached_tokens


def test_sixteen_concurrent_clients_with_text_and_images_get_generates_answers(server, client, llm, media):
    images = [None, media["small"], media["large"], None]
    cases = [(QUESTIONS[i % len(QUESTIONS)], images[i % 4], i % 2 == 1) for i in range(16)]
    expected = reference(llm, [kit_request(q, image) for q, image, _ in cases])
    with ThreadPoolExecutor(17) as pool:
        answers = [pool.submit(ask, client, server.model, chat_message(q, image), stream)
                   for q, image, stream in cases]
        # A bad request among them fails alone.
        bad = pool.submit(server.post, {"messages": [chat_message("x", url="data:image/png;base64,@@@")]})
        for answer, want in zip(answers, expected):
            assert_same(answer.result(), want)
        error_of(bad.result(), 400)


def test_a_system_prompt_and_a_multi_turn_history_answer_as_generate_on_the_conversation(server, client, llm):
    from atb_models import Message

    chat = [{"role": "system", "content": "You answer in one word."}, chat_message("Hello"),
            {"role": "assistant", "content": "Hi"}, chat_message(QUESTIONS[2])]
    conversation = [Message("system", ({"text": "You answer in one word."},)), Message("user", ({"text": "Hello"},)),
                    Message("assistant", ({"text": "Hi"},)), Message("user", ({"text": QUESTIONS[2]},))]
    expected, default_system = reference(llm, [conversation, kit_request(QUESTIONS[2])])
    assert_same(ask(client, server.model, chat, stream=False), expected)
    assert expected.prompt_token_count != default_system.prompt_token_count  # the system prompt was replaced


def test_continue_final_message_continues_the_assistants_last_message(server, client, llm):
    from atb_models import Message, SamplingParams

    chat = [chat_message(QUESTIONS[2]), {"role": "assistant", "content": "four five"}]
    conversation = [Message("user", ({"text": QUESTIONS[2]},)), Message("assistant", ({"text": "four five"},))]
    prompt = llm.preprocessor(conversation, continue_final_message=True)
    request_id = llm.add_request(prompt, SamplingParams(max_tokens=MAX_TOKENS))
    expected = [out for _ in range(MAX_TOKENS + 1) for out in llm.step() if out.finished][0]
    assert expected.request_id == request_id
    answer = ask(client, server.model, chat, False, extra_body={"continue_final_message": True,
                                                                "add_generation_prompt": False})
    assert_same(answer, expected)
    new_turn = ask(client, server.model, chat, False)
    assert new_turn[2].prompt_tokens == len(llm.preprocessor(conversation).token_ids) > expected.prompt_token_count


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_stop_string_ends_the_answer_before_it(server, client, llm, stream):
    full = reference(llm, [kit_request(QUESTIONS[3])], max_tokens=24, ignore_eos=True)[0].text
    stop = full[6:9]
    text, finish_reason, _ = ask(client, server.model, chat_message(QUESTIONS[3]), stream, max_tokens=24,
                                 stop=[stop], extra_body={"ignore_eos": True})
    assert (text, finish_reason) == (full[:full.index(stop)], "stop")


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_logprobs_and_top_logprobs_are_generates_with_each_tokens_bytes(server, client, llm, stream):
    expected = reference(llm, [kit_request(QUESTIONS[2])], max_tokens=8, ignore_eos=True, logprobs=2)[0]
    create = dict(model=server.model, messages=[chat_message(QUESTIONS[2])], max_tokens=8, temperature=0,
                  logprobs=True, top_logprobs=2, extra_body={"ignore_eos": True})
    if stream:
        chunks = [c for c in client.chat.completions.create(stream=True, **create) if c.choices]
        text = "".join(c.choices[0].delta.content or "" for c in chunks)
        content = [entry for c in chunks if c.choices[0].logprobs for entry in c.choices[0].logprobs.content]
    else:
        choice = client.chat.completions.create(**create).choices[0]
        text, content = choice.message.content, choice.logprobs.content
    assert text == expected.text and len(content) == len(expected.token_ids) == 8
    for entry, want in zip(content, expected.logprobs):
        token_text, raw = llm.token_bytes(want.token_id)
        assert (entry.token, bytes(entry.bytes)) == (token_text, raw)
        assert entry.logprob == pytest.approx(want.logprob, abs=1e-5)
        assert [(t.token, t.logprob) for t in entry.top_logprobs] == [
            (llm.token_bytes(i)[0], pytest.approx(v, abs=1e-5)) for i, v in want.top]
    answer = client.chat.completions.create(**dict(create, logprobs=False, top_logprobs=None))
    assert answer.choices[0].logprobs is None


def test_presence_and_frequency_penalties_answer_as_generate_with_them(server, client, llm):
    penalties = dict(presence_penalty=-1.0, frequency_penalty=-2.0)  # (this random model repeats nothing alone)
    expected = reference(llm, [kit_request(QUESTIONS[3])], max_tokens=12, ignore_eos=True, **penalties)[0]
    plain = reference(llm, [kit_request(QUESTIONS[3])], max_tokens=12, ignore_eos=True)[0]
    assert len(set(expected.token_ids)) < len(expected.token_ids) and expected.token_ids != plain.token_ids
    answer = ask(client, server.model, chat_message(QUESTIONS[3]), False, max_tokens=12,
                 extra_body={"ignore_eos": True}, **penalties)
    assert_same(answer, expected)


def plain_reference(llm, prompts: list, **params) -> list:
    """The engine's outputs for text-completion prompts (no chat template), each run to its end."""
    from atb_models import SamplingParams

    ids = [llm.add_request(llm.preprocessor.plain(prompt), SamplingParams(**params)) for prompt in prompts]
    done = {}
    while llm.has_unfinished():
        done.update((out.request_id, out) for out in llm.step() if out.finished)
    return [done[i] for i in ids]


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_completions_answer_as_the_engine_does_the_prompt_as_it_is(server, client, llm, stream):
    prompt = "The sky is blue and the grass is"
    expected = plain_reference(llm, [prompt], max_tokens=8, ignore_eos=True)[0]
    assert expected.prompt_token_count == len(llm.tokenizer(prompt)["input_ids"])  # no chat template around it
    create = dict(model=server.model, prompt=prompt, max_tokens=8, temperature=0, extra_body={"ignore_eos": True})
    if stream:
        chunks = list(client.completions.create(stream=True, stream_options={"include_usage": True}, **create))
        text = "".join(c.choices[0].text for c in chunks if c.choices)
        finish_reason = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        usage = chunks[-1].usage
    else:
        answer = client.completions.create(**create)
        assert answer.object == "text_completion" and answer.id.startswith("cmpl-")
        text, finish_reason, usage = answer.choices[0].text, answer.choices[0].finish_reason, answer.usage
    assert (text, finish_reason) == (expected.text, "length")
    assert (usage.prompt_tokens, usage.completion_tokens) == (expected.prompt_token_count, 8)


def test_use_beam_search_answers_n_choices_as_llm_beam_search_does(server, client, media, llm):
    """vLLM's use_beam_search: n answers by a beam search of width n, best first, as LLM.beam_search gives them
    (the searches run between the other requests' steps)."""
    from atb_models import BeamSearchParams

    [expected] = llm.beam_search([kit_request(QUESTIONS[0], media["small"])], BeamSearchParams(3, MAX_TOKENS))
    answer = client.chat.completions.create(model=server.model, messages=[chat_message(QUESTIONS[0], media["small"])],
                                            max_tokens=MAX_TOKENS, n=3, extra_body={"use_beam_search": True})
    assert [(c.message.content, c.finish_reason) for c in answer.choices] == [
        (s.text, s.finish_reason) for s in expected.sequences]
    assert answer.usage.prompt_tokens == expected.prompt_token_count
    assert answer.usage.completion_tokens == sum(len(s.token_ids) for s in expected.sequences)
    chunks = list(client.chat.completions.create(  # streamed: each answer whole once the search ends
        model=server.model, messages=[chat_message(QUESTIONS[0], media["small"])], max_tokens=MAX_TOKENS, n=3,
        stream=True, stream_options={"include_usage": True}, extra_body={"use_beam_search": True}))
    streamed = {}
    for chunk in chunks[:-1]:
        [choice] = chunk.choices
        text, reason = streamed.get(choice.index, ("", None))
        streamed[choice.index] = (text + (choice.delta.content or ""), choice.finish_reason or reason)
    assert [streamed[i] for i in range(3)] == [(c.message.content, c.finish_reason) for c in answer.choices]
    assert chunks[-1].usage.completion_tokens == answer.usage.completion_tokens
    prompts = ["The sky is", "Count: one two"]  # (plain prompts: the incremental API takes them preprocessed)
    ids = [llm.add_request(llm.preprocessor.plain(p), BeamSearchParams(2, 6, length_penalty=0.5)) for p in prompts]
    done = {}
    while llm.has_unfinished():
        done.update((out.request_id, out) for out in llm.step() if out.finished)
    answer = client.completions.create(model=server.model, prompt=prompts, max_tokens=6, n=2,
                                       extra_body={"use_beam_search": True, "length_penalty": 0.5})
    assert [c.text for c in answer.choices] == [s.text for i in ids for s in done[i].sequences]
    assert [c.index for c in answer.choices] == [0, 1, 2, 3]


def test_a_beam_search_request_counts_as_one_request_a_prompt_against_the_queue(server, client):
    """A beam search of width n is one engine request per prompt: its n are not n requests against the batch and
    --max_queue (2 prompts of n 16 are 2 requests, not 32 over this server's 20)."""
    answer = client.completions.create(model=server.model, prompt=["The sky is", "Count: one two"], max_tokens=2,
                                       n=16, extra_body={"use_beam_search": True})
    assert len(answer.choices) == 32


def test_a_zero_that_asks_for_something_is_refused_with_use_beam_search(server):
    """A completion's logprobs 0 asks for each chosen token's logprob (and seed 0 seeds a draw): with use_beam_search
    it is refused as logprobs 1 is, not taken for the default (0 == False) and silently ignored. temperature 0 (the
    kit's default, which vLLM's own beam search asked for) is taken."""
    url = f"{server.url}/v1/completions"
    body = {"prompt": "The sky is", "max_tokens": 2, "n": 2, "use_beam_search": True}
    for field in ("logprobs", "prompt_logprobs"):
        answer = requests.post(url, json={**body, field: 0}, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert f"without sampling: {field} cannot go with it" in error_of(answer, 400)["message"]
    answer = requests.post(url, json={**body, "temperature": 0}, headers={"Authorization": f"Bearer {API_KEY}"},
                           timeout=60)
    assert answer.status_code == 200 and len(answer.json()["choices"]) == 2


def test_a_beam_search_answer_observes_no_time_per_output_token(server, client):
    """A search's answers come whole, once it ends: there is no time between its tokens to observe (it was observed
    as 0 s a token, pulling the histogram down)."""
    before = server.metrics()
    client.completions.create(model=server.model, prompt="The sky is", max_tokens=6, n=2,
                              extra_body={"use_beam_search": True, "ignore_eos": True})
    after = server.metrics()
    assert after["atb_time_per_output_token_seconds_count"] == before["atb_time_per_output_token_seconds_count"]
    assert after["atb_time_to_first_token_seconds_count"] == before["atb_time_to_first_token_seconds_count"] + 1


def test_continuous_usage_stats_give_every_chunk_its_choices_usage_so_far(server, client, llm):
    """vLLM's stream_options.continuous_usage_stats: each chunk of a choice carries the prompt's tokens and the
    choice's generated so far (the chat's role chunk, before any token, null); the last chunk the total."""
    options = {"include_usage": True, "continuous_usage_stats": True}
    prompt = "The sky is blue and the grass is"
    expected = plain_reference(llm, [prompt], max_tokens=6, ignore_eos=True)[0]
    chunks = list(client.completions.create(model=server.model, prompt=prompt, max_tokens=6, temperature=0, n=2,
                                            stream=True, stream_options=options, extra_body={"ignore_eos": True}))
    counts = {0: [], 1: []}
    for chunk in chunks[:-1]:
        usage = chunk.usage
        assert usage.prompt_tokens == expected.prompt_token_count and usage.total_tokens == (
            usage.prompt_tokens + usage.completion_tokens)
        counts[chunk.choices[0].index].append(usage.completion_tokens)
    assert all(c == sorted(c) and c[-1] == 6 for c in counts.values()), counts
    assert chunks[-1].usage.completion_tokens == 12 and chunks[-1].choices == []
    chat = list(client.chat.completions.create(model=server.model, messages=[chat_message(QUESTIONS[0])],
                                               max_tokens=5, temperature=0, stream=True, stream_options=options,
                                               extra_body={"ignore_eos": True}))
    assert chat[0].usage is None and chat[0].choices[0].delta.role == "assistant"
    running = [c.usage.completion_tokens for c in chat[1:-1]]
    assert running == sorted(running) and running[-1] == 5 and chat[-1].usage.completion_tokens == 5
    assert {c.usage.prompt_tokens for c in chat[1:]} == {chat[-1].usage.prompt_tokens}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_a_prompt_scored_with_max_tokens_0_ends_by_its_length_whatever_ended_the_hidden_token(server, client, llm,
                                                                                            stream):
    """The engine draws one token that max_tokens 0 leaves out: a stop token or string in it ends nothing shown."""
    prompt = "Count: one two three"
    [hidden] = plain_reference(llm, [prompt], max_tokens=1)[0].token_ids
    stop = llm.tokenizer.decode([hidden])
    create = dict(model=server.model, prompt=prompt, max_tokens=0, echo=True, temperature=0)
    for fields in ({"stop_token_ids": [hidden]}, {"stop": [stop], "include_stop_str_in_output": True}):
        if stream:
            [choice] = [c.choices[0] for c in client.completions.create(stream=True, extra_body=fields, **create)]
        else:
            [choice] = client.completions.create(extra_body=fields, **create).choices
        choice = choice.model_dump()
        assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (prompt, "length", None), fields


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_echo_with_logprobs_and_no_tokens_scores_the_prompt_as_the_engine_does(server, client, llm, stream):
    """What a log-likelihood evaluation sends: each prompt token's logprob given those before it."""
    prompt = "Count: one two three"
    expected = plain_reference(llm, [prompt], max_tokens=1, prompt_logprobs=2)[0]
    create = dict(model=server.model, prompt=prompt, max_tokens=0, echo=True, logprobs=2, temperature=0)
    if stream:
        [chunk] = [c for c in client.completions.create(stream=True, **create) if c.choices]
        choice = chunk.choices[0]
    else:
        answer = client.completions.create(**create)
        choice = answer.choices[0]
        assert answer.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert choice.text == prompt and "".join(logprobs.tokens) == prompt
    token_ids = llm.preprocessor.plain(prompt).token_ids
    assert logprobs.tokens == [llm.token_bytes(t)[0] for t in token_ids]
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert logprobs.token_logprobs[1:] == pytest.approx([e.logprob for e in expected.prompt_logprobs[1:]], abs=1e-5)
    # The 2 most likely tokens, and the prompt's own token where it is not one of them (OpenAI's logprobs + 1).
    tops = [[llm.token_bytes(i)[0] for i, _ in e.top] for e in expected.prompt_logprobs[1:]]
    tops = [top + [token] * (token not in top) for top, token in zip(tops, logprobs.tokens[1:])]
    assert [list(top) for top in logprobs.top_logprobs[1:]] == tops and any(len(top) == 3 for top in tops)
    assert all(top[token] == lp for top, token, lp in zip(logprobs.top_logprobs[1:], logprobs.tokens[1:],
                                                          logprobs.token_logprobs[1:]))
    assert logprobs.text_offset == [sum(map(len, logprobs.tokens[:i])) for i in range(len(token_ids))]


def assert_prompt_logprobs(got: list, expected: list, llm, count: int) -> None:
    """vLLM's prompt_logprobs body against the engine's: null first, then the prompt token with its rank and the
    `count` most likely tokens, each with its logprob, rank and text."""
    assert got[0] is None and expected[0] is None and len(got) == len(expected)
    for listed, entry in zip(got[1:], expected[1:]):
        mine = listed[str(entry.token_id)]
        assert (mine["rank"], mine["decoded_token"]) == (entry.rank, llm.token_bytes(entry.token_id)[0])
        assert mine["logprob"] == pytest.approx(entry.logprob, abs=1e-5)
        assert list(listed)[0] == str(entry.token_id) and len(listed) == count + (entry.rank > count)
        for rank, (token, logprob) in enumerate(entry.top, start=1):
            assert listed[str(token)]["logprob"] == pytest.approx(logprob, abs=1e-5)
            assert listed[str(token)]["rank"] == (entry.rank if token == entry.token_id else rank)


def test_prompt_logprobs_on_both_apis_are_the_engines_and_refused_with_a_stream(server, llm):
    prompt = "Count: one two three"
    expected = plain_reference(llm, [prompt], max_tokens=2, prompt_logprobs=3)[0]
    response = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"prompt": prompt, "max_tokens": 2, "prompt_logprobs": 3, "echo": True,
                                   "logprobs": 1}, timeout=60).json()
    assert_prompt_logprobs(response["choices"][0]["prompt_logprobs"], expected.prompt_logprobs, llm, 3)
    # echo's logprobs still list one most likely token (and the prompt's own), computed once with the above
    assert all(len(top) <= 2 for top in response["choices"][0]["logprobs"]["top_logprobs"][1:])
    assert any(len(top) == 2 for top in response["choices"][0]["logprobs"]["top_logprobs"][1:])
    chat = [chat_message(QUESTIONS[7])]
    from atb_models.serve.protocol import parse_chat_request

    chat_expected = tool_reference(llm, parse_chat_request({"messages": chat}).messages, None, 3, prompt_logprobs=0)
    answer = server.post({"messages": chat, "max_tokens": 3, "prompt_logprobs": 0, "n": 2}).json()
    assert_prompt_logprobs(answer["prompt_logprobs"], chat_expected.prompt_logprobs, llm, 0)
    assert "prompt_logprobs" not in server.post({"messages": chat, "max_tokens": 1}).json()
    refused = server.post({"messages": chat, "prompt_logprobs": 1, "stream": True})
    assert "not available with stream" in error_of(refused, 400)["message"]


def test_echo_of_several_prompts_with_n_choices_and_generated_logprobs(server, llm):
    """Two prompts (one as token ids) of two choices each: choice index = prompt * n + i; each echoes its prompt
    and then its tokens, whose logprobs follow the prompt's; usage counts each prompt once."""
    ids = llm.preprocessor.plain("Why?").token_ids
    expected = plain_reference(llm, ["Hello there", ids], max_tokens=3, ignore_eos=True, logprobs=1,
                               prompt_logprobs=1)
    response = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"prompt": ["Hello there", ids], "max_tokens": 3, "n": 2, "echo": True,
                                   "logprobs": 1, "ignore_eos": True}, timeout=60)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert [c["index"] for c in answer["choices"]] == [0, 1, 2, 3]
    for choice, want, prompt_text in zip(answer["choices"], [e for e in expected for _ in range(2)],
                                         ["Hello there", "Hello there", "Why?", "Why?"]):
        assert choice["text"] == prompt_text + want.text
        entries = want.prompt_logprobs[1:] + want.logprobs
        assert choice["logprobs"]["token_logprobs"][1:] == pytest.approx([e.logprob for e in entries], abs=1e-5)
    usage = answer["usage"]
    assert usage["prompt_tokens"] == sum(e.prompt_token_count for e in expected) and usage["completion_tokens"] == 12


def test_completion_logprobs_0_list_each_drawn_token_as_its_own_top_logprob(server):
    """OpenAI's legacy logprobs always hold the sampled token among the most likely: with logprobs 0, it alone (an
    evaluation harness takes the largest of them to tell whether the answer was greedy)."""
    response = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                             json={"prompt": "Hello there", "max_tokens": 3, "logprobs": 0, "ignore_eos": True},
                             timeout=60)
    logprobs = response.json()["choices"][0]["logprobs"]
    assert logprobs["top_logprobs"] == [{token: lp} for token, lp in zip(logprobs["tokens"],
                                                                         logprobs["token_logprobs"])]


@pytest.mark.parametrize("body, expected", [({"prompt": "x", "max_tokens": 0}, "taken only with echo"),
                                            ({"prompt": "x", "max_tokens": 0, "echo": True, "min_tokens": 1},
                                             "min_tokens 1 asks for generated tokens: max_tokens 0 generates none"),
                                            ({"prompt": []}, "prompt must be a string"),
                                            ({"prompt": [[1, 2], "a", 3]}, "prompt must be a string"),
                                            ({"prompt": "a<|image_pad|>"}, "must not hold the vision placeholder"),
                                            ({"prompt": ["ok", [99999]]}, "prompt 1: the prompt's token ids"),
                                            ({"prompt": ["ok", "ok", [5] * 1100], "n": 2},
                                             "prompt 2: the prompt has 1100 tokens"),
                                            ({"prompt": "x", "suffix": "y"}, "suffix is not supported"),
                                            ({"prompt": "x", "best_of": 3}, "best_of 3 is not supported"),
                                            ({"prompt": "x", "logprobs": True}, "logprobs must be an integer"),
                                            ({"prompt": "x", "echo": 1}, "echo must be true or false"),
                                            ({"prompt": "x", "max_tokens": 0.0, "echo": True},
                                             "max_tokens must be an integer"),
                                            ({"prompt": ["x"] * 11, "n": 2}, "11 prompts of n 2 (22 requests)"),
                                            ({"messages": []}, "'messages': not a field")])
def test_completions_asked_wrongly_are_400s(server, body, expected):
    response = requests.post(f"{server.url}/v1/completions", headers={"Authorization": f"Bearer {API_KEY}"},
                             json=body, timeout=60)
    assert expected in error_of(response, 400)["message"]


SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]}},
          "required": ["ok", "colour"], "additionalProperties": False}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_response_format_json_schema_answers_as_generate_with_that_structured_output(server, client, llm, stream):
    from atb_models.engine.structured_output import StructuredOutput

    expected = reference(llm, [kit_request(QUESTIONS[1])], max_tokens=64, temperature=1.0, seed=3,
                         structured_output=StructuredOutput(json=SCHEMA))[0]
    assert expected.finish_reason == "stop" and set(json.loads(expected.text)) == {"ok", "colour"}
    answer = ask(client, server.model, chat_message(QUESTIONS[1]), stream, max_tokens=64, temperature=1.0, seed=3,
                 response_format={"type": "json_schema", "json_schema": {"name": "answer", "schema": SCHEMA}})
    assert_same(answer, expected)


def test_min_tokens_and_min_p_answer_as_generate_with_them(server, client, llm):
    eos = llm.model_config.eos_token_ids[0]
    extra = dict(min_tokens=5, min_p=0.05, top_k=0, logit_bias={eos: 30}, ignore_eos=False)
    expected = reference(llm, [kit_request(QUESTIONS[5])], max_tokens=12, temperature=1.0, seed=2, **extra)[0]
    assert len(expected.token_ids) == 6 and expected.finish_reason == "stop"  # eos as soon as min_tokens allow
    answer = ask(client, server.model, chat_message(QUESTIONS[5]), False, max_tokens=12, temperature=1.0, seed=2,
                 logit_bias={str(eos): 30}, extra_body=dict(min_tokens=5, min_p=0.05))
    assert_same(answer, expected)


def test_guided_choice_regex_and_grammar_hold_completions_to_them(server, client, llm):
    answer = client.completions.create(model=server.model, prompt="Is the sky blue?", max_tokens=8, n=3,
                                       temperature=1.0, seed=9, extra_body={"guided_choice": ["yes", "no"]})
    assert {c.text for c in answer.choices} <= {"yes", "no"} and {c.finish_reason for c in answer.choices} == {"stop"}
    answer = client.completions.create(model=server.model, prompt="A code:", max_tokens=16, temperature=1.0,
                                       seed=9, extra_body={"guided_regex": "[0-9]{3}-[a-z]{2}"})
    assert re.fullmatch("[0-9]{3}-[a-z]{2}", answer.choices[0].text)
    grammar = 'root ::= "[" item ("," item)* "]"\nitem ::= [a-c] | "x" [0-9]'  # (llama.cpp's GBNF, as vLLM's)
    answer = client.chat.completions.create(model=server.model, messages=[chat_message("A list:")], max_tokens=24,
                                            temperature=1.0, seed=3, extra_body={"guided_grammar": grammar})
    assert re.fullmatch(r"\[([a-c]|x[0-9])(,([a-c]|x[0-9]))*\]", answer.choices[0].message.content)
    assert answer.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_vllms_stop_and_token_fields_answer_as_generate_with_them_and_name_the_stop_reason(server, client, llm,
                                                                                           stream):
    plain = reference(llm, [kit_request(QUESTIONS[2])], max_tokens=12, ignore_eos=True)[0]
    word = llm.tokenizer.decode(plain.token_ids[1:2]).strip() or "x"
    fields = dict(include_stop_str_in_output=True, skip_special_tokens=False, bad_words=[word], ignore_eos=True)
    shaped = reference(llm, [kit_request(QUESTIONS[2])], max_tokens=12, **fields)[0].token_ids
    assert shaped != plain.token_ids
    fields["stop_token_ids"] = [next(t for i, t in enumerate(shaped) if i > 2 and t not in shaped[:i])]
    expected = reference(llm, [kit_request(QUESTIONS[2])], max_tokens=12, **fields)[0]
    create = dict(model=server.model, messages=[chat_message(QUESTIONS[2])], max_tokens=12, temperature=0,
                  extra_body=fields)
    if stream:
        chunks = [c.model_dump() for c in client.chat.completions.create(stream=True, **create)]
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        last = chunks[-1]["choices"][0]
    else:
        last = client.chat.completions.create(**create).model_dump()["choices"][0]
        text = last["message"]["content"]
    assert (text, last["finish_reason"], last["stop_reason"]) == (expected.text, "stop", expected.stop_reason)
    assert expected.finish_reason == "stop"
    expected = plain_reference(llm, ["The sky is"], max_tokens=6, allowed_token_ids=[11, 12])[0]
    assert set(expected.token_ids) <= {11, 12}
    answer = client.completions.create(model=server.model, prompt="The sky is", max_tokens=6, temperature=0,
                                       extra_body={"allowed_token_ids": [11, 12], "stop": ["never"]})
    choice = answer.model_dump()["choices"][0]
    assert (choice["text"], choice["finish_reason"], choice["stop_reason"]) == (expected.text, "length", None)


WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city", "parameters": {
        "type": "object", "properties": {"city": {"type": "string", "maxLength": 12}}, "required": ["city"],
        "additionalProperties": False}}}
CLOCK = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {}, "additionalProperties": False}}}
TOOLS = [WEATHER, CLOCK]


def tool_reference(llm, messages: list, tools: list, max_tokens: int = 40, **params):
    """generate's answer to a chat (the server's parsed messages) with `tools` shown by the template."""
    from atb_models import SamplingParams

    prompt = llm.preprocessor(list(messages), tools=tools)
    request_id = llm.add_request(prompt, SamplingParams(max_tokens=max_tokens, **params))
    done = {}
    while llm.has_unfinished():
        done.update((out.request_id, out) for out in llm.step() if out.finished)
    return done[request_id]


def calls_of(choice: dict) -> list:
    return [(call["function"]["name"], json.loads(call["function"]["arguments"]))
            for call in choice["message"]["tool_calls"]]


def stream_choice(server, body: dict) -> dict:
    """A streamed answer put together as a whole one's choice, as OpenAI's clients do: content joined, a call's
    first delta naming it (id, type, name), the others adding to its arguments."""
    response = server.post(dict(body, stream=True))
    assert response.status_code == 200, response.text
    chunks = [json.loads(line[6:]) for line in response.text.splitlines()
              if line.startswith("data: ") and line != "data: [DONE]"]
    choices = [chunk["choices"][0] for chunk in chunks]
    calls = []
    for delta in (d for c in choices for d in c["delta"].get("tool_calls", ())):
        if delta["index"] == len(calls):
            calls.append({"id": delta["id"], "type": delta["type"], "function": dict(delta["function"])})
        else:
            calls[delta["index"]]["function"]["arguments"] += delta["function"]["arguments"]
    content = "".join(c["delta"].get("content") or "" for c in choices)
    return {"message": {"content": content or None, "tool_calls": calls}, "finish_reason": choices[-1]["finish_reason"]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_tool_choice_auto_shows_the_tools_and_reads_the_models_calls_from_its_answer(server, llm, stream):
    """A random model never calls a function by itself: a regex holds its answer to text and a call in the Hermes
    form, which the server must read back as tool_calls."""
    from atb_models.engine.structured_output import StructuredOutput
    from atb_models.serve.protocol import parse_chat_request

    regex = r'O[a-z]{0,2}\n<tool_call>\{"name": "get_weather", "arguments": \{"city": "[A-Z][a-z]{1,3}"\}\}</tool_call>'
    body = {"messages": [chat_message("What is the weather in Paris?")], "tools": TOOLS, "max_tokens": 64,
            "guided_regex": regex}
    expected = tool_reference(llm, parse_chat_request(body).messages, TOOLS, 64,
                              structured_output=StructuredOutput(regex=regex))
    assert expected.finish_reason == "stop", expected.text
    if stream:
        choice = stream_choice(server, body)
    else:
        answer = server.post(body).json()
        choice = answer["choices"][0]
        assert answer["usage"]["prompt_tokens"] == expected.prompt_token_count
    city = json.loads(expected.text[expected.text.index("{"):expected.text.rindex("}") + 1])["arguments"]["city"]
    assert choice["message"]["content"] == expected.text[:expected.text.index("\n<tool_call>")]
    assert calls_of(choice) == [("get_weather", {"city": city})] and choice["finish_reason"] == "tool_calls"
    assert choice["message"]["tool_calls"][0]["id"].startswith("call_")
    without_tools = llm.preprocessor([chat_message_as_kit("What is the weather in Paris?")])
    assert expected.prompt_token_count > len(without_tools.token_ids) + 50  # the tools are in the prompt


def chat_message_as_kit(question: str):
    from atb_models.multimodal.prompt import Message

    return Message("user", ({"text": question},))


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_tool_choice_required_or_named_answers_with_calls_as_generate_with_their_constraint(server, llm, stream):
    from atb_models.serve.protocol import parse_chat_request

    for choice_field, finish in (("required", "tool_calls"),
                                 ({"type": "function", "function": {"name": "get_weather"}}, "stop")):
        body = {"messages": [chat_message("Weather or time?")], "tools": TOOLS, "tool_choice": choice_field,
                "max_tokens": 64, "parallel_tool_calls": False}
        parsed = parse_chat_request(body)
        expected = tool_reference(llm, parsed.messages, TOOLS, 64, structured_output=parsed.params.structured_output)
        assert expected.finish_reason == "stop", expected.text
        got = stream_choice(server, body) if stream else server.post(body).json()["choices"][0]
        if choice_field == "required":
            [call] = json.loads(expected.text)
            assert calls_of(got) == [(call["name"], call["parameters"])]
        else:  # (the arguments as the model wrote them, which a stream sent as they grew)
            assert got["message"]["tool_calls"][0]["function"] == {"name": "get_weather", "arguments": expected.text}
        assert (got["message"]["content"], got["finish_reason"]) == (None, finish)


def test_a_conversation_with_calls_made_and_their_results_answers_as_generate_on_it(server, llm):
    from atb_models.serve.protocol import parse_chat_request

    call = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    body = {"messages": [chat_message("Weather in Oslo?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                         {"role": "tool", "tool_call_id": "call_1", "content": "Rain, 8 degrees."}],
            "tools": TOOLS, "tool_choice": "none", "max_tokens": 12, "ignore_eos": True}
    expected = tool_reference(llm, parse_chat_request(body).messages, TOOLS, 12, ignore_eos=True)
    answer = server.post(body).json()
    assert answer["choices"][0]["message"]["content"] == expected.text
    assert answer["usage"]["prompt_tokens"] == expected.prompt_token_count
    prompt = llm.tokenizer.decode(llm.preprocessor(parse_chat_request(body).messages, tools=TOOLS).token_ids)
    assert ('<tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo"}}\n</tool_call>' in prompt
            and "<tool_response>\nRain, 8 degrees.\n</tool_response>" in prompt)


def test_logit_bias_answers_as_generate_with_it(server, client, llm):
    plain = reference(llm, [kit_request(QUESTIONS[4])], max_tokens=8, ignore_eos=True)[0]
    bias = {plain.token_ids[0]: -100, plain.token_ids[1]: 7.5}
    expected = reference(llm, [kit_request(QUESTIONS[4])], max_tokens=8, ignore_eos=True, logit_bias=bias)[0]
    assert expected.token_ids[0] != plain.token_ids[0]
    answer = ask(client, server.model, chat_message(QUESTIONS[4]), False, max_tokens=8,
                 logit_bias={str(token): value for token, value in bias.items()}, extra_body={"ignore_eos": True})
    assert_same(answer, expected)


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_n_choices_are_generates_answers_with_seed_plus_index(server, client, llm, stream):
    """Three sampled choices of one prompt: choice i is generate's answer with seed + i; usage counts the prompt
    once and every choice's tokens."""
    sampled = dict(temperature=1.5, top_k=20, ignore_eos=True)
    expected = [reference(llm, [kit_request(QUESTIONS[1])], max_tokens=6, seed=40 + i, **sampled)[0]
                for i in range(3)]
    assert len({tuple(e.token_ids) for e in expected}) > 1
    create = dict(model=server.model, messages=[chat_message(QUESTIONS[1])], max_tokens=6, n=3, seed=40,
                  temperature=1.5, extra_body={"top_k": 20, "ignore_eos": True})
    if stream:
        chunks = list(client.chat.completions.create(stream=True, stream_options={"include_usage": True}, **create))
        texts, reasons = ["", "", ""], [[], [], []]
        for c in chunks[:-1]:
            choice = c.choices[0]
            texts[choice.index] += choice.delta.content or ""
            reasons[choice.index] += [choice.finish_reason] if choice.finish_reason else []
        assert reasons == [["length"]] * 3 and chunks[-1].choices == []
        usage = chunks[-1].usage
    else:
        answer = client.chat.completions.create(**create)
        assert [c.index for c in answer.choices] == [0, 1, 2]
        texts, usage = [c.message.content for c in answer.choices], answer.usage
    assert texts == [e.text for e in expected]
    assert usage.prompt_tokens == expected[0].prompt_token_count and usage.completion_tokens == 18


def test_a_dropped_stream_of_n_choices_aborts_them_all_and_frees_their_blocks(server):
    aborted = 'atb_requests_finished_total[finish_reason=abort]'
    before = server.metrics().get(aborted, 0)
    body = {"messages": [chat_message(QUESTIONS[6])], "max_tokens": 64, "ignore_eos": True, "stream": True, "n": 4,
            "temperature": 1.0}
    with server.post(body, stream=True) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(9)]  # the four roles and a few tokens, then the client goes
    assert wait_for(lambda: server.metrics().get(aborted, 0) == before + 4)
    assert wait_for(lambda: server.metrics()["atb_kv_cache_blocks_used"] == 0)
    assert server.metrics()["atb_requests_running"] == 0


@pytest.mark.parametrize("body, expected", [({"top_logprobs": 2}, "needs logprobs"),
                                            ({"logprobs": True, "top_logprobs": 21}, "top_logprobs must be"),
                                            ({"logprobs": "yes"}, "logprobs must be true or false"),
                                            ({"n": 17}, "n must be an integer in 1..16"),
                                            ({"functions": [{"name": "f"}]}, "functions is not supported"),
                                            ({"presence_penalty": 3}, "presence_penalty must be a number in -2..2"),
                                            ({"stop": [str(i) for i in range(17)]}, "stop takes at most 16 strings"),
                                            ({"stop": "x" * 1025}, "of at most 1024 characters"),
                                            ({"logit_bias": {"5": 101}}, "logit_bias[5] must be a number in"),
                                            ({"logit_bias": {"a": 1}}, "keys must be token ids"),
                                            ({"logit_bias": {"7": 1, "07": 2}}, "names token id 7 twice"),
                                            ({"logit_bias": {"99999999": 1}}, "beyond the vocabulary"),
                                            ({"logit_bias": [1]}, "logit_bias must be an object"),
                                            ({"stop_token_ids": list(range(1025))}, "at most 1024 token ids"),
                                            ({"stream": True, "stream_options": {"continuous_usage_stats": True}},
                                             "continuous_usage_stats puts usage in every chunk: give include_usage"),
                                            ({"stream": True, "stream_options": {"include_usage": True, "x": 1}},
                                             "'x': not a field this server knows"),
                                            ({"stop_token_ids": [99999999]}, "beyond the vocabulary"),
                                            ({"allowed_token_ids": []}, "at least one token id"),
                                            ({"bad_words": ["x"] * 17}, "bad_words takes at most 16 words"),
                                            ({"bad_words": "x" * 1025}, "words of at most 1024 characters"),
                                            ({"bad_words": ["caf\udce9"]}, "holds a lone surrogate"),
                                            ({"skip_special_tokens": "no"}, "must be True or False"),
                                            ({"response_format": {"type": "xml"}}, "response_format must be"),
                                            ({"response_format": {"type": "json_schema", "json_schema": {
                                                "name": "x", "schema": {"type": "foo"}}}}, "Invalid type: foo"),
                                            ({"guided_regex": "a", "guided_choice": ["b"]}, "give one of them"),
                                            ({"guided_json": {"$ref": "#"}}, "admits no answer"),
                                            ({"guided_choice": "yes"}, "guided_choice: choice must be a list"),
                                            ({"use_beam_search": True, "logprobs": True}, "use_beam_search ranks "
                                             "answers by their log-probabilities, without sampling: logprobs"),
                                            ({"use_beam_search": True, "temperature": 0.7, "top_p": 0.5},
                                             "without sampling: temperature, top_p cannot go with it"),
                                            ({"use_beam_search": True, "seed": 0},
                                             "without sampling: seed cannot go with it"),
                                            ({"use_beam_search": True, "skip_special_tokens": False},
                                             "without sampling: skip_special_tokens cannot go with it"),
                                            ({"length_penalty": 2.0}, "length_penalty goes with use_beam_search"),
                                            ({"use_beam_search": True, "early_stopping": "soon"},
                                             "early_stopping must be False, True or \"never\""),
                                            ({"guided_grammar": 'root ::= "a" b'}, "the structured output cannot be "
                                             "used: Failed to convert the grammar from GBNF to Lark: Rule 'b'"),
                                            ({"continue_final_message": True}, "must be the assistant's"),
                                            ({"continue_final_message": True, "add_generation_prompt": True},
                                             "one of them"),
                                            ({"add_generation_prompt": False}, "only with continue_final_message"),
                                            ({"guided_json": json.loads('{"properties": {"a": ' * 130 + '{}'
                                                                        + '}}' * 130)}, "recursion limit")])
def test_logprobs_asked_wrongly_and_fields_the_kit_cannot_honour_are_400s(server, body, expected):
    assert expected in error_of(server.post({"messages": [chat_message("hi")], **body}), 400)["message"]


def test_a_file_url_inside_the_allowed_folder_is_read(server, client, llm, media):
    expected = reference(llm, [kit_request(QUESTIONS[0], media["small"])])[0]
    message = chat_message(QUESTIONS[0], url=media["small"].as_uri())
    assert_same(ask(client, server.model, message, stream=False), expected)


MEDIA_OPTIONS = {"min_pixels": 28 * 28 * 4, "max_pixels": 28 * 28 * 8, "fps": 2.0}


def media_message(question: str, image: Path | None, video: Path | None) -> dict:
    video_url = f"data:video/mp4;base64,{base64.b64encode(video.read_bytes()).decode()}" if video else None
    return {"role": "user", "content": [
        *([{"type": "image_url", "image_url": {"url": data_url(image)}}] if image else []),
        *([{"type": "video_url", "video_url": {"url": video_url}}] if video else []),
        {"type": "text", "text": question}]}


@pytest.mark.parametrize("stream", [False, True], ids=["plain", "streamed"])
def test_mm_processor_kwargs_answer_as_generate_with_each_items_own_keys(server, client, llm, media,
                                                                         sample_video_path, stream):
    """vLLM's request field: min_pixels and max_pixels for every image, max_pixels and fps for every video, as if
    each item said them itself."""
    image = {"image": str(media["large"]), "min_pixels": MEDIA_OPTIONS["min_pixels"],
             "max_pixels": MEDIA_OPTIONS["max_pixels"]}
    video = {"video": str(sample_video_path), "max_pixels": MEDIA_OPTIONS["max_pixels"], "fps": MEDIA_OPTIONS["fps"]}
    cases = [(media["large"], None, [image]), (None, sample_video_path, [video]),
             (media["large"], sample_video_path, [image, video])]
    expected = reference(llm, [items + [{"text": QUESTIONS[0]}] for _, _, items in cases])
    for (image_path, video_path, _), want in zip(cases, expected):
        assert_same(ask(client, server.model, media_message(QUESTIONS[0], image_path, video_path), stream,
                        extra_body={"mm_processor_kwargs": MEDIA_OPTIONS}), want)
    # (the options changed the media: their prompts are shorter than without them)
    plain = reference(llm, [[{"image": str(media["large"])}, {"text": QUESTIONS[0]}],
                            [{"video": str(sample_video_path)}, {"text": QUESTIONS[0]}]], max_tokens=1)
    assert [out.prompt_token_count for out in plain] > [out.prompt_token_count for out in expected[:2]]


@pytest.mark.parametrize("options, expected", [
    ([1], "mm_processor_kwargs must be an object such as {\"max_pixels\": 200704}, got [1]"),
    ({"max_pixels": 100, "size": 1, "do_resize": False},
     "mm_processor_kwargs: 'do_resize', 'size': not a key this server honours; it reads fps, max_pixels, min_pixels"),
    ({"max_pixels": 100}, "mm_processor_kwargs: max_pixels must be at least 784 (one 28x28 token), got 100"),
    ({"max_pixels": 2000.5}, "mm_processor_kwargs: max_pixels must be a whole number of pixels, got 2000.5"),
    ({"min_pixels": 60000}, "mm_processor_kwargs: min_pixels 60000 is more than max_pixels in "
                            "preprocessor_config.json 50176"),
    ({"min_pixels": 5000, "max_pixels": 4000}, "mm_processor_kwargs: min_pixels 5000 is more than max_pixels 4000"),
    ({"fps": 0}, "mm_processor_kwargs: fps must be a positive number of frames per second, got 0"),
    ({"fps": "2"}, "mm_processor_kwargs: fps must be a positive number of frames per second, got '2'"),
])
def test_mm_processor_kwargs_the_server_cannot_honour_are_a_400_naming_them(server, options, expected):
    """Checked whether or not the request holds media, as the flags are checked, never ignored."""
    body = {"messages": [chat_message("hi")], "mm_processor_kwargs": options, "max_tokens": 2}
    assert error_of(server.post(body), 400)["message"] == expected


def test_mm_processor_kwargs_null_asks_for_nothing(server, client, llm):
    expected = reference(llm, [kit_request(QUESTIONS[1])])[0]
    assert_same(ask(client, server.model, chat_message(QUESTIONS[1]), False,
                    extra_body={"mm_processor_kwargs": {"max_pixels": None}}), expected)


def test_tokenize_counts_a_prompt_or_a_chat_as_they_are_answered_and_detokenize_reverses_it(server, llm, media):
    def post(path: str, body: dict) -> requests.Response:
        return requests.post(f"{server.url}{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                             timeout=60)

    plain = post("/tokenize", {"prompt": "The sky is blue."}).json()
    assert plain["tokens"] == llm.preprocessor.plain("The sky is blue.").token_ids
    assert plain["count"] == len(plain["tokens"]) and plain["max_model_len"] == 1024 + 64
    chat = post("/tokenize", {"model": server.model, "messages": [chat_message(QUESTIONS[0], media["small"])]})
    assert chat.json()["tokens"] == llm.preprocessor(kit_request(QUESTIONS[0], media["small"])).token_ids
    smaller = post("/tokenize", {"messages": [chat_message(QUESTIONS[0], media["small"])],
                                 "mm_processor_kwargs": {"max_pixels": 28 * 28 * 6}}).json()["tokens"]
    assert smaller == llm.preprocessor([{"image": str(media["small"]), "max_pixels": 28 * 28 * 6},
                                        {"text": QUESTIONS[0]}]).token_ids
    assert len(smaller) < len(chat.json()["tokens"])
    assert "not with a prompt" in error_of(post("/tokenize", {"prompt": "a", "mm_processor_kwargs": {"fps": 1}}),
                                           400)["message"]
    with_tools = post("/tokenize", {"messages": [chat_message(QUESTIONS[1])], "tools": TOOLS}).json()["tokens"]
    assert with_tools == llm.preprocessor([chat_message_as_kit(QUESTIONS[1])], tools=TOOLS).token_ids
    assert len(with_tools) > len(llm.preprocessor([chat_message_as_kit(QUESTIONS[1])]).token_ids)
    assert "tools go with messages" in error_of(post("/tokenize", {"prompt": "a", "tools": TOOLS}), 400)["message"]
    assert post("/detokenize", {"tokens": plain["tokens"]}).json() == {"prompt": "The sky is blue."}
    assert "give either prompt" in error_of(post("/tokenize", {"prompt": "a", "messages": []}), 400)["message"]
    assert "outside the vocabulary" in error_of(post("/detokenize", {"tokens": [10**6]}), 400)["message"]
    assert "must be a list of token ids" in error_of(post("/detokenize", {"tokens": "12"}), 400)["message"]
    assert "more than max_model_len 1088" in error_of(post("/detokenize", {"tokens": [1] * 1089}), 400)["message"]
    assert post("/detokenize", {"tokens": [1] * 1088}).status_code == 200
    assert error_of(post("/detokenize", {"tokens": [1], "model": "other"}), 404)["code"] == "model_not_found"
    assert requests.post(f"{server.url}/tokenize", json={"prompt": "a"}, timeout=60).status_code == 401


def test_models_lists_the_served_name_and_health_is_ok(server, client):
    assert [(m.id, m.max_model_len) for m in client.models.list().data] == [(server.model, 1024 + 64)]
    assert requests.get(f"{server.url}/health", timeout=10).status_code == 200


# --------------------------------------------------------------------------------------------- errors


def bad_bodies(media) -> dict:
    corrupt = "data:image/png;base64," + base64.b64encode(b"\x89PNG not really an image").decode()
    return {
        "a lone surrogate": [{"role": "user", "content": "caf\ud800"}],
        "a NUL in a file url": [chat_message("?", url=(media["allowed"] / "x").as_uri() + "%00.png")],
        "invalid base64": [chat_message("?", url="data:image/png;base64,not*base64")],
        "corrupt image": [chat_message("?", url=corrupt)],
        "http url": [chat_message("?", url="http://example.com/cat.png")],
        "file outside the folder": [chat_message("?", url=media["outside"].as_uri())],
        "link out of the folder": [chat_message("?", url=(media["allowed"] / "link.png").as_uri())],
        "prompt too long": [chat_message("x " * 1100)],
        "empty messages": [],
        "unknown part": [{"role": "user", "content": [{"type": "audio_url", "audio_url": {"url": "data:,"}}]}],
    }


@pytest.mark.parametrize("case", ["a lone surrogate", "a NUL in a file url", "invalid base64", "corrupt image",
                                  "http url", "file outside the folder", "link out of the folder", "prompt too long",
                                  "empty messages", "unknown part"])
def test_a_bad_request_is_a_400_in_openais_error_shape(server, media, case):
    error_of(server.post({"messages": bad_bodies(media)[case], "max_tokens": 4}), 400)


def test_a_request_over_limit_mm_per_prompt_is_a_400_naming_the_count_and_the_flag(server, media):
    images = [{"type": "image_url", "image_url": {"url": data_url(media["small"])}}] * 3
    for path in ("/v1/chat/completions", "/tokenize"):
        response = requests.post(f"{server.url}{path}", json={"messages": [{"role": "user", "content": images}]},
                                 headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60)
        assert error_of(response, 400)["message"] == ("the request holds 3 images, more than --limit_mm_per_prompt "
                                                      "image=2 allows")


@pytest.mark.parametrize("field", ["typical_p", "best_of", "guided_whitespace_pattern", "echo", "foo"])
def test_a_field_the_server_does_not_read_is_a_400_naming_it_not_ignored(server, field):
    assert repr(field) in error_of(server.post({"messages": [chat_message("hi")], field: 1}), 400)["message"]


def test_a_body_nested_too_deeply_for_the_json_parser_is_a_400(server):
    body = '{"a":' * 100_000 + "1" + "}" * 100_000
    response = requests.post(f"{server.url}/v1/chat/completions", data=body, timeout=60,
                             headers={"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"})
    assert "nested too deeply" in error_of(response, 400)["message"]


@pytest.mark.parametrize("max_tokens", [0, -3])
def test_max_tokens_below_one_is_a_400(server, max_tokens):
    assert "max_tokens" in error_of(server.post({"messages": [chat_message("hi")], "max_tokens": max_tokens}),
                                    400)["message"]


@pytest.mark.parametrize("given,expected", [({"max_completion_tokens": None, "max_tokens": 5}, 5),
                                            ({"max_completion_tokens": 5, "max_tokens": None}, 5),
                                            ({"max_completion_tokens": 5, "max_tokens": 5}, 5), ({}, None)])
def test_max_tokens_comes_from_either_name_a_null_one_asking_for_nothing(given, expected):
    from atb_models.serve.protocol import parse_chat_request

    assert parse_chat_request({"messages": [chat_message("hi")], **given}).params.max_tokens == expected


@pytest.mark.parametrize("limit,expected", [(None, 16), (64, 16), (8, 8)])
def test_a_completion_without_max_tokens_takes_16_or_the_servers_limit_if_lower(limit, expected):
    """OpenAI's default of 16 tokens, bounded by --max_output_length: a request that gives no max_tokens is not
    refused for exceeding a limit it never asked past."""
    from atb_models.serve.completions import parse_completion_request

    assert parse_completion_request({"prompt": "hi"}, limit).params.max_tokens == expected
    assert parse_completion_request({"prompt": "hi", "max_tokens": 12}, limit).params.max_tokens == 12


@pytest.mark.parametrize("response_format, unread", [
    ({"type": "json_object", "schema": {"type": "object"}}, "schema"),  # (other APIs' way to give the schema)
    ({"type": "json_schema", "json_schema": {"name": "x", "schemas": {"type": "object"}}}, "json_schema.schemas")])
def test_a_response_format_key_the_server_does_not_read_is_a_400_not_ignored(response_format, unread):
    from atb_models.serve.fields import ApiError
    from atb_models.serve.protocol import parse_chat_request

    with pytest.raises(ApiError, match=f"response_format: {unread} is not a field") as refused:
        parse_chat_request({"messages": [chat_message("hi")], "response_format": response_format})
    assert refused.value.status == 400
    openai = {"type": "json_schema", "json_schema": {"name": "x", "description": "d", "strict": True,
                                                     "schema": {"type": "object"}}}
    assert parse_chat_request({"messages": [chat_message("hi")], "response_format": openai}).params.structured_output \
        .json == '{"type": "object"}'


def test_a_logit_bias_of_more_token_ids_than_the_limit_is_a_400():
    # (each entry is added to every step's logits of the request)
    from atb_models.serve.fields import ApiError
    from atb_models.serve.protocol import MAX_LOGIT_BIAS_ENTRIES, parse_chat_request

    bias = {str(token): 1 for token in range(MAX_LOGIT_BIAS_ENTRIES + 1)}
    with pytest.raises(ApiError, match=f"logit_bias takes at most {MAX_LOGIT_BIAS_ENTRIES} token ids, got 1025"):
        parse_chat_request({"messages": [chat_message("hi")], "logit_bias": bias})
    bias.pop("0")
    assert len(parse_chat_request({"messages": [chat_message("hi")], "logit_bias": bias}).params.logit_bias) == 1024


def test_max_tokens_and_max_completion_tokens_that_differ_are_a_400_naming_both():
    from atb_models.serve.fields import ApiError
    from atb_models.serve.protocol import parse_chat_request

    with pytest.raises(ApiError, match="max_completion_tokens 3 and max_tokens 5 differ") as refused:
        parse_chat_request({"messages": [chat_message("hi")], "max_completion_tokens": 3, "max_tokens": 5})
    assert refused.value.status == 400


def test_an_unknown_model_is_a_404_and_a_missing_or_wrong_key_a_401(server):
    assert error_of(server.post({"model": "gpt-4", "messages": [chat_message("hi")]}), 404)["code"] == \
        "model_not_found"
    error_of(server.post({"messages": [chat_message("hi")]}, key=None), 401)
    error_of(server.post({"messages": [chat_message("hi")]}, key="wrong"), 401)
    # the scheme's name in any case (RFC 9110), the key exactly
    for header in (f"bearer {API_KEY}", f"BEARER {API_KEY}"):
        assert requests.post(f"{server.url}/v1/chat/completions", json={"messages": [chat_message("hi")],
                             "max_tokens": 2}, headers={"Authorization": header}, timeout=60).status_code == 200
    error_of(requests.post(f"{server.url}/v1/chat/completions", json={"messages": [chat_message("hi")]},
                           headers={"Authorization": f"Bearer {API_KEY.upper()}x"}, timeout=60), 401)
    assert requests.get(f"{server.url}/v1/models", timeout=10).status_code == 401


def test_a_full_waiting_queue_is_a_503_with_retry_after(server):
    # 4 run at once and 16 may wait: of 28 long requests arriving together, some must be refused.
    body = {"messages": [chat_message("Tell me a long story.")], "max_tokens": 64, "ignore_eos": True}
    with ThreadPoolExecutor(28) as pool:
        responses = list(pool.map(lambda _: server.post(body), range(28)))
    refused = [r for r in responses if r.status_code == 503]
    assert refused and all(r.headers.get("Retry-After") for r in refused)
    assert error_of(refused[0], 503)["code"] == "queue_full"
    assert all(r.status_code == 200 for r in responses if r.status_code != 503)


# --------------------------------------------------------------------------------------------- aborts and metrics


def wait_for(condition, timeout: float = 15.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.05)
    return False


def test_a_dropped_stream_is_aborted_its_blocks_freed_and_the_server_still_answers(server, client, llm):
    aborted = 'atb_requests_finished_total[finish_reason=abort]'
    before = server.metrics().get(aborted, 0)
    body = {"messages": [chat_message(QUESTIONS[6])], "max_tokens": 64, "ignore_eos": True, "stream": True}
    with server.post(body, stream=True) as response:
        lines = response.iter_lines()
        assert [next(lines) for _ in range(5)]  # a few chunks, then the client goes
    assert wait_for(lambda: server.metrics().get(aborted, 0) == before + 1)
    assert wait_for(lambda: server.metrics()["atb_kv_cache_blocks_used"] == 0)
    assert server.metrics()["atb_requests_running"] == 0
    assert_same(ask(client, server.model, chat_message(QUESTIONS[1]), stream=True),
                reference(llm, [kit_request(QUESTIONS[1])])[0])


@pytest.mark.parametrize("path", ["chat/completions", "completions"])
def test_a_client_that_leaves_a_whole_answer_is_aborted_without_a_traceback_in_the_log(server, path):
    aborted = 'atb_requests_finished_total[finish_reason=abort]'
    before = server.metrics().get(aborted, 0)
    body = {"max_tokens": 64, "ignore_eos": True, "n": 2}
    body.update({"messages": [chat_message(QUESTIONS[6])]} if path.startswith("chat") else {"prompt": QUESTIONS[6]})
    with pytest.raises(requests.exceptions.ReadTimeout):
        requests.post(f"{server.url}/v1/{path}", json=body, headers={"Authorization": f"Bearer {API_KEY}"},
                      timeout=0.05)
    assert wait_for(lambda: server.metrics().get(aborted, 0) == before + 2)
    assert wait_for(lambda: server.metrics()["atb_kv_cache_blocks_used"] == 0)
    # (asyncio logs an unread exception when its future is collected, soon after the handler ends)
    assert not wait_for(lambda: "never retrieved" in server.log.read_text(), timeout=1.0)


def test_metrics_parse_and_count_tokens_and_latencies(server):
    metrics = server.metrics()
    assert metrics["atb_prompt_tokens_total"] > 0 and metrics["atb_generation_tokens_total"] > 0
    assert metrics["atb_time_to_first_token_seconds_count"] > 0
    assert metrics["atb_time_per_output_token_seconds_count"] > 0
    assert metrics["atb_kv_cache_blocks_total"] > 0
    assert {"atb_requests_running", "atb_requests_waiting", "atb_kv_cache_blocks_used"} <= set(metrics)


def test_a_busy_port_is_one_line_and_exit_1(server, checkpoint):
    port = int(server.url.rsplit(":", 1)[1])
    done = subprocess.run([sys.executable, "-m", "atb_models.serve", "--model_path", str(checkpoint), "--port",
                           str(port)], env=dict(os.environ, PYTHONPATH=str(ROOT)), capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == [f"Error: cannot listen on 127.0.0.1:{port}: Address already in use "
                                                "(another server?): pick another --port"]


def test_benchmark_serve_reports_each_concurrency_level_against_a_running_server(server, tmp_path):
    done = subprocess.run([sys.executable, "-m", "atb_models.benchmark", "serve", "--url", server.url, "--api_key",
                           API_KEY, "--preset", "tiny", "--concurrency", "1,4", "--num_requests", "4"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), ATB_MODELS_HOME=str(tmp_path)),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0].isdigit()]
    assert [(row[0], row[1]) for row in rows] == [("1", "4"), ("4", "4")]
    assert all(float(row[3]) > 0 for row in rows)  # output tokens/s


def test_compare_generate_alternates_server_and_generate_runs_and_reports_the_median_ratio(server):
    from atb_models.benchmark import serve_bench

    calls = []

    class Generate:  # stands for GenerateRun: records when it ran, between the server's runs
        def tokens_per_second(self) -> float:
            calls.append(time.perf_counter())
            return 10.0 * len(calls)

    bodies = [{"model": server.model, "messages": [chat_message(q)], "max_tokens": 4, "temperature": 0,
               "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}
              for q in QUESTIONS * 2]
    line = serve_bench.compare_with_generate(server.url, server.model, bodies, API_KEY, Generate(), repeats=2)
    assert len(calls) == 2
    served = [float(x) for x in line.split("(median of 2 paired runs: ")[1].rstrip(")").split(", ")]
    assert line.startswith("serve_vs_generate[c16]: server ") and served[0] > 0 and served[1] > 0


def test_the_serve_vs_generate_line_takes_medians_of_the_pairs():
    from atb_models.benchmark.serve_bench import serve_vs_generate_line

    assert serve_vs_generate_line([(40.0, 50.0), (45.0, 45.0), (30.0, 20.0)]) == (
        "serve_vs_generate[c16]: server 40.0 output tok/s, LLM.generate 45.0 output tok/s, ratio 1.000 (median of 3 "
        "paired runs: 0.800, 1.000, 1.500)")


def test_compare_generate_against_a_server_it_did_not_start_is_one_line_and_exit_1(tmp_path):
    done = subprocess.run([sys.executable, "-m", "atb_models.benchmark", "serve", "--url", "http://127.0.0.1:9",
                           "--preset", "tiny", "--compare_generate"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), ATB_MODELS_HOME=str(tmp_path)),
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert done.stderr.strip().splitlines() == ["Error: --compare_generate needs a server the benchmark starts (no "
                                                "--url) and --num_requests of at least 16"]


def test_sigterm_stops_the_server_with_status_0_and_leaves_nothing_behind(server):
    # Last in the module: it stops the module's server.
    server.process.send_signal(signal.SIGTERM)
    assert server.process.wait(timeout=30) == 0, server.log.read_text()
    assert "Traceback" not in server.log.read_text()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("atbm_")]
    assert os.listdir(server.tmp / "tmpdir") == []
    assert not (server.tmp / "shm_names.txt").exists()


def test_requests_running_past_the_shutdown_grace_end_with_a_whole_answer_a_503_or_an_error_event(checkpoint,
                                                                                                  tmp_path):
    """SIGTERM with long requests running: after --shutdown_grace they are aborted, and each client still gets an
    answer it can read (a 503 in OpenAI's shape; a stream's error event, then [DONE]), not a cut connection."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    flags = [f if f != "64" else "4000" for f in SERVER_FLAGS]  # (--max_output_length: answers long enough)
    command = [sys.executable, "-m", "atb_models.serve", "--model_path", str(checkpoint), "--port", str(port),
               "--shutdown_grace", "1", "--shm_name_save_path", str(tmp_path / "shm_names.txt"), *flags]
    process = start_server(command, dict(os.environ, PYTHONPATH=str(ROOT)), url, tmp_path / "server.log")
    body = {"messages": [chat_message("Tell me a long story.")], "max_tokens": 4000, "ignore_eos": True}
    try:
        # (this server renders chats with the checkpoint's template, which shows the model no tools)
        refused = requests.post(f"{url}/v1/chat/completions", json=dict(body, tools=TOOLS), timeout=60)
        assert "shows the model no tools" in error_of(refused, 400)["message"]
        call = {"id": "c", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}
        history = [chat_message("Time?"), {"role": "assistant", "content": None, "tool_calls": [call]},
                   {"role": "tool", "tool_call_id": "c", "content": "noon"}]
        refused = requests.post(f"{url}/v1/chat/completions", json={"messages": history, "max_tokens": 2}, timeout=60)
        assert "does not show an assistant's tool calls" in error_of(refused, 400)["message"]
        with ThreadPoolExecutor(2) as pool:
            whole = pool.submit(requests.post, f"{url}/v1/chat/completions", json=body, timeout=120)
            streamed = pool.submit(requests.post, f"{url}/v1/chat/completions", json=dict(body, stream=True),
                                   timeout=120)
            assert wait_for(lambda: _metric(url, "atb_requests_running") == 2, timeout=60)
            process.send_signal(signal.SIGTERM)  # (one signal: a second would force uvicorn's exit)
            assert "shutting down" in error_of(whole.result(), 503)["message"]
            events = [line for line in streamed.result().text.splitlines() if line.startswith("data: ")]
        status = process.wait(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert events[-1] == "data: [DONE]" and "shutting down" in json.loads(events[-2][6:])["error"]["message"]
    assert status == 0 and "Traceback" not in (tmp_path / "server.log").read_text()


def _metric(url: str, name: str) -> float | None:
    for line in requests.get(f"{url}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    return None


# --------------------------------------------------------------------------------------------- tensor parallelism


@pytest.mark.slow
def test_benchmark_serve_starts_its_server_and_compares_it_with_generate(tmp_path):
    done = subprocess.run([sys.executable, "-m", "atb_models.benchmark", "serve", "--preset", "tiny",
                           "--concurrency", "16", "--compare_generate", "--repeats", "2"],
                          env=dict(os.environ, PYTHONPATH=str(ROOT), ATB_MODELS_HOME=str(tmp_path)),
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    closing = done.stdout.strip().splitlines()[-1]
    assert closing.startswith("serve_vs_generate[c16]: server ") and "(median of 2 paired runs: " in closing
    assert float(closing.split(" ratio ")[1].split()[0]) > 0


@pytest.mark.slow
def test_a_two_rank_server_under_torchrun_gives_the_same_answers_and_stops_cleanly(checkpoint, llm, media, tmp_path):
    import openai

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, MASTER_PORT=str(free_port()), OMP_NUM_THREADS="1")
    command = ["bash", str(ROOT / "examples" / "models" / "qwen2_vl" / "run_server.sh"), "--world_size", "2",
               "--model_path", str(checkpoint), "--port", str(port), "--shm_name_save_path",
               str(tmp_path / "shm_names.txt"), *SERVER_FLAGS]
    process = start_server(command, env, url, tmp_path / "server.log")
    try:
        client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=120)
        cases = [(QUESTIONS[i], [None, media["large"], media["small"]][i % 3], i % 2 == 0) for i in range(6)]
        expected = reference(llm, [kit_request(q, image) for q, image, _ in cases])
        with ThreadPoolExecutor(6) as pool:
            answers = [pool.submit(ask, client, checkpoint.name, chat_message(q, image), stream)
                       for q, image, stream in cases]
            for answer, want in zip(answers, expected):
                assert_same(answer.result(), want)
    finally:
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
    assert status == 128 + signal.SIGTERM, (tmp_path / "server.log").read_text()
    assert "Traceback" not in (tmp_path / "server.log").read_text()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("atbm_")]
    assert not (tmp_path / "shm_names.txt").exists()


# --------------------------------------------------------------------------------------------- the engine loop


class _IdleOrBusyLLM:
    def __init__(self, busy: bool, max_batch_size: int = 4):
        self.busy = busy
        self.scheduler = SimpleNamespace(max_batch_size=max_batch_size, running=[object()] if busy else [],
                                         waiting=[])

    def has_unfinished(self) -> bool:
        return self.busy


def _engine_loop(busy: bool):
    from atb_models.serve.engine import EngineLoop

    engine = EngineLoop(lambda: None, metrics=None, world_size=1, on_fatal=lambda: None)
    engine.llm = _IdleOrBusyLLM(busy)
    return engine


def _submit_later(engine, request, seconds: float, then_prepared: bool) -> threading.Timer:
    def arrive():
        engine.submit(request, lambda event: None)
        if then_prepared:
            engine.preparing -= 1

    timer = threading.Timer(seconds, arrive)
    timer.start()
    return timer


@pytest.mark.parametrize("busy, preparing, joined", [(False, 1, True), (False, 0, False), (True, 1, False)],
                         ids=["idle, one being preprocessed", "idle, none being preprocessed", "running"])
def test_an_idle_engine_holds_its_first_step_for_requests_still_being_preprocessed(busy, preparing, joined):
    from atb_models.serve.engine import NewRequest

    engine = _engine_loop(busy)
    first, second = NewRequest(1, None, None), NewRequest(2, None, None)
    engine.submit(first, lambda event: None)
    engine.preparing = preparing
    timer = _submit_later(engine, second, 0.1, then_prepared=preparing > 0)
    plan = engine._next_plan()
    timer.join()
    assert [r.request_id for r in plan.adds] == ([1, 2] if joined else [1])


def test_the_admission_window_is_bounded_and_a_stop_ends_it():
    from atb_models.serve import engine as engine_module
    from atb_models.serve.engine import NewRequest

    engine = _engine_loop(busy=False)
    engine.submit(NewRequest(1, None, None), lambda event: None)
    engine.preparing = 1  # never submitted: a request whose preprocessing hangs
    start = time.monotonic()
    assert [r.request_id for r in engine._next_plan().adds] == [1]
    assert time.monotonic() - start < engine_module.ADMISSION_WINDOW_S + 0.3
    engine.submit(NewRequest(2, None, None), lambda event: None)
    engine._commands.put(("stop", None, None))  # what EngineLoop.stop sends
    start = time.monotonic()
    plan = engine._next_plan()
    assert plan.stop and [r.request_id for r in plan.adds] == [2] and time.monotonic() - start < 0.1


def test_requests_held_for_the_first_step_count_against_the_queue_beyond_the_free_batch_slots():
    from atb_models.serve.engine import NewRequest

    engine = _engine_loop(busy=False)  # 4 free slots
    for i in range(6):
        engine.submit(NewRequest(i, None, None), lambda event: None)
    assert engine.queued() == 2  # all still in the command queue: 4 will run at once, 2 will wait
    plan = engine._next_plan()
    assert len(plan.adds) == 6 and engine.queued() == 2  # the same, taken into the plan


def test_aborts_waiting_in_the_command_queue_count_as_no_queued_request():
    # Clients that leave during a long step queue aborts; they must not fill --max_queue or the waiting gauge.
    from atb_models.serve.engine import NewRequest

    engine = _engine_loop(busy=True)  # 4 slots
    for i in range(5):
        engine.abort(i)
    for i in range(6):
        engine.submit(NewRequest(10 + i, None, None), lambda event: None)
    assert engine.queued() == 2
    plan = engine._next_plan()
    assert len(plan.aborts) == 5 and len(plan.adds) == 6 and engine.queued() == 2


def test_a_burst_into_free_batch_slots_counts_as_no_queued_request():
    # --max_queue 1 with 4 free slots refused 3 of 4 requests arriving together: none of them would have waited.
    from atb_models.serve.engine import NewRequest

    engine = _engine_loop(busy=False)  # 4 free slots
    engine.preparing = 3
    engine.submit(NewRequest(1, None, None), lambda event: None)
    assert engine.queued() == 0
    engine.preparing = 4
    assert engine.queued() == 1
    engine.num_running = 4  # as the latest step left it: a full batch
    assert engine.queued() == 5


@dataclass
class _Prompt:
    token_ids: list


class _EngineTakingAllAtOnce:
    """The ApiService's side of EngineLoop: it accepts the submitted requests once `expected` of them are queued
    (as one step's plan takes every command that arrived), noting how many were still counted as preparing."""

    def __init__(self, expected: int):
        self.expected, self.preparing, self.submitted, self.preparing_at_submit = expected, 0, [], []
        self.ready = threading.Event()
        self.ready.set()
        self.llm = SimpleNamespace(scheduler=SimpleNamespace(max_batch_size=4))

    def queued(self, arriving: int = 0) -> int:
        return 0

    def submit(self, request, sink) -> None:
        from atb_models.serve.engine import EngineEvent

        self.submitted.append((request, sink))
        self.preparing_at_submit.append(self.preparing)
        if len(self.submitted) == self.expected:
            for _, each in self.submitted:
                each(EngineEvent("accepted"))

    def abort(self, request_id: int) -> None:
        raise AssertionError(f"request {request_id} aborted")


def test_the_n_choices_of_a_request_are_submitted_together_for_one_step():
    """All n engine requests are queued before any acceptance is awaited, still counted as being preprocessed (an
    idle engine's admission window waits for them), so one step takes them all: not one choice a step."""
    import asyncio

    from atb_models.engine.sampling_params import SamplingParams
    from atb_models.serve.app import ApiService, ServerConfig
    from atb_models.serve.metrics import ServerMetrics
    from atb_models.serve.protocol import ChatRequest

    engine = _EngineTakingAllAtOnce(expected=8)
    service = ApiService(ServerConfig("m", None, None, 16), engine, ServerMetrics())
    chat = ChatRequest(None, [("user", [{"text": "hi"}])], SamplingParams(seed=7), n=4)
    two_prompts = [lambda: _Prompt([1, 2, 3]), lambda: _Prompt([4, 5])]  # (a completion request's two prompts)

    async def admit():
        return await asyncio.wait_for(service._admit(chat, two_prompts), 5)

    prompts, choices = asyncio.run(admit())
    assert len(choices) == 8 and engine.preparing == 0
    assert engine.preparing_at_submit == [8] * 8
    assert [request.params.seed for request, _ in engine.submitted] == [7, 8, 9, 10] * 2
    assert [request.prompt for request, _ in engine.submitted] == [prompts[0]] * 4 + [prompts[1]] * 4


def test_n_beyond_max_queue_is_a_400_not_a_503_to_retry_for_ever():
    import asyncio

    from atb_models.serve.app import ApiService, ServerConfig
    from atb_models.serve.metrics import ServerMetrics
    from atb_models.serve.fields import ApiError

    # 4 batch slots and --max_queue 2: 6 choices fit at once, 7 never do
    service = ApiService(ServerConfig("m", None, None, 2), _EngineTakingAllAtOnce(expected=7), ServerMetrics())

    async def body():
        return json.dumps({"messages": [chat_message("hi")], "n": 7}).encode()

    with pytest.raises(ApiError) as refused:
        asyncio.run(service.chat(SimpleNamespace(headers={}, body=body)))
    message = refused.value.message
    assert refused.value.status == 400 and "n 7 (7 requests) are more than this server takes at once (6" in message


def test_null_stream_and_logprobs_are_their_default_false_as_every_other_nullable_field():
    from atb_models.serve.protocol import parse_chat_request

    chat = parse_chat_request({"messages": [chat_message("hi")], "stream": None, "logprobs": None,
                               "top_logprobs": None, "n": None, "stream_options": None})
    assert not chat.stream and chat.params.logprobs is None and chat.n == 1


def test_a_drafting_engine_counts_every_token_of_a_step_and_its_guesses_in_the_metrics(checkpoint):
    """A drafted step gives a request several tokens: atb_generation_tokens counts them all, and the guesses and
    those that held have counters of their own (EngineLoop in-process, no HTTP)."""
    from atb_models import LLM, SamplingParams
    from atb_models.serve.engine import EngineLoop, NewRequest
    from atb_models.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    loop = EngineLoop(lambda: LLM(str(checkpoint), dtype="float32", device="cpu", num_speculative_tokens=4,
                                  **LIMITS), metrics, 1, lambda: None)
    loop.start()
    try:
        assert loop.ready.wait(60)
        prompt = loop.llm.preprocessor.plain("the cat sat on the mat, the cat sat on the mat, the cat sat on the")
        events, done = [], threading.Event()

        def sink(event):
            events.append(event)
            if event.kind != "accepted" and (event.kind != "output" or event.output.finished):
                done.set()

        loop.submit(NewRequest(0, prompt, SamplingParams(max_tokens=40, ignore_eos=True)), sink)
        assert done.wait(60)
    finally:
        loop.stop()
    final = events[-1].output
    assert len(final.token_ids) == 40 and len([e for e in events if e.kind == "output"]) < 40  # drafted steps
    samples = {s.name: s.value for family in metrics.registry.collect() for s in family.samples}
    assert samples["atb_generation_tokens_total"] == 40
    assert 0 < samples["atb_spec_decode_accepted_tokens_total"] <= samples["atb_spec_decode_draft_tokens_total"]


def test_beam_searches_count_in_the_request_gauges_the_queue_and_the_generated_tokens(checkpoint):
    """A search the engine holds is a request waiting or running (the gauges, and --max_queue through queued()),
    and every token its beams take counts in atb_generation_tokens (EngineLoop in-process, no HTTP)."""
    from atb_models import LLM, BeamSearchParams
    from atb_models.serve.engine import EngineLoop, NewRequest
    from atb_models.serve.metrics import ServerMetrics

    metrics = ServerMetrics()
    loop = EngineLoop(None, metrics, 1, lambda: None)
    loop.llm = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=4, **LIMITS)
    prompt = loop.llm.preprocessor.plain("The sky is")
    outputs = []
    for request_id in range(2):  # (4 rows each: one runs, the other waits for the batch's rows)
        loop.submit(NewRequest(request_id, prompt, BeamSearchParams(4, 5, ignore_eos=True)), outputs.append)
    loop._one_iteration()

    def sample(name: str) -> float:
        return {s.name: s.value for family in metrics.registry.collect() for s in family.samples}[name]

    assert (sample("atb_requests_running"), sample("atb_requests_waiting")) == (1, 1)
    assert loop.queued() == 0 and loop.queued(arriving=3) == 1  # (2 of the batch's 4 slots taken)
    while loop.llm.has_unfinished():
        loop._one_iteration()
    assert [event.output.finish_reason for event in outputs if event.kind == "output"] == ["length"] * 2
    assert (sample("atb_requests_running"), sample("atb_requests_waiting")) == (0, 0)
    assert sample("atb_generation_tokens_total") == 2 * (1 + 4 * 4)  # each: its prefill's token, 4 rounds of 4 beams


def test_the_serve_packages_docstring_names_each_of_its_modules_where_it_is():
    """The package's map of its modules: a module split off or added must not leave it pointing at the wrong one."""
    import atb_models.serve as serve

    said = dict(re.findall(r"`(\w+)`: ([^;]*?)(?:;|\n-|\n$)", serve.__doc__, re.S))  # (module: what it holds)
    assert set(said) == {path.stem for path in Path(serve.__file__).parent.glob("*.py") if path.stem != "__init__"}
    assert "bodies" not in said["protocol"]  # (answers.py's and fields.py's)
