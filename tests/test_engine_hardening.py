"""The engine under hostile and careless use: a generate() call that ends by an exception leaves nothing behind for
the next one, SamplingParams refuse bad values when made, generate() refuses malformed arguments before any work,
a --max_batch_size beyond memory is capped, and per-request errors name no request number of their own."""
import dataclasses
import logging

import numpy as np
import pytest

from atb_models import LLM, SamplingParams, UserError
from atb_models import distributed
from atb_models.ranks import ParallelState
from atb_models.engine import llm as llm_module
from atb_models.layers.sharding import ceil_div

OPTIONS = dict(dtype="float32", device="cpu", max_input_length=256, max_output_length=16, block_size=16)
PROMPTS = ["The sky is blue and the grass is", "Count: one two three", "Describe a cat.", "Zebra xylophone quartz",
           "12345"]
# Three slots for five requests of different lengths: when the first request finishes, two are running and two
# are waiting.
REQUESTS = [[{"text": p}] for p in PROMPTS]
PARAMS = [SamplingParams(max_tokens=4 + 2 * i, ignore_eos=True) for i in range(len(PROMPTS))]
# The call after a failure gets other prompts under the same request numbers, so a sequence left over from the
# failed call would answer under the wrong prompt.
NEXT_REQUESTS = REQUESTS[::-1]
NEXT_PARAMS = [SamplingParams(max_tokens=3 + i, ignore_eos=True) for i in range(len(PROMPTS))]


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint()), max_batch_size=3, **OPTIONS)


@pytest.fixture(scope="module")
def fresh_answers(tiny_checkpoint):
    """What an engine that never failed answers to the next call (greedy, so deterministic)."""
    fresh = LLM(str(tiny_checkpoint()), max_batch_size=3, **OPTIONS)
    return [out.token_ids for out in fresh.generate(NEXT_REQUESTS, NEXT_PARAMS)]


def assert_clean(engine: LLM) -> None:
    assert not engine.scheduler.waiting and not engine.scheduler.running
    manager = engine.block_manager
    assert sorted([*manager.free_blocks, *manager.evictable]) == list(range(manager.num_blocks))  # held by none


def assert_next_call_answers_like_a_fresh_engine(engine: LLM, fresh_answers: list) -> None:
    finished = []
    outs = engine.generate(NEXT_REQUESTS, NEXT_PARAMS, on_finish=lambda out: finished.append(out.request_id))
    assert [out.token_ids for out in outs] == fresh_answers
    assert sorted(finished) == list(range(len(NEXT_REQUESTS)))  # nothing left over finished in this call
    assert_clean(engine)


class CallerError(Exception):
    pass


@pytest.mark.parametrize("raised", [KeyboardInterrupt, CallerError])
def test_a_call_stopped_by_on_finish_leaves_nothing_for_the_next_call(llm, fresh_answers, raised):
    seen = []

    def stop_at_first_answer(out):
        seen.append((len(llm.scheduler.running), len(llm.scheduler.waiting)))
        raise raised("stop")

    with pytest.raises(raised):
        llm.generate(REQUESTS, PARAMS, on_finish=stop_at_first_answer)
    assert seen == [(2, 2)], "the callback should have fired with sequences both running and waiting"
    assert_clean(llm)
    assert_next_call_answers_like_a_fresh_engine(llm, fresh_answers)


def test_a_sampling_failure_leaves_nothing_for_the_next_call(llm, fresh_answers, monkeypatch):
    real_sample, calls = llm_module.sample, []

    def failing_on_third_step(logits, seqs, eos_token_ids=()):
        calls.append(len(seqs))
        if len(calls) == 3:
            raise RuntimeError("sampler broke")
        return real_sample(logits, seqs, eos_token_ids)

    monkeypatch.setattr(llm_module, "sample", failing_on_third_step)
    with pytest.raises(RuntimeError, match="sampler broke"):
        llm.generate(REQUESTS, PARAMS)
    assert_clean(llm)
    assert_next_call_answers_like_a_fresh_engine(llm, fresh_answers)


@pytest.mark.parametrize("rank", [0, 1])
def test_a_sampling_failure_on_rank_0_stops_every_rank_in_step(llm, fresh_answers, monkeypatch, rank):
    # Two ranks simulated in one process: the broadcast hands every rank what rank 0 sent.
    monkeypatch.setattr(llm, "parallel", ParallelState(rank=rank, world_size=2, local_rank=rank, local_world_size=2))
    sent = []

    def broadcast(values):
        if rank == 0:
            sent.append(values)
            return values
        return "ValueError: probabilities contain nan"  # what rank 0 sends when its draw fails

    monkeypatch.setattr(distributed, "broadcast_from_rank0", broadcast)
    if rank == 0:
        monkeypatch.setattr(llm_module, "sample", lambda logits, seqs, eos=(): (_ for _ in ()).throw(ValueError("nan")))
    with pytest.raises(RuntimeError, match="sampling failed on rank 0: ValueError"):
        llm.generate(REQUESTS, PARAMS)
    if rank == 0:
        assert sent == ["ValueError: nan"], "rank 0 must still send, or the other ranks wait for it"
    assert_clean(llm)
    monkeypatch.undo()
    assert_next_call_answers_like_a_fresh_engine(llm, fresh_answers)


def test_generate_called_from_on_finish_is_refused_and_leaves_nothing(llm, fresh_answers):
    def nested(out):
        llm.generate([[{"text": "again"}]])

    with pytest.raises(UserError, match="already running"):
        llm.generate(REQUESTS, PARAMS, on_finish=nested)
    assert_clean(llm)
    assert_next_call_answers_like_a_fresh_engine(llm, fresh_answers)


def test_a_call_starts_without_what_an_earlier_one_left(llm, fresh_answers):
    # State a call could leave only through a bug: a sequence half run, holding blocks.
    llm.scheduler.add(llm._make_sequence(0, llm.preprocessor(REQUESTS[0]), PARAMS[0], llm_module.RequestOutput(0, "")))
    llm.scheduler.schedule()
    assert_next_call_answers_like_a_fresh_engine(llm, fresh_answers)


def test_an_incremental_step_cut_short_in_its_prefill_leaves_its_requests_to_the_next_step(llm, monkeypatch):
    # Two requests of one prompt share its blocks within the step; the cut step must neither leave them running over
    # K/V it never wrote nor leave those blocks in the prefix cache for later prompts.
    requests, params = [REQUESTS[0], REQUESTS[0], REQUESTS[1]], [PARAMS[0], PARAMS[1], PARAMS[2]]
    expected = [out.token_ids for out in llm.generate(requests, params)]
    llm.block_manager.reset()  # nothing cached, and no K/V left that a prefill never run would find in its blocks
    for layer in llm.runner.model.model.layers:
        layer.k_cache.zero_()
        layer.v_cache.zero_()
    real_run = llm.runner.run

    def interrupted_once(*args, **kwargs):
        monkeypatch.setattr(llm.runner, "run", real_run)
        raise KeyboardInterrupt

    monkeypatch.setattr(llm.runner, "run", interrupted_once)
    ids = [llm.add_request(request, p) for request, p in zip(requests, params)]
    with pytest.raises(KeyboardInterrupt):
        llm.step()
    assert not llm.block_manager.cached and llm.block_manager.num_used_blocks == 0
    assert [seq.seq_id for seq in llm.scheduler.waiting] == ids and not llm.scheduler.running
    answers = {}
    while llm.has_unfinished():
        answers.update((out.request_id, out.token_ids) for out in llm.step() if out.finished)
    assert [answers[i] for i in ids] == expected
    assert [out.token_ids for out in llm.generate(requests, params)] == expected
    assert_clean(llm)


@pytest.mark.parametrize("cut_draw", [1, 3], ids=["prefill", "decode"])
def test_a_step_cut_short_in_its_sampling_leaves_seeded_requests_drawing_as_if_it_never_ran(llm, monkeypatch,
                                                                                            cut_draw):
    # The first row draws (its generator moves on), then the step is cut: the redrawn step must draw that row's
    # token again, not the generator's next one.
    requests = REQUESTS[:2]
    params = [SamplingParams(max_tokens=6, ignore_eos=True, seed=7 + i, temperature=1.0) for i in range(2)]
    expected = [out.token_ids for out in llm.generate(requests, params)]
    real_sample, draws = llm_module.sample, []

    def cut_after_the_first_row(logits, seqs, eos_token_ids=()):
        draws.append(len(seqs))
        if len(draws) == cut_draw:
            real_sample(logits[:1], seqs[:1], eos_token_ids)
            raise KeyboardInterrupt
        return real_sample(logits, seqs, eos_token_ids)

    monkeypatch.setattr(llm_module, "sample", cut_after_the_first_row)
    ids = [llm.add_request(request, p) for request, p in zip(requests, params)]
    with pytest.raises(KeyboardInterrupt):
        while llm.has_unfinished():
            llm.step()
    answers = {}
    while llm.has_unfinished():
        answers.update((out.request_id, out.token_ids) for out in llm.step() if out.finished)
    assert [answers[i] for i in ids] == expected
    assert_clean(llm)


def test_one_processed_prompt_added_twice_keeps_its_image_for_the_request_run_last(tiny_checkpoint,
                                                                                 sample_image_path):
    # One slot and no caching: the second request is prefilled after the first finished, from the pixels the
    # first one's end must not have taken from it.
    engine = LLM(str(tiny_checkpoint()), max_batch_size=1, enable_prefix_caching=False, **OPTIONS)
    request, params = [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}], SamplingParams(
        max_tokens=4, ignore_eos=True)
    expected = engine.generate([request], params)[0].token_ids
    prompt = engine.preprocessor(request)
    ids = [engine.add_request(prompt, params) for _ in range(2)]
    answers = {}
    while engine.has_unfinished():
        answers.update((out.request_id, out.token_ids) for out in engine.step() if out.finished)
    assert [answers[i] for i in ids] == [expected, expected]
    assert len(prompt.visuals) == 1  # the caller's prompt is left as it was


@pytest.mark.parametrize("request_id", ["7", 1.5, True])
def test_a_request_id_that_is_no_integer_is_refused_and_queues_nothing(llm, request_id):
    next_id = llm._next_request_id
    with pytest.raises(UserError, match="request_id must be an integer"):
        llm.add_request([{"text": "Hi"}], SamplingParams(max_tokens=2), request_id=request_id)
    assert not llm.has_unfinished()
    assert llm.add_request([{"text": "Hi"}], SamplingParams(max_tokens=2)) == next_id
    assert type(llm.add_request([{"text": "Hi"}], SamplingParams(max_tokens=2), request_id=np.int64(900))) is int
    while llm.has_unfinished():
        llm.step()
    assert_clean(llm)


def test_generate_refuses_to_start_over_requests_added_one_at_a_time_and_drops_none(llm):
    request_id = llm.add_request(REQUESTS[0], PARAMS[0])
    llm.step()
    with pytest.raises(UserError, match="taken by add_request"):
        llm.generate(REQUESTS[1:2], PARAMS[1:2])
    finished = []
    while llm.has_unfinished():
        finished += [out for out in llm.step() if out.finished]
    assert [out.request_id for out in finished] == [request_id] and len(finished[0].token_ids) == 4
    assert_clean(llm)
    assert len(llm.generate(REQUESTS[1:2], PARAMS[1:2])[0].token_ids) == 6  # and then runs


@pytest.mark.parametrize("text,stops,shown", [
    ("Hello wor", ("world",), "Hello "), ("Hello wor", ("xyz", "or!", "lo w!"), "Hello w"), ("aab", ("abc",), "a"),
    ("caf\u00e9 ", ("\u00e9  ", " !"), "caf"), ("plain", ("zz",), "plain"), ("", ("a",), ""), ("ab", (), "ab"),
    ("aaa", ("aab",), "a"),
])
def test_a_running_answer_holds_back_the_longest_tail_that_may_begin_a_stop_string(text, stops, shown):
    assert llm_module._without_partial_stop(text, stops) == shown


class _CountedStop(str):
    calls = 0

    def startswith(self, *args):
        type(self).calls += 1
        return super().startswith(*args)


def test_long_stop_strings_are_tried_only_where_their_first_character_is():
    # Asked for each running request at every step: trying every tail length up to the longest stop (50 stops of
    # 1000 characters: 50,000 comparisons here) made one request's stop strings slow the steps of the whole batch.
    text = "The quick brown fox jumps over the lazy dog. " * 40
    stops = tuple(_CountedStop(f"Z{i:03d}" + "x" * 1000) for i in range(50)) + (_CountedStop("dog. Thx"),)
    assert llm_module._without_partial_stop(text, stops) == text[:-5]
    assert _CountedStop.calls <= 3


# --------------------------------------------------------------------------------------------- SamplingParams


@pytest.mark.parametrize("field,value", [
    ("temperature", float("nan")), ("temperature", float("inf")), ("temperature", -0.5), ("temperature", "0.7"),
    ("temperature", None), ("temperature", True),
    ("repetition_penalty", float("nan")), ("repetition_penalty", float("inf")), ("repetition_penalty", 0),
    ("repetition_penalty", -1.0),
    ("top_p", float("nan")), ("top_p", 0), ("top_p", 1.01), ("top_p", float("inf")), ("top_p", "1"),
    ("top_k", 2.0), ("top_k", -1), ("top_k", True), ("top_k", "5"),
    ("max_tokens", 3.0), ("max_tokens", True), ("max_tokens", 0), ("max_tokens", -2), ("max_tokens", "8"),
    ("seed", 1.5), ("seed", 3.0), ("seed", -1), ("seed", 2**64), ("seed", True), ("seed", "42"),
    ("ignore_eos", 1), ("ignore_eos", "yes"), ("ignore_eos", None),
    ("temperature", 10**400), ("repetition_penalty", 10**400),
])
def test_sampling_params_refuse_a_bad_value_in_one_line_naming_the_field(field, value):
    with pytest.raises(UserError) as caught:
        SamplingParams(**{field: value})
    message = str(caught.value)
    assert message.startswith(f"{field} must be") and "\n" not in message


def test_sampling_params_accept_the_edges_of_each_range():
    edge = SamplingParams(max_tokens=np.int64(1), temperature=0, top_k=0, top_p=1, repetition_penalty=1e-3,
                          seed=2**64 - 1, ignore_eos=True)
    assert edge.max_tokens == 1 and type(edge.max_tokens) is int and edge.greedy
    assert SamplingParams(seed=np.uint64(0), temperature=np.float32(0.5)).temperature == 0.5


def test_sampling_params_stay_as_checked():
    params = SamplingParams(temperature=0.5)
    with pytest.raises(dataclasses.FrozenInstanceError):
        params.temperature = float("nan")
    with pytest.raises(UserError, match="temperature must be"):
        dataclasses.replace(params, temperature=float("nan"))


@pytest.mark.parametrize("params", [
    SamplingParams(temperature=1e-40, seed=0),                           # greedy: below 1e-5
    SamplingParams(temperature=1e-5, seed=0),                            # logits scaled up to 1e5 times
    SamplingParams(temperature=1.0, repetition_penalty=1e-320, seed=0),  # seen tokens' logits beyond float32
    SamplingParams(temperature=1e-5, repetition_penalty=1e-38, seed=0),
], ids=["tiny_temperature", "smallest_sampled_temperature", "tiny_penalty", "both"])
def test_extreme_sampling_values_fail_no_request(llm, params):
    """Values SamplingParams accepts must sample: before, logits scaled past float32's range made the softmax nan
    and torch.multinomial raise, losing the whole batch."""
    outs = llm.generate(REQUESTS[:2], [dataclasses.replace(params, max_tokens=4), PARAMS[0]])
    assert [o.error for o in outs] == [None, None] and all(o.token_ids for o in outs)


def test_a_temperature_below_the_greedy_threshold_decodes_greedily(llm):
    greedy = llm.generate(REQUESTS[:1], SamplingParams(max_tokens=6, ignore_eos=True))
    tiny = llm.generate(REQUESTS[:1], SamplingParams(max_tokens=6, ignore_eos=True, temperature=1e-7, seed=3))
    assert tiny[0].token_ids == greedy[0].token_ids


# --------------------------------------------------------------------------------------------- generate() arguments


@pytest.mark.parametrize("requests,params,expected", [
    (REQUESTS[:1], [None], r"sampling_params\[0\] is None, not a SamplingParams"),
    (REQUESTS[:2], [SamplingParams()], "1 SamplingParams for 2 requests"),
    (REQUESTS[:1], {"temperature": 0.5}, "must be a SamplingParams or a list of them"),
    ("What is this?", None, "takes a list of requests"),
    ({"text": "hi"}, None, "takes a list of requests"),
    (["What is this?"], None, r"requests\[0\] is str, not a list of items"),
    ([[{"text": "fine"}], {"text": "hi"}], None, r"requests\[1\] is dict"),
])
def test_malformed_generate_arguments_are_refused_before_any_work(llm, monkeypatch, requests, params, expected):
    preprocessed = []
    monkeypatch.setattr(llm, "node_preprocessor", lambda batch: preprocessed.append(batch) or [])
    with pytest.raises(UserError, match=expected) as caught:
        llm.generate(requests, params)
    assert "\n" not in str(caught.value)
    assert preprocessed == []


# --------------------------------------------------------------------------------------------- engine limits


def test_a_batch_size_beyond_memory_is_capped_before_anything_is_sized_by_it(tiny_checkpoint, monkeypatch, caplog):
    probe = LLM(str(tiny_checkpoint()), max_batch_size=1, **OPTIONS)
    one_request = ceil_div(256 + 16, 16)
    budget_blocks = 3 * one_request + 5  # room for three requests at the limits, and a few blocks
    monkeypatch.setattr(llm_module, "free_memory_bytes",
                        lambda plan: int(budget_blocks * probe.runner.bytes_per_block / 0.5))
    with caplog.at_level(logging.WARNING, logger="atb_models"):
        capped = LLM(str(tiny_checkpoint()), max_batch_size=10**6, **OPTIONS)
    assert capped.max_batch_size == capped.scheduler.max_batch_size == 3
    assert capped.max_prefill_tokens == 3 * (256 + 16)
    assert capped.block_manager.num_blocks == budget_blocks
    assert all(layer.k_cache.shape[0] == budget_blocks for layer in capped.runner.model.model.layers)
    assert any("--max_batch_size 1000000 capped to 3" in r.getMessage() for r in caplog.records)
    outs = capped.generate(REQUESTS, PARAMS)
    alone = probe.generate(REQUESTS, PARAMS)
    assert [o.token_ids for o in outs] == [o.token_ids for o in alone]
    assert all(o.error is None for o in outs)
    assert max(step.num_seqs for step in capped.step_records) == 3


def test_limit_values_are_refused_before_the_model_loads(tiny_checkpoint, monkeypatch):
    monkeypatch.setattr(llm_module, "load_model_config", lambda path: pytest.fail("the model was loaded"))
    for bad in (dict(max_batch_size=True), dict(num_blocks=0), dict(max_prefill_tokens=0)):
        with pytest.raises(UserError, match=next(iter(bad))):
            LLM(str(tiny_checkpoint()), **{**OPTIONS, **bad})


def test_request_errors_name_no_request_number_and_one_token_count(llm):
    long_prompt, too_many = llm.generate([[{"text": "x " * 400}], [{"text": "Hello"}]],
                                         [SamplingParams(max_tokens=2), SamplingParams(max_tokens=99)])
    count = long_prompt.prompt_token_count
    assert long_prompt.error == (f"the prompt has {count} tokens (visual tokens included), more than "
                                 f"--max_input_length 256")
    assert too_many.error == "max_tokens 99 exceeds --max_output_length 16"
    assert_clean(llm)
