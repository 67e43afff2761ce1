"""Speculative decoding by prompt lookup (engine.speculative): the guesses, their check, and an engine that drafts
answering with the tokens of one that does not, whatever else happens in its steps."""
import pytest
import torch

from atb_models import LLM, SamplingParams, UserError
from atb_models.engine.speculative import accepted_tokens, propose

REPEATING = [{"text": "Repeat: the cat sat on the mat, the cat sat on the mat, the cat sat on the mat."}]


def test_prompt_lookup_takes_what_followed_the_latest_earlier_run_of_the_last_tokens():
    assert propose([1, 2, 3, 9, 1, 2, 3, 7, 5, 1, 2, 3], 2, 3) == [7, 5]  # the latest occurrence, not the first
    assert propose([5, 6, 1, 2, 9, 2], 4, 3) == [9, 2]  # no earlier "2 9 2" nor "9 2": what followed "2"
    assert propose([1, 2, 3, 4], 3, 3) == []  # nothing repeats
    assert propose([4, 4, 4, 4], 8, 2) == [4]  # the latest earlier "4 4" overlaps the last one: one token after it
    assert propose([1, 2, 1, 2], 0, 3) == [] and propose([1], 3, 3) == []


def test_the_check_keeps_the_guesses_up_to_the_first_the_model_disagrees_with_and_its_own_token_after():
    rows = torch.nn.functional.one_hot(torch.tensor([0, 7, 8, 2]), 10).float()  # rows 1..3 after guesses 1..3
    assert accepted_tokens(rows, 5, [5, 7, 9]) == [5, 7, 8]  # 5 and 7 agreed; 8, the model's, past 9's place
    assert accepted_tokens(rows, 4, [5, 7, 9]) == [4]  # the first guess already wrong
    assert accepted_tokens(rows, 5, [5, 7, 8]) == [5, 7, 8, 2]  # all three held: the token after them too


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint):
    return str(tiny_checkpoint())


def make_llm(checkpoint, **kwargs):
    options = dict(dtype="float32", device="cpu", max_batch_size=4, max_input_length=512, max_output_length=48,
                   block_size=16)
    return LLM(checkpoint, **{**options, **kwargs})


@pytest.fixture(scope="module")
def plain(checkpoint):
    return make_llm(checkpoint)


def assert_same_answers(plain, drafting, requests, params):
    expected = plain.generate(requests, params)
    got = drafting.generate(requests, params)
    assert [(o.token_ids, o.finish_reason, o.text) for o in got] == [
        (o.token_ids, o.finish_reason, o.text) for o in expected]
    return got


def test_drafting_answers_with_the_plain_engines_tokens_for_text_images_and_sampled_neighbours(
        checkpoint, plain, sample_image_path):
    drafting = make_llm(checkpoint, num_speculative_tokens=4)
    requests = [REPEATING, [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}],
                [{"text": "Count: one two three one two three"}], [{"text": "Hello"}]]
    params = [SamplingParams(max_tokens=40, ignore_eos=True), SamplingParams(max_tokens=30, ignore_eos=True),
              SamplingParams(max_tokens=2, ignore_eos=True),  # room for one guess at most
              SamplingParams(max_tokens=20, temperature=1.0, seed=4, ignore_eos=True)]  # sampled: never drafted
    assert_same_answers(plain, drafting, requests, params)
    stats = drafting.speculative_stats
    assert 0 < stats.accepted <= stats.proposed
    steps = sum(not r.is_prefill for r in drafting.step_records)
    assert steps < sum(not r.is_prefill for r in plain.step_records)
    # stop strings and eos end a drafted answer where they end a plain one
    full = plain.generate([REPEATING], SamplingParams(max_tokens=40, ignore_eos=True))[0]
    eos = plain.model_config.eos_token_ids[0]
    assert_same_answers(plain, drafting, [REPEATING] * 2, [
        SamplingParams(max_tokens=40, ignore_eos=True, stop=[full.text[20:24]]),
        SamplingParams(max_tokens=40, logit_bias={eos: 2.0})])


def test_a_stop_string_inside_a_drafted_steps_tokens_ends_the_answer_at_its_token(checkpoint, plain):
    """A drafted step appends several tokens at once; one whose text completes a stop string ends the answer, and
    the step's tokens after it are not the answer's (token_ids and usage counts as a plain engine gives them)."""
    drafting = make_llm(checkpoint, num_speculative_tokens=6)
    drafting.add_request(REPEATING, SamplingParams(max_tokens=40, ignore_eos=True))
    lengths = [0]
    while drafting.has_unfinished():
        [output] = drafting.step()
        lengths.append(len(output.token_ids))
    ids, decode = output.token_ids, drafting._decoders[True]  # (the text of a request skipping special tokens)
    # a stop string that a token inside a drafted step's run completes, found in no text before that token
    stop, end = next((decode(ids[:m])[-k:], m) for before, after in zip(lengths, lengths[1:])
                     for m in range(before + 1, after) for k in range(2, 9)
                     if decode(ids[:m])[-k:] not in decode(ids[:m - 1]))
    before = drafting.tokens_generated
    [got] = assert_same_answers(plain, drafting, [REPEATING], SamplingParams(max_tokens=40, ignore_eos=True,
                                                                               stop=[stop]))
    assert len(got.token_ids) == end and drafting.tokens_generated - before == end
    # a stop token later in the same drafted step is dropped with the tokens after the stop string, and no longer
    # ends the answer: its text is not cut from the answer's (the stop string's is)
    step_end = next(after for before_, after in zip(lengths, lengths[1:]) if before_ < end < after)
    [got] = assert_same_answers(plain, drafting, [REPEATING], SamplingParams(
        max_tokens=40, ignore_eos=True, stop=[stop], stop_token_ids=[ids[step_end - 1]]))
    assert got.stop_reason == stop and len(got.token_ids) == end, (got.stop_reason, got.token_ids, end)


def test_drafting_under_preemption_chunked_prefill_and_the_prefix_cache(checkpoint, plain):
    """Few blocks: guesses get no room, running requests are preempted and computed again; prompts in chunks;
    and a prompt holding an earlier drafted answer reads its blocks (K/V the drafted steps wrote) from the cache."""
    params = SamplingParams(max_tokens=48, ignore_eos=True)
    tight = make_llm(checkpoint, num_speculative_tokens=6, num_blocks=9, enable_chunked_prefill=True,
                     max_prefill_tokens=24)
    requests = [REPEATING, [{"text": "Count: one two three one two three"}], [{"text": "Say it again and again."}]]
    assert_same_answers(plain, tight, requests, params)
    assert tight.scheduler.num_preemptions > 0 and tight.speculative_stats.accepted > 0

    roomy = make_llm(checkpoint, num_speculative_tokens=6)
    first = roomy.generate([REPEATING], params)[0]
    ids = roomy.preprocessor(REPEATING).token_ids + first.token_ids
    expected = plain.add_request(plain.preprocessor.plain(ids), params)
    got = roomy.add_request(roomy.preprocessor.plain(ids), params)
    outputs = {}
    for llm, request_id in ((plain, expected), (roomy, got)):
        while llm.has_unfinished():
            outputs.update(((id(llm), o.request_id), o) for o in llm.step() if o.finished)
    assert outputs[(id(roomy), got)].cached_prompt_tokens >= len(ids) - 16  # the answer's blocks too
    assert outputs[(id(roomy), got)].token_ids == outputs[(id(plain), expected)].token_ids


@pytest.mark.parametrize("bad", [dict(num_speculative_tokens=-1), dict(num_speculative_tokens=17),
                                 dict(num_speculative_tokens=2, prompt_lookup_max=0), dict(prompt_lookup_max=9)])
def test_speculative_settings_out_of_range_are_refused_naming_the_flag(checkpoint, bad):
    with pytest.raises(UserError, match=f"--{next(iter(bad)) if len(bad) == 1 else 'prompt_lookup_max'} must be"):
        make_llm(checkpoint, **bad)


def test_a_drafted_steps_tokens_stop_at_eos_or_max_tokens_and_guesses_take_only_free_blocks():
    from types import SimpleNamespace

    from atb_models.engine.block_manager import BlockManager
    from atb_models.engine.scheduler import Scheduler
    from atb_models.engine.sequence import Sequence

    def seq(seq_id: int, max_tokens: int) -> Sequence:
        ids = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
        prompt = SimpleNamespace(token_ids=ids, visuals=[], rope_delta=0, positions=torch.arange(10).expand(3, -1))
        return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens), max_tokens)

    manager = BlockManager(num_blocks=7, block_size=4, enable_prefix_caching=False)  # (no sharing: exact counts)
    scheduler = Scheduler(manager, 4, 100, eos_token_ids=[9], num_speculative_tokens=4)
    ended, capped = seq(0, 10), seq(1, 3)
    for s in (ended, capped):
        scheduler.add(s)
    seqs, _ = scheduler.schedule()  # the prefill: 3 blocks each, one left
    scheduler.finish_step(seqs, [4, 4])
    seqs, is_prefill = scheduler.schedule()
    assert not is_prefill and seqs == [ended, capped]
    # "2 3 4" came before, then "5 6 7 1": 4 guesses, whose K/V take the last free block
    assert ended.draft_tokens == [5, 6, 7, 1] and manager.num_free_blocks == 0
    assert capped.draft_tokens == [5]  # max_tokens 3 leaves room for 1 guess past the step's own token
    finished = scheduler.finish_step(seqs, [[5, 9, 7], [5, 6]])
    assert ended.completion_token_ids == [4, 5, 9] and ended.finish_reason == "stop"  # nothing past eos
    assert capped.completion_token_ids == [4, 5, 6] and capped.finish_reason == "length"
    assert set(finished) == {ended, capped} and manager.num_free_blocks == 7


def test_the_blocks_of_guesses_the_model_did_not_keep_are_free_after_the_step():
    """Held on, they would make later steps preempt other sequences for blocks that hold nothing."""
    from types import SimpleNamespace

    from atb_models.engine.block_manager import BlockManager
    from atb_models.engine.scheduler import Scheduler
    from atb_models.engine.sequence import Sequence

    ids = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]
    prompt = SimpleNamespace(token_ids=ids, visuals=[], rope_delta=0, positions=torch.arange(10).expand(3, -1))
    seq = Sequence(0, prompt, SamplingParams(max_tokens=10), 10)
    manager = BlockManager(num_blocks=7, block_size=4, enable_prefix_caching=False)
    scheduler = Scheduler(manager, 4, 100, eos_token_ids=[9], num_speculative_tokens=4)
    scheduler.add(seq)
    scheduler.finish_step(scheduler.schedule()[0], [4])  # the prefill: 3 blocks, 11 tokens
    seqs, _ = scheduler.schedule()
    assert seq.draft_tokens == [5, 6, 7, 1] and len(seq.block_table) == 4  # a 4th block for the guesses' K/V
    scheduler.finish_step(seqs, [[8]])  # the first guess wrong: one token, 12 in all, in 3 blocks
    assert len(seq.block_table) == 3 and manager.num_free_blocks == 4


def test_a_decode_step_keeps_its_guesses_within_the_rows_the_linear_kernel_takes_in_one_pass(checkpoint):
    from types import SimpleNamespace

    from atb_models.engine.block_manager import BlockManager
    from atb_models.engine.scheduler import Scheduler
    from atb_models.engine.sequence import Sequence

    def seq(seq_id: int) -> Sequence:
        ids = [1, 2, 3, 4, 5, 6, 7, 1, 2, 3]  # "2 3 4" came before: "5 6 7 1" is guessed after the first token 4
        prompt = SimpleNamespace(token_ids=ids, visuals=[], rope_delta=0, positions=torch.arange(10).expand(3, -1))
        return Sequence(seq_id, prompt, SamplingParams(max_tokens=20), 20)

    guessed = {}
    for rows in (None, 6, 3):
        scheduler = Scheduler(BlockManager(num_blocks=40, block_size=4), 4, 100, eos_token_ids=[],
                              num_speculative_tokens=4, draft_rows=rows)
        seqs = [seq(i) for i in range(3)]
        for s in seqs:
            scheduler.add(s)
        scheduler.finish_step(scheduler.schedule()[0], [4, 4, 4])
        scheduler.schedule()
        guessed[rows] = [len(s.draft_tokens) for s in seqs]
    assert guessed == {None: [4, 4, 4], 6: [3, 0, 0], 3: [0, 0, 0]}  # 3 sequences' rows, and what is left
    from atb_models.kernels.linear import MAX_ROWS, LinearKernel, PanelLinear

    llm = make_llm(checkpoint)
    assert llm.scheduler.draft_rows == llm.runner.kernels.linear.rows_per_pass
    assert (PanelLinear.rows_per_pass, LinearKernel.rows_per_pass) == (MAX_ROWS, None)  # the kit's CPU linear's
