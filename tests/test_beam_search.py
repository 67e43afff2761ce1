"""Beam search (LLM.beam_search) against transformers' generate(num_beams=...), and its use of the KV cache."""
import json
import shutil

import pytest
import torch

from atb_models import LLM, SamplingParams, UserError
from atb_models.benchmark.engines import reference_inputs
from atb_models import BeamSearchParams
from tests.parity_utils import reference_model

# (beam_width, length_penalty, early_stopping, max_tokens): transformers' three early-stopping rules, penalties that
# favour short, neutral and long answers, and answers that cross KV blocks (block_size 16).
SETTINGS = [(4, 1.0, False, 12), (3, 0.5, True, 10), (2, -1.0, "never", 8), (5, 2.0, False, 20)]


@pytest.fixture(scope="module")
def checkpoint(tiny_checkpoint, tmp_path_factory):
    """The tiny checkpoint with eos ids that its random model draws now and then, so that beams end by eos too
    (with its own, they never do)."""
    path = tmp_path_factory.mktemp("beam") / "model"
    shutil.copytree(tiny_checkpoint(), path)
    config = json.loads((path / "generation_config.json").read_text())
    config["eos_token_id"] = [255, 313]
    (path / "generation_config.json").write_text(json.dumps(config))
    return path


@pytest.fixture(scope="module")
def llm(checkpoint):
    return LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_input_length=512,
               max_output_length=32, block_size=16)


def reference_beams(llm, checkpoint, request, width, length_penalty, early_stopping, max_tokens):
    """transformers' answers (tokens up to an eos, scores), best first. transformers 4.46 copies a prompt's inputs
    for its beams row by row (repeat_interleave), which for Qwen2-VL's pixel_values, the patches of every medium
    one after another, and its grids, one row a medium, garbles each beam's media; its later versions repeat them
    whole, as here."""
    model = reference_model(str(checkpoint))
    prompt = llm.preprocessor(request)
    inputs = reference_inputs([prompt], pad_token_id=0, device=torch.device("cpu"))
    expand = model._expand_inputs_for_generation

    def expand_patches_whole(expand_size=1, is_encoder_decoder=False, input_ids=None, **kwargs):
        patches = {name: kwargs.pop(name) for name in ("pixel_values", "pixel_values_videos", "image_grid_thw",
                                                       "video_grid_thw") if kwargs.get(name) is not None}
        input_ids, kwargs = expand(expand_size, is_encoder_decoder, input_ids, **kwargs)
        return input_ids, dict(kwargs, **{name: value.repeat(expand_size, 1) for name, value in patches.items()})

    model._expand_inputs_for_generation = expand_patches_whole
    try:
        with torch.no_grad():
            out = model.generate(**inputs, max_new_tokens=max_tokens, do_sample=False, num_beams=width,
                                 num_return_sequences=width, length_penalty=length_penalty,
                                 early_stopping=early_stopping, output_scores=True, return_dict_in_generate=True,
                                 eos_token_id=list(llm.model_config.eos_token_ids), pad_token_id=0)
    finally:
        del model._expand_inputs_for_generation
    answers = []
    for tokens, score in zip(out.sequences[:, len(prompt.token_ids):].tolist(), out.sequences_scores.tolist()):
        ends = [i for i, token in enumerate(tokens) if token in llm.model_config.eos_token_ids]
        # (transformers writes its first eos id after a finished answer, whichever eos ended it)
        answers.append((tokens[:ends[0]] if ends else tokens, bool(ends), score))
    return answers


@pytest.mark.parametrize("width, length_penalty, early_stopping, max_tokens", SETTINGS)
def test_beam_search_answers_as_transformers_num_beams(llm, checkpoint, sample_image_path, sample_video_path, width,
                                                       length_penalty, early_stopping, max_tokens):
    requests = [[{"text": "Hello there, how are you"}], [{"text": "A"}],
                [{"image": str(sample_image_path)}, {"text": "What is it?"}],
                [{"video": str(sample_video_path)}, {"image": str(sample_image_path)}, {"text": "And these?"}]]
    params = BeamSearchParams(beam_width=width, max_tokens=max_tokens, length_penalty=length_penalty,
                              early_stopping=early_stopping)
    outputs = llm.beam_search(requests, params)
    for request, output in zip(requests, outputs):
        assert output.error is None and len(output.sequences) == width
        expected = reference_beams(llm, checkpoint, request, width, length_penalty, early_stopping, max_tokens)
        got = [(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids, s.finish_reason == "stop", s.score)
               for s in output.sequences]
        assert [g[:2] for g in got] == [e[:2] for e in expected], request
        assert max(abs(g[2] - e[2]) for g, e in zip(got, expected)) < 1e-4
        for s in output.sequences:  # (an eos ends an answer: its last token, left out of the text)
            assert (s.token_ids[-1] in llm.model_config.eos_token_ids) == (s.finish_reason == "stop")
            assert s.text == llm.tokenizer.decode(s.token_ids[:-1] if s.finish_reason == "stop" else s.token_ids,
                                                  skip_special_tokens=True)
            assert s.score == pytest.approx(s.cumulative_logprob / len(s.token_ids) ** length_penalty)
        assert (output.text, output.token_ids) == (output.sequences[0].text, output.sequences[0].token_ids)
    assert llm.block_manager.num_used_blocks == 0  # every beam's blocks, shared or copied, given back


def test_some_of_the_parity_answers_end_by_eos(llm, sample_image_path):
    """The parity cases above are worth their name only if beams end by eos as well as by length."""
    reasons = {s.finish_reason for width, penalty, early, tokens in SETTINGS for output in llm.beam_search(
        [[{"text": "Hello there, how are you"}], [{"text": "A"}],
         [{"image": str(sample_image_path)}, {"text": "What is it?"}]],
        BeamSearchParams(width, tokens, penalty, early)) for s in output.sequences}
    assert reasons == {"stop", "length"}


def test_prompts_searched_together_answer_as_each_alone(llm, sample_image_path):
    """Searches share steps (and the prefill of their prompts), never each other's beams or blocks."""
    requests = [[{"text": "Hello there, how are you"}], [{"image": str(sample_image_path)}, {"text": "Colour?"}],
                [{"text": "A"}], [{"text": "Count: one two"}]]
    params = [BeamSearchParams(4, 12), BeamSearchParams(2, 9, early_stopping=True), BeamSearchParams(1, 5),
              BeamSearchParams(3, 14, ignore_eos=True)]
    together = llm.beam_search(requests, params)
    for request, each, output in zip(requests, params, together):
        [alone] = llm.beam_search([request], each)
        assert [s.token_ids for s in output.sequences] == [s.token_ids for s in alone.sequences]
        # (float32 sums of other batches: equal to their last bits or nearly)
        assert [s.score for s in output.sequences] == pytest.approx([s.score for s in alone.sequences], abs=1e-5)
    assert all(s.finish_reason == "length" and len(s.token_ids) == 14 for s in together[3].sequences)  # ignore_eos


def test_beams_held_to_a_small_cache_search_in_turn_and_a_prompt_that_cannot_fit_fails_alone(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_input_length=64,
              max_output_length=32, block_size=16, num_blocks=12)
    requests = [[{"text": "Hello there, how are you"}], [{"text": "A"}], [{"text": "Count: one two"}]]
    outputs = llm.beam_search(requests, BeamSearchParams(4, 16))  # 11 blocks at most each: one at a time
    wide = llm.beam_search(requests[:1], BeamSearchParams(8, 30))[0]
    assert "needs up to" in wide.error and "the cache has 12" in wide.error and not wide.sequences
    roomy = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_input_length=64,
                max_output_length=32, block_size=16)
    assert [[s.token_ids for s in o.sequences] for o in outputs] == [
        [s.token_ids for s in o.sequences] for o in roomy.beam_search(requests, BeamSearchParams(4, 16))]
    assert llm.block_manager.num_used_blocks == 0


def test_beam_search_parameters_and_requests_asked_wrongly_fail_in_one_line(llm):
    for bad, message in ((dict(beam_width=0), "beam_width must be an integer in 1..64"),
                         (dict(beam_width=True), "beam_width must be"), (dict(max_tokens=0), "max_tokens must be"),
                         (dict(length_penalty=float("nan")), "length_penalty must be a finite number"),
                         (dict(early_stopping="sometimes"), "early_stopping must be"),
                         (dict(ignore_eos=1), "ignore_eos must be True or False")):
        with pytest.raises(UserError, match=message):
            BeamSearchParams(**bad)
    with pytest.raises(UserError, match=r"params\[0\] is None, not a BeamSearchParams"):
        llm.beam_search([[{"text": "a"}]], [None])
    too_long, missing = llm.beam_search([[{"text": "a"}], [{"image": "/no/such.png"}]], BeamSearchParams(2, 64))
    assert "exceeds --max_output_length 32" in too_long.error and "/no/such.png" in missing.error


@pytest.mark.parametrize("length_penalty, early_stopping", [(2.0, "never"), (1.0, "never"), (-1.0, False)])
def test_one_beam_is_greedy_search_whatever_the_stopping_rule(llm, length_penalty, early_stopping):
    """transformers' generate(num_beams=1) is greedy search, its early_stopping and length_penalty unused: an answer
    ends at its first eos even where "never" would look past it for a longer, better scored one."""
    requests = [[{"text": "ok"}], [{"text": "Count: one two"}]]
    greedy = llm.generate(requests, SamplingParams(max_tokens=32))
    assert {output.finish_reason for output in greedy} == {"stop"}  # (else the eos rule goes untested)
    beams = llm.beam_search(requests, BeamSearchParams(1, 32, length_penalty, early_stopping))
    assert [(b.token_ids, b.finish_reason) for b in beams] == [(list(g.token_ids), "stop") for g in greedy]


def test_add_request_from_a_beam_searchs_on_finish_is_refused_naming_beam_search(llm):
    refusals = []

    def add(output):
        with pytest.raises(UserError) as refused:
            llm.add_request([{"text": "b"}])
        refusals.append(str(refused.value))

    [output] = llm.beam_search([[{"text": "a"}]], BeamSearchParams(2, 4), on_finish=add)
    assert output.error is None and "beam_search()" in refusals[0] and not llm.has_unfinished()


def test_a_chunked_prefill_engine_searches_a_prompt_longer_than_its_chunk(checkpoint, llm, sample_image_path):
    """Chunked prefill takes prompts longer than max_prefill_tokens (README): a beam search's prompt too, computed a
    chunk a step before its beams start, answered as by an engine that prefills it whole."""
    chunked = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_input_length=512,
                  max_output_length=32, block_size=16, enable_chunked_prefill=True, max_prefill_tokens=32)
    requests = [[{"image": str(sample_image_path)}, {"text": "What is it?"}], [{"text": "A"}],
                [{"text": "Hello there, how are you"}]]
    params = BeamSearchParams(3, 12)
    expected = [[s.token_ids for s in o.sequences] for o in llm.beam_search(requests, params)]
    # (first in line, or after prompts whose beams run; then again, its leading blocks cached)
    for order in ([0, 1, 2], [1, 2, 0], [1, 2, 0]):
        outputs = chunked.beam_search([requests[i] for i in order], params)
        assert [o.error for o in outputs] == [None] * 3
        assert [[s.token_ids for s in o.sequences] for o in outputs] == [expected[i] for i in order]
    assert outputs[2].prompt_token_count > 2 * 32 and outputs[2].cached_prompt_tokens > 0
    assert chunked.block_manager.num_used_blocks == 0


def test_an_engine_closed_by_on_finish_stops_the_search_as_generate_does(checkpoint):
    llm = LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=2, max_input_length=64,
              max_output_length=8, block_size=16)
    with pytest.raises(UserError, match="this engine was closed"):
        llm.beam_search([[{"text": "a"}], [{"text": "b"}], [{"text": "c"}]], BeamSearchParams(2, 4),
                        on_finish=lambda output: llm.close())
    assert llm.block_manager.num_used_blocks == 0


def test_beam_searches_taken_by_add_request_run_between_other_requests_steps_and_answer_as_alone(llm,
                                                                                                 sample_image_path):
    """The incremental API (the server's): a search's rounds and the scheduler's steps take turns, sharing the KV
    cache without touching each other's blocks; each answers as beam_search() and generate() do on their own."""
    from atb_models import SamplingParams

    picture = [{"image": str(sample_image_path)}, {"text": "What is it?"}]
    text = [{"text": "Hello there, how are you"}]
    beams, sampling = BeamSearchParams(3, 10), SamplingParams(max_tokens=12, ignore_eos=True)
    [alone_picture, alone_text] = llm.beam_search([picture, text], beams)
    [plain] = llm.generate([text], sampling)
    ids = [llm.add_request(picture, beams), llm.add_request(text, sampling), llm.add_request(text, beams)]
    aborted = llm.add_request(picture, BeamSearchParams(2, 10))
    done = {}
    for step in range(200):
        if not llm.has_unfinished():
            break
        if step == 2:
            assert llm.abort(aborted).finish_reason == "abort"
        done.update((out.request_id, out) for out in llm.step() if out.finished)
    assert [s.token_ids for s in done[ids[0]].sequences] == [s.token_ids for s in alone_picture.sequences]
    assert [s.token_ids for s in done[ids[2]].sequences] == [s.token_ids for s in alone_text.sequences]
    assert done[ids[1]].token_ids == plain.token_ids and aborted not in done
    assert llm.block_manager.num_used_blocks == 0 and llm.block_manager.promised == 0


def small_cache_llm(checkpoint):
    """12 KV blocks of 16 tokens: a search of width 3 over a chat's 49 prompt tokens and 16 new ones may take 10."""
    return LLM(str(checkpoint), dtype="float32", device="cpu", max_batch_size=8, max_input_length=64,
               max_output_length=32, block_size=16, num_blocks=12)


def test_a_request_waiting_for_the_blocks_a_running_search_holds_waits_for_it_to_end(checkpoint):
    """A prompt that arrives while a search's beams hold (or are promised) the blocks it needs, with nothing else
    running, waits for the search: the step runs the search's round (it was an empty step, a RuntimeError that
    stopped a server)."""
    llm = small_cache_llm(checkpoint)
    search = llm.add_request([{"text": "Hello there, how are you"}], BeamSearchParams(3, 16))
    llm.step()
    other = llm.add_request([{"text": "Zebra xylo"}], SamplingParams(max_tokens=20, ignore_eos=True))  # 5 blocks
    assert llm.block_manager.num_free_blocks < 5
    done = {}
    for _ in range(100):
        if not llm.has_unfinished():
            break
        done.update((output.request_id, output) for output in llm.step() if output.finished)
    assert done[search].finish_reason == "length" and len(done[other].token_ids) == 20
    assert llm.block_manager.num_used_blocks == 0 and llm.block_manager.promised == 0


@pytest.mark.parametrize("starved", ["search", "prompt"])
def test_searches_and_other_requests_start_first_come_first_served_under_a_steady_stream(checkpoint, starved):
    """Under memory pressure, a search waits for every block its beams may take and a prompt for its own: neither
    may be passed over for ever by the other kind arriving after it (a busy server's steady stream, two always
    waiting), which took the blocks as they came free."""
    import random

    llm, lengths = small_cache_llm(checkpoint), random.Random(0)
    text = [{"text": "Hello there, how are you"}]

    def stream():
        if starved == "search":
            while len(llm.scheduler.waiting) < 2:
                llm.add_request(text, SamplingParams(max_tokens=lengths.randint(5, 30), ignore_eos=True))
        else:
            while len(llm.beams.waiting) < 2:
                llm.add_request(text, BeamSearchParams(2, 12))  # 8 of the 12 blocks

    stream()
    llm.step()
    request = (llm.add_request(text, BeamSearchParams(3, 16)) if starved == "search" else  # 10 blocks
               llm.add_request([{"text": "Zebra xylo"}], SamplingParams(max_tokens=20, ignore_eos=True)))  # 5
    for _ in range(300):
        stream()
        if any(output.request_id == request and output.finished for output in llm.step()):
            break
    else:
        raise AssertionError(f"the {starved} never ended")
    for request_id in list(llm._requests):
        llm.abort(request_id)
    assert not llm.has_unfinished()
    assert llm.block_manager.num_used_blocks == 0 and llm.block_manager.promised == 0
