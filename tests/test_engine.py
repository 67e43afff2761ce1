"""Block accounting, scheduling and sampling: the engine's decisions, on small hand-made sequences and on a tiny
checkpoint."""
import sys
from types import SimpleNamespace

import pytest
import torch

from atb_models import LLM, SamplingParams, UserError
from atb_models.engine.block_manager import BlockManager
from atb_models.engine.structured_output import StructuredOutput
from atb_models.engine.scheduler import Scheduler
from atb_models.engine.sequence import Sequence, SequenceStatus
from atb_models.layers.sampler import apply_presence_frequency_penalties, min_p_filter, sample, top_k_top_p_filter


def text_seq(seq_id: int, length: int, max_tokens: int = 4, first_token: int | None = None, **params) -> Sequence:
    """A text prompt of `length` tokens; each sequence's are its own (no prefix to share) unless first_token is
    given."""
    first = 1000 * seq_id + 1 if first_token is None else first_token
    prompt = SimpleNamespace(token_ids=list(range(first, first + length)), visuals=[], rope_delta=0,
                             positions=torch.arange(length).expand(3, -1))
    return Sequence(seq_id, prompt, SamplingParams(max_tokens=max_tokens, **params), max_tokens)


def drive(scheduler: Scheduler, token: int = 7, steps: int = 1000) -> list:
    """Run the scheduler with a fake model that always emits `token`; return the step kinds."""
    kinds = []
    for _ in range(steps):
        if not scheduler.has_work():
            return kinds
        seqs, is_prefill = scheduler.schedule()
        assert seqs, "empty step while work remains"
        kinds.append(("prefill" if is_prefill else "decode", [s.seq_id for s in seqs]))
        scheduler.finish_step(seqs, [token] * len(seqs))
    raise AssertionError("scheduler did not finish")


def test_blocks_are_all_returned_after_many_requests():
    bm = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(bm, max_batch_size=3, max_prefill_tokens=100, eos_token_ids=[])
    for i in range(25):
        sched.add(text_seq(i, length=3 + i % 7, max_tokens=1 + i % 5))
    drive(sched)
    assert bm.num_free_blocks == 10
    assert sorted([*bm.free_blocks, *bm.evictable]) == list(range(10))  # free, or cached and held by none


def test_block_table_grows_one_block_as_decode_crosses_a_boundary():
    bm = BlockManager(num_blocks=4, block_size=4)
    seq = text_seq(0, length=4)
    bm.allocate(seq)
    assert len(seq.block_table) == 1
    seq.append_token(9)           # token 5 has no slot yet
    assert bm.can_append(seq)
    bm.append(seq)
    assert len(seq.block_table) == 2
    bm.append(seq)                # no new token: nothing more to allocate
    assert len(seq.block_table) == 2


def test_requests_wait_when_blocks_run_out():
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=100, eos_token_ids=[])
    seqs = [text_seq(i, length=8, max_tokens=1) for i in range(3)]  # two blocks each
    for s in seqs:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.seq_id for s in batch] == [0, 1]
    assert seqs[2].status is SequenceStatus.WAITING
    sched.finish_step(batch, [7, 7])  # both finish (max_tokens 1) and free their blocks
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.seq_id for s in batch] == [2]


def test_identical_prompts_share_their_blocks_counted_once():
    """With prefix caching the same three prompts (two blocks each, the second holding the last token) fit in four
    blocks: the first block is shared, each keeps its own last block; the budget counts what is computed."""
    bm = BlockManager(num_blocks=4, block_size=4)
    sched = Scheduler(bm, max_batch_size=8, max_prefill_tokens=100, eos_token_ids=[])
    seqs = [text_seq(i, length=8, max_tokens=1, first_token=1) for i in range(3)]
    for s in seqs:
        sched.add(s)
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.seq_id for s in batch] == [0, 1, 2]
    assert [s.num_cached_tokens for s in seqs] == [0, 4, 4]
    assert len({s.block_table[0] for s in seqs}) == 1 and len({s.block_table[1] for s in seqs}) == 3
    assert bm.num_used_blocks == 4
    sched.finish_step(batch, [7, 7, 7])
    assert bm.num_used_blocks == 0 and len(bm.evictable) == 2  # seq 0's two blocks stay cached


def test_max_batch_size_and_prefill_budget_limit_admission():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_prefill_tokens=10, eos_token_ids=[])
    for i in range(4):
        sched.add(text_seq(i, length=6))
    batch, _ = sched.schedule()
    assert [s.seq_id for s in batch] == [0]          # 6 + 6 > 10 tokens
    batch, is_prefill = sched.schedule()
    assert is_prefill and [s.seq_id for s in batch] == [1]
    batch, is_prefill = sched.schedule()
    assert not is_prefill and len(batch) == 2        # batch full: decode


def test_prefills_and_decodes_interleave_step_by_step():
    bm = BlockManager(num_blocks=100, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_prefill_tokens=100, eos_token_ids=[])
    for i, n in enumerate([2, 5, 3]):
        sched.add(text_seq(i, length=4, max_tokens=n))
    kinds = drive(sched)
    assert kinds[0] == ("prefill", [0, 1])
    # Request 2 is admitted as soon as request 0 finishes, while request 1 is still decoding.
    first_admit = kinds.index(("prefill", [2]))
    assert any(k == "decode" and 1 in ids for k, ids in kinds[first_admit + 1:])


def test_youngest_running_sequence_is_preempted_when_decode_needs_a_block():
    bm = BlockManager(num_blocks=2, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_prefill_tokens=100, eos_token_ids=[])
    a, b = text_seq(0, length=4, max_tokens=3), text_seq(1, length=4, max_tokens=3)
    sched.add(a)
    sched.add(b)
    sched.finish_step(*zip(*[(s, 7) for s in sched.schedule()[0]]))  # prefill both; each holds 1 block
    batch, is_prefill = sched.schedule()  # both need a second block; only one can have it
    assert not is_prefill and batch == [a]
    assert b.status is SequenceStatus.WAITING and b.block_table == [] and sched.num_preemptions == 1
    drive(sched)
    assert a.completion_token_ids == b.completion_token_ids == [7, 7, 7]


def test_chunked_prefill_alternates_chunks_with_decode_steps_and_draws_only_at_a_prompts_end():
    bm = BlockManager(num_blocks=40, block_size=4)
    sched = Scheduler(bm, max_batch_size=4, max_prefill_tokens=10, eos_token_ids=[], chunked_prefill=True)
    running, long = text_seq(0, 6, max_tokens=20), text_seq(1, 25, max_tokens=3)
    sched.add(running)
    seqs, is_prefill = sched.schedule()
    assert (seqs, is_prefill) == ([running], True) and (running.prefill_start, running.prefill_end) == (0, 6)
    sched.finish_step(sched.prefill_done(seqs), [7])
    sched.add(long)  # 25 tokens at 10 a step: three chunks, with running's decode steps between them
    steps = []
    for _ in range(6):
        seqs, is_prefill = sched.schedule()
        if is_prefill:
            steps.append(("chunk", long.prefill_start, long.prefill_end))
            done = sched.prefill_done(seqs)
            sched.finish_step(done, [7] * len(done))
        else:
            steps.append(("decode", [s.seq_id for s in seqs]))
            sched.finish_step(seqs, [7] * len(seqs))
    assert steps == [("chunk", 0, 10), ("decode", [0]), ("chunk", 10, 20), ("decode", [0]), ("chunk", 20, 25),
                     ("decode", [0, 1])]
    assert long.completion_token_ids == [7, 7] and running.completion_token_ids == [7] * 4
    assert len(long.block_table) == bm.blocks_for(long.num_tokens)  # every prompt block held from admission on


def test_eos_stops_unless_ignore_eos():
    bm = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_prefill_tokens=100, eos_token_ids=[7, 8])
    stops, ignores = text_seq(0, 3, max_tokens=5), text_seq(1, 3, max_tokens=5, ignore_eos=True)
    sched.add(stops)
    sched.add(ignores)
    drive(sched, token=8)
    assert stops.completion_token_ids == [8] and stops.finish_reason == "stop"
    assert ignores.completion_token_ids == [8] * 5 and ignores.finish_reason == "length"


def test_a_stop_token_ends_the_answer_with_its_id_as_the_stop_reason_even_with_ignore_eos():
    bm = BlockManager(num_blocks=10, block_size=4)
    sched = Scheduler(bm, max_batch_size=2, max_prefill_tokens=100, eos_token_ids=[8])
    stops, other = text_seq(0, 3, max_tokens=5, ignore_eos=True, stop_token_ids=[7]), text_seq(1, 3, max_tokens=5)
    sched.add(stops)
    sched.add(other)
    drive(sched, token=7)
    assert stops.completion_token_ids == [7] and (stops.finish_reason, stops.stop_reason) == ("stop", 7)
    assert other.completion_token_ids == [7] * 5 and (other.finish_reason, other.stop_reason) == ("length", None)


# --------------------------------------------------------------------------------------------- sampling


def test_greedy_takes_the_argmax():
    logits = torch.tensor([[0.1, 2.0, -1.0], [3.0, 0.0, 0.5]])
    assert sample(logits, [text_seq(0, 2), text_seq(1, 2)]) == [1, 0]


def test_repetition_penalty_applies_to_prompt_and_output_even_when_greedy():
    seq = text_seq(0, 2, repetition_penalty=4.0)  # prompt tokens 1 and 2
    logits = torch.tensor([[1.0, 3.0, 2.0, 0.9]])
    # token 1: 3/4 = 0.75; token 2: 2/4 = 0.5; token 0 wins.
    assert sample(logits, [seq]) == [0]
    negative = torch.tensor([[-1.0, -0.3, -0.2, -0.7]])
    # penalised negative logits are multiplied: token 1 -> -1.2, token 2 -> -0.8, so token 3 (-0.7) wins.
    assert sample(negative, [seq]) == [3]


def test_presence_and_frequency_penalties_lower_the_answers_tokens_only_even_when_greedy():
    seq = text_seq(0, 2, presence_penalty=0.5, frequency_penalty=0.4)  # prompt tokens 1 and 2: not penalised
    for token in (3, 3, 0):
        seq.append_token(token)
    logits = torch.tensor([[2.0, 1.5, 1.0, 2.4]])
    # token 0: 2.0 - 0.5 - 0.4 = 1.1; token 3 (twice): 2.4 - 0.5 - 0.8 = 1.1; token 1 (in the prompt only) wins.
    assert sample(logits, [seq]) == [1]
    assert torch.allclose(apply_presence_frequency_penalties(logits[0].clone(), seq.completion_token_ids, 0.5, 0.4),
                          torch.tensor([1.1, 1.5, 1.0, 1.1]))
    encouraged = text_seq(1, 2, frequency_penalty=-2.0)
    encouraged.append_token(2)  # a negative penalty raises the answer's own tokens
    assert sample(torch.tensor([[0.0, 0.0, -1.5, 0.0]]), [encouraged]) == [2]


def test_logit_bias_is_added_to_the_raw_logits_before_the_penalties_even_when_greedy():
    logits = torch.tensor([[2.0, 1.0, 0.5, 0.0]])
    assert sample(logits, [text_seq(0, 2, logit_bias={1: 1.5})]) == [1]  # 1 + 1.5 beats 2
    assert sample(logits, [text_seq(0, 2, logit_bias={0: -100, 1: -100})]) == [2]  # banned
    # the penalty sees the biased logit: token 1 (in the prompt) 1 + 3 = 4, / 4 = 1, below token 0's 2
    assert sample(logits, [text_seq(0, 2, logit_bias={1: 3}, repetition_penalty=4.0)]) == [0]
    assert logits.tolist() == [[2.0, 1.0, 0.5, 0.0]]  # the caller's logits (the logprobs') unchanged
    hot = text_seq(0, 2, logit_bias={3: 100}, temperature=1.0, seed=3)
    assert {sample(logits, [hot])[0] for _ in range(20)} == {3}  # +100 all but forces a token
    assert SamplingParams(logit_bias={5: 0, 2: -1.5, 1: 3}).logit_bias == ((1, 3.0), (2, -1.5))


def test_prompt_logprobs_come_from_each_chunks_rows_once_even_when_a_preempted_prompt_is_computed_again():
    from atb_models.engine.logprobs import add_prompt_logprobs, split_prompt_rows

    seq, other = text_seq(0, 10, prompt_logprobs=1), text_seq(1, 3)
    vocab = 20000

    def step(chunks):  # a prefill over (seq, start, end) chunks; row r of a chunk is sure of prompt token r + 1
        rows = []
        for s, start, end in chunks:
            s.prefill_start, s.prefill_end = start, end
            picks = s.token_ids[start + 1:end + 1] + [0] * (end + 1 - s.num_tokens) if s.wants_prompt_logprobs else [0]
            rows += [torch.nn.functional.one_hot(torch.tensor(t), vocab).float() * 50 for t in picks]
        last, pending = split_prompt_rows(torch.stack(rows), [s for s, _, _ in chunks], record=True)
        add_prompt_logprobs(pending)
        return last

    last = step([(seq, 0, 4), (other, 0, 3)])
    assert last.shape[0] == 2 and seq.prompt_logprobs_counted == 5 and seq.wants_prompt_logprobs
    step([(seq, 0, 6)])  # preempted, computed again from the start: positions 1..4 are not added twice
    step([(seq, 6, 10)])
    assert not seq.wants_prompt_logprobs and seq.prompt_logprobs[0] is None and len(seq.prompt_logprobs) == 10
    assert [e.token_id for e in seq.prompt_logprobs[1:]] == seq.token_ids[1:10]
    assert all(e.logprob > -1e-3 and e.top[0][0] == e.token_id for e in seq.prompt_logprobs[1:])
    assert step([(seq, 0, 10)]).shape[0] == 1  # owing nothing, it has one row again


def test_prompt_logprobs_of_a_preempted_prompt_recomputed_in_a_shorter_chunk_are_not_added_twice():
    """A prompt preempted after two chunks starts again with a chunk of the step's budget, shorter than what it had
    counted: the count stays, and the chunks after it add only the positions not yet counted."""
    from atb_models.engine.logprobs import add_prompt_logprobs, split_prompt_rows

    seq, vocab = text_seq(0, 12, prompt_logprobs=0), 20000

    def step(start, end):  # row r of the chunk is sure of prompt token start + r + 1
        seq.prefill_start, seq.prefill_end = start, end
        picks = seq.token_ids[start + 1:end + 1] + [0] * (end + 1 - seq.num_tokens)
        rows = torch.stack([torch.nn.functional.one_hot(torch.tensor(t), vocab).float() * 50 for t in picks])
        add_prompt_logprobs(split_prompt_rows(rows, [seq], record=True)[1])

    step(0, 4)
    step(4, 8)  # then preempted: computed again from the start, 4 tokens a step
    for start in (0, 4, 8):
        step(start, start + 4)
    assert seq.prompt_logprobs_counted == 12 and len(seq.prompt_logprobs) == 12
    assert [e.token_id for e in seq.prompt_logprobs[1:]] == seq.token_ids[1:12]


def test_token_logprobs_of_many_rows_are_taken_a_slice_at_a_time_with_the_same_values():
    from atb_models.engine.logprobs import LOGPROB_ROWS, token_logprobs

    logits = torch.randn(2 * LOGPROB_ROWS + 5, 40)
    tokens = torch.randint(0, 40, (len(logits),)).tolist()
    expected = torch.log_softmax(logits, -1)
    entries = token_logprobs(logits, tokens, 2)
    assert [e.token_id for e in entries] == tokens
    assert all(abs(e.logprob - expected[i, e.token_id].item()) < 1e-6 for i, e in enumerate(entries))
    assert [e.top[0][0] for e in entries] == expected.argmax(-1).tolist()
    # rank: 1 + the tokens more likely than the row's token
    assert [e.rank for e in entries] == [int((row > row[t]).sum()) + 1 for row, t in zip(expected, tokens)]
    assert {e.rank for e in entries} > {1}


def test_top_k_keeps_only_the_k_best():
    out = top_k_top_p_filter(torch.tensor([1.0, 4.0, 3.0, 2.0]), top_k=2, top_p=1.0)
    assert torch.isinf(out[[0, 3]]).all() and torch.isfinite(out[[1, 2]]).all()


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = top_k_top_p_filter(probs.log(), top_k=0, top_p=0.75)
    assert torch.isfinite(out[:2]).all() and torch.isinf(out[2:]).all()
    only_best = top_k_top_p_filter(probs.log(), top_k=0, top_p=0.1)
    assert torch.isfinite(only_best[0]) and torch.isinf(only_best[1:]).all()


def test_min_p_keeps_the_tokens_at_least_min_p_times_as_likely_as_the_best():
    probs = torch.tensor([0.5, 0.3, 0.15, 0.05])
    out = min_p_filter(probs.log(), 0.2)  # 0.2 * 0.5 = 0.1
    assert torch.isfinite(out[:3]).all() and torch.isinf(out[3])
    seq = text_seq(0, 2, temperature=1.0, min_p=0.7, seed=1)  # only the best is within 0.7 of itself
    assert {sample(probs.log().unsqueeze(0), [seq])[0] for _ in range(10)} == {0}


def test_min_tokens_holds_back_eos_until_the_answer_is_that_long():
    seq = text_seq(0, 2, min_tokens=2)
    logits = torch.tensor([[0.0, 1.0, 5.0, 3.0]])  # token 2: the eos below
    assert sample(logits, [seq], eos_token_ids=(2,)) == [3]
    seq.append_token(3)
    assert sample(logits, [seq], eos_token_ids=(2,)) == [3]
    seq.append_token(3)
    assert sample(logits, [seq], eos_token_ids=(2,)) == [2]


def test_no_penalty_brings_back_a_token_held_back_even_at_the_edge_of_float32():
    # A huge repetition penalty holds the seen tokens' (negative) logits at float32's least finite value; eos,
    # held back by min_tokens as -inf, was clamped to that same value by the temperature's range check and drawn.
    seq = text_seq(0, 2, first_token=0, max_tokens=20, min_tokens=10, temperature=1.0, seed=0,
                   repetition_penalty=1e39)
    for token in (3, 4, 5, 6, 7):
        seq.append_token(token)  # every token but eos (2) seen
    assert 2 not in {sample(torch.full((1, 8), -1.0), [seq], eos_token_ids=(2,))[0] for _ in range(100)}


def test_seed_makes_sampling_reproducible_and_temperature_spreads_choices():
    logits = torch.zeros(1, 50)

    def draws(seed):
        seq = text_seq(0, 2, temperature=1.0, seed=seed)
        return [sample(logits, [seq])[0] for _ in range(20)]

    assert draws(123) == draws(123)
    assert draws(123) != draws(124)
    assert len(set(draws(123))) > 5


def test_seeds_that_differ_only_above_32_bits_draw_differently():
    # torch's CPU generator keeps a seed's low 32 bits: 1 and 2**32 + 1 (or 2**63 + 1) drew the same tokens.
    logits = torch.zeros(1, 500)

    def draws(seed):
        seq = text_seq(0, 2, temperature=1.0, seed=seed)
        return [sample(logits, [seq])[0] for _ in range(20)]

    assert len({tuple(draws(seed)) for seed in (1, 2**32 + 1, 2**63 + 1, 2**64 - 1, 2**32 - 1)}) == 5
    assert draws(2**63 + 1) == draws(2**63 + 1)
    small = torch.Generator().manual_seed(77)  # a seed below 2**32 draws as torch's own generator seeded with it
    assert draws(77) == [int(torch.multinomial(logits[0].softmax(-1), 1, generator=small)) for _ in range(20)]


def test_min_tokens_holds_back_stop_tokens_too():
    seq = text_seq(0, 2, min_tokens=1, stop_token_ids=[1])
    logits = torch.tensor([[0.0, 5.0, 4.0, 3.0]])
    assert sample(logits, [seq], eos_token_ids=(2,)) == [3]  # neither the stop token nor eos before min_tokens
    seq.append_token(3)
    assert sample(logits, [seq], eos_token_ids=(2,)) == [1]


def test_allowed_token_ids_are_the_only_tokens_drawn_greedy_or_sampled():
    logits = torch.tensor([[9.0, 1.0, 5.0, 3.0, 0.0]])
    assert sample(logits, [text_seq(0, 2, allowed_token_ids=[3, 4])]) == [3]
    hot = text_seq(0, 2, allowed_token_ids=[1, 4], temperature=2.0, seed=3)
    assert {sample(logits, [hot])[0] for _ in range(30)} == {1, 4}


def test_a_bad_word_rules_out_its_last_token_only_where_the_answer_ends_with_the_ones_before_it():
    seq = text_seq(0, 2, bad_words=["unused: the engine tokenizes them"])
    seq.bad_words = ((3,), (5, 2))  # token 3 alone, and token 2 after token 5
    logits = torch.tensor([[0.0, 1.0, 5.0, 9.0, 0.0, 0.0]])
    assert sample(logits, [seq]) == [2]  # 3 never; 2 while the answer does not end with 5
    seq.append_token(5)
    assert sample(logits, [seq]) == [1]
    seq.append_token(1)
    assert sample(logits, [seq]) == [2]
    del seq.token_ids[2:]  # no answer yet, and a prompt ending with 5: only the answer's tokens count
    seq.token_ids[1] = 5
    assert sample(logits, [seq]) == [2]


def test_sampling_params_reject_nonsense():
    for bad in (dict(temperature=-1), dict(top_p=0), dict(top_p=1.5), dict(top_k=-1), dict(max_tokens=0),
                dict(repetition_penalty=0), dict(presence_penalty=2.5), dict(frequency_penalty=float("nan")),
                dict(logprobs=21), dict(logprobs=-1), dict(logprobs=True), dict(logit_bias={1: 101}),
                dict(logit_bias={-1: 1}), dict(logit_bias={"1": 1}), dict(logit_bias={1: float("nan")}),
                dict(logit_bias=[(1, 1), (1, 2)]), dict(logit_bias=5), dict(min_p=1.5), dict(min_p=-0.1),
                dict(min_tokens=-1), dict(min_tokens=5, max_tokens=4), dict(prompt_logprobs=21),
                dict(stop_token_ids=7), dict(stop_token_ids=[-1]), dict(stop_token_ids=[1.0]),
                dict(allowed_token_ids=[]), dict(allowed_token_ids="12"), dict(bad_words=[" "]), dict(bad_words=[1]),
                dict(bad_words=["caf\udce9"]),  # (the engine's tokenizer refused it: the server's engine died)
                dict(include_stop_str_in_output="yes"), dict(skip_special_tokens=1),
                dict(allowed_token_ids=[1], structured_output=StructuredOutput(regex="a"))):
        with pytest.raises(UserError):
            SamplingParams(**bad)


# --------------------------------------------------------------------------------------------- end to end


@pytest.fixture(scope="module")
def llm(tiny_checkpoint):
    return LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", max_batch_size=4, max_input_length=256,
               max_output_length=16, block_size=16)


def test_sampling_parameters_change_outputs_as_they_should(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    greedy = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    assert llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids == greedy
    hot = SamplingParams(max_tokens=12, temperature=5.0, seed=7, ignore_eos=True)
    a, b = (llm.generate(request, hot)[0].token_ids for _ in range(2))
    assert a == b and a != greedy
    other_seed = llm.generate(request, SamplingParams(max_tokens=12, temperature=5.0, seed=8, ignore_eos=True))
    assert other_seed[0].token_ids != a
    top1 = llm.generate(request, SamplingParams(max_tokens=12, temperature=5.0, top_k=1, seed=7, ignore_eos=True))
    assert top1[0].token_ids == greedy  # top-k 1 leaves only the argmax
    penalised = llm.generate(request, SamplingParams(max_tokens=12, repetition_penalty=50.0, ignore_eos=True))
    ids = penalised[0].token_ids
    assert len(set(ids)) == len(ids)  # a huge penalty never repeats a token
    banned = SamplingParams(max_tokens=12, ignore_eos=True, logit_bias={token: -100 for token in set(greedy)})
    assert not set(llm.generate(request, banned)[0].token_ids) & set(greedy)
    eos = llm.model_config.eos_token_ids[0]
    ended = llm.generate(request, SamplingParams(max_tokens=12, min_tokens=3, logit_bias={eos: 100}))[0]
    assert ended.token_ids[3:] == [eos] and ended.finish_reason == "stop"  # eos from the 4th token on
    with pytest.raises(UserError, match="min_tokens 20 is more than max_tokens 16"):
        llm.add_request(request[0], SamplingParams(min_tokens=20))
    beyond = llm.model_config.hf_config.vocab_size
    with pytest.raises(UserError, match=f"logit_bias names token id {beyond}, beyond the vocabulary"):
        llm.add_request([{"text": "Hi"}], SamplingParams(logit_bias={beyond: 1}))
    assert not llm.has_unfinished()


def test_structured_output_holds_the_answer_to_a_schema_a_regex_or_a_choice_and_ends_it_when_complete(
        tiny_checkpoint):
    import json
    import re

    from atb_models.engine.structured_output import StructuredOutput

    llm = LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", max_batch_size=4, max_input_length=256,
              max_output_length=1024, block_size=16)
    schema = {"type": "object", "properties": {"ok": {"type": "boolean"}, "colour": {"enum": ["red", "green"]}},
              "required": ["ok", "colour"], "additionalProperties": False}
    request = [{"text": "Answer in JSON."}]
    outs = llm.generate([request] * 7, [
        SamplingParams(structured_output=StructuredOutput(json=schema)),
        SamplingParams(temperature=1.0, seed=3, structured_output=StructuredOutput(json=json.dumps(schema))),
        SamplingParams(temperature=1.0, seed=4, structured_output=StructuredOutput(choice=["yes", "no", "maybe"])),
        SamplingParams(temperature=1.0, seed=1, repetition_penalty=3.0,
                       structured_output=StructuredOutput(regex=r"[0-9]{3}-[a-z]{2}")),
        SamplingParams(ignore_eos=True, logit_bias={0: 100}, structured_output=StructuredOutput(choice=["no"])),
        # a grammar in llama.cpp's GBNF (vLLM's guided_grammar) and in Lark
        SamplingParams(temperature=1.0, seed=5, structured_output=StructuredOutput(
            grammar='root ::= "(" digit ("+" digit)* ")"\ndigit ::= [0-9]')),
        SamplingParams(temperature=1.0, seed=6, structured_output=StructuredOutput(
            grammar='start: "ab" ("," word)*\nword: /[a-z]{2}/'))])
    assert all(out.finish_reason == "stop" for out in outs), [(out.text, out.finish_reason) for out in outs]
    assert re.fullmatch(r"\([0-9](\+[0-9])*\)", outs[5].text) and re.fullmatch(r"ab(,[a-z]{2})*", outs[6].text)
    for out in outs[:2]:
        answer = json.loads(out.text)
        assert set(answer) == {"ok", "colour"} and isinstance(answer["ok"], bool) and answer["colour"] in schema[
            "properties"]["colour"]["enum"]
    assert outs[2].text in ("yes", "no", "maybe") and re.fullmatch(r"[0-9]{3}-[a-z]{2}", outs[3].text)
    assert outs[4].text == "no"  # no bias brings back a token the constraint rules out
    unconstrained = llm.generate([request], SamplingParams(max_tokens=8))[0]
    assert not unconstrained.text.startswith("{")  # (the random model does not write JSON by itself)
    nested = {"type": "string"}
    for _ in range(130):  # (deeper than the JSON parser llguidance reads the schema with goes: it raised a
        nested = {"type": "object", "properties": {"a": nested}}  # ValueError, which ended a server's engine)
    for bad, message in ((dict(json={"type": "foo"}), "cannot be used: Invalid type"),
                         (dict(json=nested), "cannot be used: recursion limit exceeded"),
                         (dict(regex="("), "cannot be used"), (dict(choice=[]), "choice must be a list"),
                         (dict(grammar='root ::= "a" undefined'), "cannot be used"),
                         (dict(grammar="start: /[/"), "cannot be used")):
        with pytest.raises(UserError, match=message):
            llm.add_request(request, SamplingParams(structured_output=StructuredOutput(**bad)))
    with pytest.raises(UserError, match="exactly one of json, regex, choice, grammar"):
        StructuredOutput(regex="a", grammar="start: \"b\"")
    assert not llm.has_unfinished()


def test_a_constraint_is_compiled_once_for_the_sequences_that_share_it_each_matching_on_its_own(llm, monkeypatch):
    # (a compile runs on the engine's thread: a request's n choices each compiled a large schema anew, seconds
    # during which every other request waited)
    from atb_models.engine.structured_output import KEPT_CONSTRAINTS, Matchers, StructuredOutput

    compiled, grammar = [], StructuredOutput.compiled_grammar
    monkeypatch.setattr(StructuredOutput, "compiled_grammar", lambda self: compiled.append(self) or grammar(self))
    matchers = Matchers(llm.tokenizer, llm.model_config.hf_config.vocab_size, llm.model_config.eos_token_ids)
    vocab = llm.model_config.hf_config.vocab_size
    first = matchers.matcher(StructuredOutput(regex="[0-9]{2}"))
    fresh = first.allowed(vocab)
    second = matchers.matcher(StructuredOutput(regex="[0-9]{2}"))
    assert len(compiled) == 1
    while not first.advance(int(first.allowed(vocab).nonzero()[-1])):
        pass
    assert torch.equal(second.allowed(vocab), fresh)  # the first's tokens were its own
    assert torch.equal(matchers.matcher(StructuredOutput(regex="[0-9]{2}")).allowed(vocab), fresh)
    matchers.matcher(StructuredOutput(choice=["no"]))
    assert len(compiled) == 2
    for digits in range(KEPT_CONSTRAINTS):  # the latest KEPT_CONSTRAINTS are kept, the oldest out first
        matchers.matcher(StructuredOutput(regex=f"[0-9]{{{digits + 3}}}"))
    matchers.matcher(StructuredOutput(regex="[0-9]{2}"))
    assert len(compiled) == 2 + KEPT_CONSTRAINTS + 1


def test_a_structured_output_too_large_for_the_engines_thread_to_compile_is_refused_when_made():
    from atb_models.engine.structured_output import MAX_CHOICE_STRINGS, MAX_SPEC_CHARS, StructuredOutput

    for too_large in (dict(regex="a" * (MAX_SPEC_CHARS + 1)), dict(json={"description": "a" * MAX_SPEC_CHARS})):
        with pytest.raises(UserError, match=f"longer than {MAX_SPEC_CHARS} characters"):
            StructuredOutput(**too_large)
    with pytest.raises(UserError, match=f"choice must be a list of 1..{MAX_CHOICE_STRINGS} non-empty strings"):
        StructuredOutput(choice=["x"] * (MAX_CHOICE_STRINGS + 1))
    assert len(StructuredOutput(choice=["x"] * MAX_CHOICE_STRINGS).choice) == MAX_CHOICE_STRINGS


def test_a_json_answers_properties_come_in_the_schemas_order(llm):
    schema = {"type": "object", "properties": {"zeta": {"enum": [1]}, "alpha": {"enum": [2]}},
              "required": ["zeta", "alpha"], "additionalProperties": False}
    out = llm.generate([[{"text": "Hi"}]], SamplingParams(max_tokens=16, structured_output=StructuredOutput(
        json=schema, compact=True)))[0]
    assert out.text.startswith('{"zeta"'), out.text  # (a tiny random model may not reach the end in 16 tokens)


def test_a_structured_output_no_text_can_match_is_refused_when_the_request_is_added(llm):
    for never in (StructuredOutput(regex="[^\\x00-\\x{10FFFF}]"), StructuredOutput(json={"$ref": "#"})):
        with pytest.raises(UserError, match="the structured output admits no answer"):
            llm.add_request([{"text": "Hi"}], SamplingParams(max_tokens=4, structured_output=never))
    assert not llm.has_unfinished()


def test_the_tokenizers_llguidance_form_is_made_by_prepare_not_at_the_first_constrained_request(llm, monkeypatch):
    # (the server calls prepare() before it serves: made at the first request, it held the engine's thread)
    import llguidance

    from atb_models.engine.structured_output import Matchers, StructuredOutput

    matchers = Matchers(llm.tokenizer, llm.model_config.hf_config.vocab_size, llm.model_config.eos_token_ids)
    matchers.prepare()
    monkeypatch.setattr(llguidance, "LLTokenizer", lambda *a, **kw: pytest.fail("made again"))
    assert matchers.matcher(StructuredOutput(regex="[0-9]")).allowed(llm.model_config.hf_config.vocab_size).any()
    monkeypatch.setitem(sys.modules, "llguidance", None)  # missing: prepare() does nothing, a request says why
    lacking = Matchers(llm.tokenizer, llm.model_config.hf_config.vocab_size, llm.model_config.eos_token_ids)
    lacking.prepare()
    with pytest.raises(UserError, match="structured output needs the llguidance package"):
        lacking.matcher(StructuredOutput(regex="[0-9]"))


def test_a_choice_the_tokenizer_would_normalize_is_answered_byte_for_byte(llm):
    # The checkpoint's tokenizer, as Qwen's, normalizes to NFC: the choice's tokens were taken as those of "\u00e9",
    # which the constraint then refused, and the answer ended ("stop") on half a character.
    from atb_models.engine.structured_output import StructuredOutput

    for choices in (["e\u0301"], ["cafe\u0301 noir", "cafe\u0301 au lait"]):  # (forced: one way to go on)
        for seed in (None, 1):
            params = SamplingParams(structured_output=StructuredOutput(choice=choices),
                                    **({} if seed is None else dict(temperature=3.0, seed=seed)))
            out = llm.generate([[{"text": "Pick one."}]], params)[0]
            assert out.text in choices and out.finish_reason == "stop", out.text


def test_a_stop_string_ends_the_answer_only_where_it_ends_past_min_tokens(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    full = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = full.text[:2]  # at the very start: it would end the answer at once
    assert llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop]))[0].text == ""
    out = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=4))[0]
    past = len(llm.tokenizer.decode(full.token_ids[:4], skip_special_tokens=True)) - len(stop) + 1
    at = full.text.find(stop, past)
    assert out.text == (full.text if at < 0 else full.text[:at]) and len(out.token_ids) >= 4


def test_text_only_grows_while_min_tokens_hold_stop_strings_off(llm):
    # A stop string that starts within the first min_tokens tokens' text and ends past it ends the answer there;
    # its start, shown while no stop was searched for, was taken back (a stream sent it, then repeated text).
    request = [[{"text": "Describe the colours of the sky."}]]
    full = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    lengths = [len(llm.tokenizer.decode(full.token_ids[:k], skip_special_tokens=True)) for k in range(8)]
    for min_tokens in range(2, 8):
        stop = full.text[max(0, lengths[min_tokens - 1] - 1):lengths[min_tokens] + 1]  # across the boundary
        llm.add_request(request[0], SamplingParams(max_tokens=12, ignore_eos=True, stop=[stop], min_tokens=min_tokens))
        texts = []
        while llm.has_unfinished():
            texts.extend(out.text for out in llm.step())
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:])), (stop, texts)


def test_stop_token_ids_end_the_answer_at_their_token_whose_text_is_cut_unless_asked_for(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    full = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0].token_ids
    k = next(i for i in range(1, 12) if full[i] not in full[:i])
    decode = llm.tokenizer.decode
    for include, text in ((False, decode(full[:k])), (True, decode(full[:k + 1]))):
        out = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, stop_token_ids=[full[k], 1],
                                                   include_stop_str_in_output=include))[0]
        assert (out.token_ids, out.text, out.finish_reason, out.stop_reason) == (full[:k + 1], text, "stop", full[k])
    with pytest.raises(UserError, match="stop_token_ids names token id 99999999, beyond the vocabulary"):
        llm.add_request(request[0], SamplingParams(stop_token_ids=[99999999]))


def test_a_stop_string_is_the_stop_reason_and_kept_in_the_text_with_include_stop_str_in_output(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    full = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    stop = full.text[5:8]
    for include, text in ((False, full.text[:full.text.index(stop)]),
                          (True, full.text[:full.text.index(stop) + len(stop)])):
        out = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, stop=["never there", stop],
                                                   include_stop_str_in_output=include))[0]
        assert (out.text, out.finish_reason, out.stop_reason) == (text, "stop", stop)
    # the tokenizer's eos has no stop_reason; generation_config's other eos ids are named, as vLLM's stop tokens are
    for eos in llm.model_config.eos_token_ids:
        ended = llm.generate(request, SamplingParams(max_tokens=12, logit_bias={eos: 100}))[0]
        named = None if eos == llm.tokenizer.eos_token_id else eos
        assert (ended.token_ids, ended.finish_reason, ended.stop_reason) == ([eos], "stop", named)
    assert len(llm.model_config.eos_token_ids) == 2 and llm.tokenizer.eos_token_id in llm.model_config.eos_token_ids


def test_skip_special_tokens_false_keeps_special_tokens_in_the_text(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    special = llm.tokenizer.convert_tokens_to_ids("<|vision_start|>")
    params = dict(max_tokens=4, ignore_eos=True, logit_bias={special: 100})
    kept = llm.generate(request, SamplingParams(skip_special_tokens=False, **params))[0]
    skipped = llm.generate(request, SamplingParams(**params))[0]
    assert kept.token_ids == skipped.token_ids == [special] * 4
    assert (kept.text, skipped.text) == ("<|vision_start|>" * 4, "")


def test_allowed_token_ids_and_bad_words_shape_the_answer(llm):
    request = [[{"text": "Describe the colours of the sky."}]]
    full = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True))[0]
    allowed = sorted(set(full.token_ids[1:]))[:3] + [11]
    out = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, allowed_token_ids=allowed))[0]
    assert set(out.token_ids) <= set(allowed) and out.token_ids[0] != full.token_ids[0]
    encode = llm.tokenizer.encode
    # a token of the answer that is a word, written alone or after a space
    at, word = next((i, llm.tokenizer.decode([t]).strip()) for i, t in enumerate(full.token_ids)
                    if llm.tokenizer.decode([t]).strip().isalpha() and [t] in (
                        encode(llm.tokenizer.decode([t]).strip()), encode(" " + llm.tokenizer.decode([t]).strip())))
    banned = llm._bad_word_tokens((word,))
    assert (full.token_ids[at],) in banned and llm._bad_word_tokens(("  " + word,)) == banned  # (leading spaces)
    out = llm.generate(request, SamplingParams(max_tokens=12, ignore_eos=True, bad_words=[word]))[0]
    assert not any(tuple(out.token_ids[i:i + len(b)]) == b for b in banned for i in range(12))
    assert out.token_ids[:at] == full.token_ids[:at] and out.token_ids[at] != full.token_ids[at]


def test_outputs_report_counts_and_finish_reasons(llm):
    outs = llm.generate([[{"text": "Hello"}], [{"text": "Hi there"}]],
                        [SamplingParams(max_tokens=3, ignore_eos=True), SamplingParams(max_tokens=5, ignore_eos=True)])
    assert [len(o.token_ids) for o in outs] == [3, 5]
    assert all(o.finish_reason == "length" and o.prompt_token_count > 2 for o in outs)
    assert outs[0].text == llm.tokenizer.decode(outs[0].token_ids, skip_special_tokens=True)


def test_a_bad_request_fails_alone(llm, tmp_path):
    outs = llm.generate([[{"text": "Hello"}], [{"image": str(tmp_path / "missing.jpg")}, {"text": "?"}],
                         [{"text": "x " * 400}], [{"text": "caf\udce9"}]],
                        SamplingParams(max_tokens=2, ignore_eos=True))
    assert outs[0].error is None and len(outs[0].token_ids) == 2
    assert "missing.jpg" in outs[1].error and outs[1].finish_reason == "error"
    assert "--max_input_length" in outs[2].error
    assert "lone surrogate" in outs[3].error and outs[3].finish_reason == "error"  # (UTF-8 cannot hold it)
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_message_with_malformed_tool_calls_fails_alone(llm):
    from atb_models import Message
    from atb_models.multimodal.prompt import ToolCall

    question = Message("user", ({"text": "Weather?"},))
    result = Message("tool", ({"text": "sunny"},), (), "call_1")
    calls = [({"id": "call_1", "name": "f", "arguments": "{}"},), (ToolCall("call_1", "f", "[1]"),),
             (ToolCall("call_1", "f", None),), None]
    requests_ = [[question, Message("assistant", (), c), result] for c in calls]
    requests_ += [[question, Message("tool", ({"text": "sunny"},), (), 7)],
                  [question, Message("assistant", (), (ToolCall("call_1", "f", '{"a": 1}'),)), result]]
    outs = llm.generate(requests_ + [[question]], SamplingParams(max_tokens=2, ignore_eos=True))
    assert [o.error is None for o in outs] == [False] * 6 + [True], [o.error for o in outs]
    assert "ToolCall" in outs[0].error and "JSON object's text" in outs[1].error and "tool_call_id" in outs[4].error
    # (a well-formed call: this engine's template, the checkpoint's, does not show calls; test_serve's does)
    assert "does not show an assistant's tool calls" in outs[5].error
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_text_too_long_for_any_tokenization_is_refused_without_tokenizing_it(llm, monkeypatch):
    limit = llm.max_input_length * llm.preprocessor.token_characters
    tokenized = []
    tokenize = llm.preprocessor._tokenize
    monkeypatch.setattr(llm.preprocessor, "_tokenize", lambda *args: tokenized.append(1) or tokenize(*args))
    outs = llm.generate([[{"text": "x" * (limit + 1)}], [{"text": "Hello"}]], SamplingParams(max_tokens=2))
    assert f"has {limit + 1} characters, more than --max_input_length" in outs[0].error
    assert outs[1].error is None and tokenized == [1]  # only the short one was tokenized
    assert llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_functions_and_calls_too_long_for_any_tokenization_are_refused_without_tokenizing_them(llm, monkeypatch):
    """The tools and an assistant's calls are rendered into the prompt: they count toward the text's bound."""
    from atb_models.multimodal.prompt import Message, ToolCall

    limit = llm.max_input_length * llm.preprocessor.token_characters
    tokenized = []
    tokenize = llm.preprocessor._tokenize
    monkeypatch.setattr(llm.preprocessor, "_tokenize", lambda *args: tokenized.append(1) or tokenize(*args))
    tool = {"type": "function", "function": {"name": "f", "description": "x" * limit}}
    with pytest.raises(UserError, match="more than --max_input_length"):
        llm.preprocessor([Message("user", ({"text": "Hi"},))], tools=[tool])
    call = ToolCall("call_1", "f", '{"a": "' + "x" * limit + '"}')
    with pytest.raises(UserError, match="more than --max_input_length"):
        llm.preprocessor([Message("user", ({"text": "Hi"},)), Message("assistant", (), (call,)),
                          Message("tool", ({"text": "done"},), (), "call_1")])
    assert tokenized == []
    llm.preprocessor([Message("user", ({"text": "Hi"},))], tools=[dict(tool, function={"name": "f"})])
    assert tokenized == [1]


def test_a_chat_template_file_empty_or_unreadable_is_a_user_error_not_the_checkpoints_template(tmp_path):
    from atb_models.engine.llm import _read_template

    (tmp_path / "empty.jinja").write_text(" \n")
    with pytest.raises(UserError, match="the chat template .*empty.jinja is empty"):
        _read_template(str(tmp_path / "empty.jinja"))
    with pytest.raises(UserError, match="cannot read the chat template .*missing.jinja"):
        _read_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "t.jinja").write_text("{{ messages }}")
    assert _read_template(str(tmp_path / "t.jinja")) == "{{ messages }}"


def test_token_ids_too_many_for_max_input_length_are_refused_without_decoding_them(llm, monkeypatch):
    decoded = []
    decode = llm.preprocessor.tokenizer.decode
    monkeypatch.setattr(llm.preprocessor.tokenizer, "decode", lambda ids, **kw: decoded.append(1) or decode(ids, **kw))
    with pytest.raises(UserError, match=f"the prompt has {llm.max_input_length + 1} tokens, more than "
                                        f"--max_input_length {llm.max_input_length}"):
        llm.preprocessor.plain([7] * (llm.max_input_length + 1))
    assert not decoded
    assert llm.preprocessor.plain([7] * llm.max_input_length).token_ids == [7] * llm.max_input_length


def test_requests_taken_one_at_a_time_step_to_their_end_and_an_idle_step_does_nothing(llm):
    assert not llm.has_unfinished() and llm.step() == []
    request_id = llm.add_request([{"text": "Hello"}], SamplingParams(max_tokens=3, ignore_eos=True))
    outputs = []
    while llm.has_unfinished():
        outputs.extend(llm.step())
    assert [o.request_id for o in outputs] == [request_id] * 3 and outputs[-1].finish_reason == "length"
    assert llm.step() == [] and llm.block_manager.num_free_blocks == llm.block_manager.num_blocks


def test_a_closed_engine_takes_no_more_requests(tiny_checkpoint):
    llm = LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", max_batch_size=2, max_output_length=4)
    llm.close()
    for call in (lambda: llm.generate([[{"text": "Hi"}]]), lambda: llm.add_request([{"text": "Hi"}]), llm.step):
        with pytest.raises(UserError, match="this engine was closed"):
            call()


def test_enable_prefix_caching_must_be_a_bool(tiny_checkpoint):
    with pytest.raises(UserError, match="enable_prefix_caching must be True or False, got 'no'"):
        LLM(str(tiny_checkpoint()), dtype="float32", device="cpu", enable_prefix_caching="no")


def test_max_tokens_above_max_output_length_is_refused(llm):
    out = llm.generate([[{"text": "Hello"}]], SamplingParams(max_tokens=99))[0]
    assert "--max_output_length" in out.error


def test_outputs_carry_their_own_timings_and_on_finish_sees_each_request_once(llm, tmp_path):
    seen = []
    outs = llm.generate([[{"text": "Hello"}], [{"image": str(tmp_path / "missing.jpg")}], [{"text": "Hi there"}]],
                        [SamplingParams(max_tokens=2, ignore_eos=True), SamplingParams(),
                         SamplingParams(max_tokens=6, ignore_eos=True)],
                        on_finish=lambda out: seen.append(out.request_id))
    assert sorted(seen) == [0, 1, 2]
    for out in (outs[0], outs[2]):
        assert 0 <= out.admitted_s <= out.first_token_s <= out.finished_s
    assert outs[2].finished_s >= outs[0].finished_s  # six tokens finish after two
    assert outs[1].admitted_s is None and outs[1].error
