"""Prefix caching and the vision-encoder cache (engine.block_manager, engine.encoder_cache): the hash chain names
blocks by their tokens and media, and with caching on every answer is the one caching off gives: sequential calls,
one batch sharing an image, preemption, eviction under a small cache, tensor parallelism."""
from __future__ import annotations

import json

import pytest
import torch
from PIL import Image

from atb_models import LLM, SamplingParams
from atb_models.demo.checkpoint import make_image
from atb_models.engine.block_manager import block_hashes
from atb_models.engine.sequence import Sequence
from atb_models.layers.sharding import ceil_div
from tests.parity_utils import LogitsRecorder
from tests.test_tensor_parallel import run_ranks

BLOCK = 16
OPTIONS = dict(dtype="float32", device="cpu", max_batch_size=4, max_input_length=1024, max_output_length=12,
               block_size=BLOCK)
PARAMS = SamplingParams(max_tokens=6, ignore_eos=True)


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prefix_media")
    paths = {}
    for name, seed in (("cat", 1), ("dog", 2), ("bird", 3)):
        paths[name] = folder / f"{name}.png"
        make_image(paths[name], width=224, height=168, seed=seed)
    pixels = Image.open(paths["cat"]).convert("RGB")
    pixels.putpixel((100, 80), tuple(255 - c for c in pixels.getpixel((100, 80))))
    paths["cat_one_pixel_off"] = folder / "cat_one_pixel_off.png"
    pixels.save(paths["cat_one_pixel_off"])
    return {name: str(path) for name, path in paths.items()}


@pytest.fixture(scope="module")
def path(tiny_checkpoint):
    return tiny_checkpoint(image_max_pixels=224 * 168)


def hashes(llm, request) -> list[str]:
    seq = Sequence(0, llm.preprocessor(request), PARAMS, 1)
    return block_hashes(seq, BLOCK, seq.num_tokens // BLOCK)


def test_the_hash_chain_names_blocks_by_their_tokens_and_media(path, images):
    llm = LLM(str(path), **OPTIONS)
    cat = hashes(llm, [{"image": images["cat"]}, {"text": "What is this?"}])
    assert len(cat) >= 4
    assert cat == hashes(llm, [{"image": images["cat"]}, {"text": "What is this?"}])  # same image: same blocks
    visual = llm.preprocessor([{"image": images["cat"]}]).visuals[0]
    first_image_block = visual.start // BLOCK
    for other in ("cat_one_pixel_off", "dog"):  # one pixel, or another image of the same size: no block shared
        theirs = hashes(llm, [{"image": images[other]}, {"text": "What is this?"}])
        assert len(theirs) == len(cat)  # the same placeholder count
        assert theirs[:first_image_block] == cat[:first_image_block]  # the system prompt before the image
        assert all(a != b for a, b in zip(theirs[first_image_block:], cat[first_image_block:]))
    # Text after the image changes nothing before it.
    longer = hashes(llm, [{"image": images["cat"]}, {"text": "What is this? Tell me more, please."}])
    assert longer[:len(cat) - 1] == cat[:len(cat) - 1]


def run_both(path, requests_per_call, **options):
    """Each call's outputs with caching on and off, and each engine's logits per call."""
    results = {}
    for caching in (True, False):
        llm = LLM(str(path), enable_prefix_caching=caching, **dict(OPTIONS, **options))
        calls = []
        for requests in requests_per_call:
            recorder = LogitsRecorder(llm)
            outputs = llm.generate(requests, PARAMS)
            assert all(out.error is None for out in outputs), [out.error for out in outputs]
            calls.append((outputs, {i: torch.stack(rows) for i, rows in recorder.by_seq.items()}))
        results[caching] = (llm, calls)
    return results


def assert_same_answers(results):
    (_, cached_calls), (_, plain_calls) = results[True], results[False]
    for (cached, cached_logits), (plain, plain_logits) in zip(cached_calls, plain_calls):
        assert [o.token_ids for o in cached] == [o.token_ids for o in plain]
        for i in plain_logits:
            assert (cached_logits[i] - plain_logits[i]).abs().max().item() < 1e-4


def test_sequential_questions_about_one_image_reuse_its_blocks_and_answer_as_without_caching(path, images):
    questions = ["What is this?", "Which colour is the sky in it?", "What is this?"]
    results = run_both(path, [[[{"image": images["cat"]}, {"text": q}]] for q in questions])
    assert_same_answers(results)
    llm, calls = results[True]
    first, second, third = (outputs[0] for outputs, _ in calls)
    assert (first.cached_prompt_tokens, first.cached_visual_items) == (0, 0)
    visual = llm.preprocessor([{"image": images["cat"]}]).visuals[0]
    # The second reuses every full block up to the question; the third, the same prompt again, all but the block
    # holding its last token.
    assert second.cached_prompt_tokens >= (visual.start + visual.num_tokens) // BLOCK * BLOCK
    assert second.cached_visual_items == 1
    assert third.cached_prompt_tokens == (third.prompt_token_count - 1) // BLOCK * BLOCK
    _, plain_calls = results[False]
    assert all(out.cached_prompt_tokens == 0 and out.cached_visual_items == 0
               for outputs, _ in plain_calls for out in outputs)


def test_one_batch_sharing_an_image_and_a_later_batch_answer_as_without_caching(path, images):
    batch = [[{"image": images["cat"]}, {"text": "What is this?"}],
             [{"image": images["cat"]}, {"text": "Which colour?"}],
             [{"image": images["dog"]}, {"text": "What is this?"}],
             [{"text": "Hello there"}]]
    results = run_both(path, [batch, list(reversed(batch))])
    assert_same_answers(results)
    _, calls = results[True]
    first, later = calls[0][0], calls[1][0]
    # Admitted in one step, the second cat question reads the first one's blocks as they are written.
    assert first[0].cached_prompt_tokens == 0 and first[1].cached_prompt_tokens > 0
    assert first[1].cached_visual_items == 1 and first[2].cached_visual_items == 0
    assert all(out.cached_prompt_tokens > 0 for out in later)


def test_preemption_with_caching_keeps_the_answers(path, images):
    # Four different images (nothing shared to save blocks), then the first again while the others run.
    requests = [[{"image": images[name]}, {"text": f"Question {i}"}]
                for i, name in enumerate(("cat", "dog", "bird", "cat_one_pixel_off", "cat"))]
    params = SamplingParams(max_tokens=12, ignore_eos=True)
    probe = LLM(str(path), **OPTIONS)
    prompt_blocks = ceil_div(len(probe.preprocessor(requests[0]).token_ids), BLOCK)
    answers = {}
    for caching in (True, False):
        llm = LLM(str(path), enable_prefix_caching=caching, num_blocks=2 * prompt_blocks, **OPTIONS)
        answers[caching] = [o.token_ids for o in llm.generate(requests, params)]
        assert llm.scheduler.num_preemptions > 0
        assert llm.block_manager.num_used_blocks == 0
    assert answers[True] == answers[False]


def test_a_small_cache_evicts_least_recently_used_and_the_encoder_cache_still_skips_the_tower(path, images):
    """Room for about one request: the cat's blocks are evicted by the dog's, so asking about the cat again
    computes its prompt, but its image features come from the encoder cache."""
    probe = LLM(str(path), **OPTIONS)
    prompt_blocks = ceil_div(len(probe.preprocessor([{"image": images["cat"]}, {"text": "What is this?"}]).token_ids),
                             BLOCK)
    llm = LLM(str(path), num_blocks=prompt_blocks + 1, **dict(OPTIONS, max_batch_size=1))
    plain = LLM(str(path), enable_prefix_caching=False, **dict(OPTIONS, max_batch_size=1))
    calls = [("cat", "What is this?"), ("cat", "Which colour?"), ("dog", "What is this?"), ("cat", "What is this?")]
    seen = []
    for image, question in calls:
        request = [[{"image": images[image]}, {"text": question}]]
        out, expected = llm.generate(request, PARAMS)[0], plain.generate(request, PARAMS)[0]
        assert out.token_ids == expected.token_ids
        seen.append((out.cached_prompt_tokens, out.cached_visual_items))
    assert seen[1][0] > 0 and seen[1][1] == 1         # the cat again: blocks and features cached
    assert seen[2] == (seen[2][0], 0)                 # the dog: a new image, through the tower
    assert seen[3][0] < seen[1][0] and seen[3][1] == 1  # the cat's image blocks evicted, its features kept
    assert len(llm.runner.encoder_cache) == 2


def test_each_cached_medium_holds_only_its_own_features_not_its_steps_batch(path, images):
    """The tower runs a step's media as one batch: an entry that stayed a slice of that output would keep the whole
    batch's memory alive, past its step-mates' eviction, while the budget counts only the slice."""
    llm = LLM(str(path), **OPTIONS)
    llm.generate([[{"image": images[name]}, {"text": "What is this?"}] for name in ("cat", "dog", "bird")], PARAMS)
    entries = list(llm.runner.encoder_cache._entries.values())
    assert len(entries) == 3
    assert [t.untyped_storage().nbytes() for t in entries] == [t.numel() * t.element_size() for t in entries]


def test_without_the_encoder_cache_budget_the_tower_runs_again(path, images):
    llm = LLM(str(path), encoder_cache_mb=0, num_blocks=8, **dict(OPTIONS, max_batch_size=1))
    for image in ("cat", "dog", "cat"):
        out = llm.generate([[{"image": images[image]}, {"text": "What is this?"}]], PARAMS)[0]
    assert out.cached_visual_items == 0 and len(llm.runner.encoder_cache) == 0


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_a_bad_encoder_cache_size_is_one_error(path, bad):
    from atb_models import UserError

    with pytest.raises(UserError, match="--encoder_cache_mb must be a whole number of MiB"):
        LLM(str(path), encoder_cache_mb=bad, **OPTIONS)


def test_one_image_at_two_per_item_max_pixels_gets_each_its_own_answer_as_the_flag_gives_it(path, images):
    """An item's max_pixels resizes its image (another grid, other pixels, another content hash), so the prefix and
    encoder caches, which name media by content, hold each size apart: in one engine, before and after the other
    size is cached, each answer is the one an engine built with that --max_pixels gives."""
    question = "What is this?"
    ceilings = (28 * 28 * 12, 28 * 28 * 24)  # below the checkpoint's 224 x 168 (48 tokens)
    expected = {}
    for ceiling in ceilings:
        flag = LLM(str(path), max_pixels=ceiling, **OPTIONS)
        expected[ceiling] = flag.generate([[{"image": images["cat"]}, {"text": question}]], PARAMS)[0].token_ids
    assert expected[ceilings[0]] != expected[ceilings[1]]  # (else the test could not tell the sizes apart)
    llm = LLM(str(path), **OPTIONS)
    calls = [list(ceilings), list(reversed(ceilings)), [ceilings[0], ceilings[0]]]  # (the last: from the caches)
    for ceiling_order in calls:
        outputs = llm.generate([[{"image": images["cat"], "max_pixels": ceiling}, {"text": question}]
                                for ceiling in ceiling_order], PARAMS)
        assert [out.token_ids for out in outputs] == [expected[ceiling] for ceiling in ceiling_order]
    assert outputs[1].cached_visual_items == 1
    default = llm.generate([[{"image": images["cat"]}, {"text": question}]], PARAMS)[0]
    assert default.prompt_token_count > outputs[0].prompt_token_count


def test_two_ranks_with_caching_give_one_ranks_uncached_tokens(path, images, tmp_path):
    requests = [[{"image": images["cat"]}, {"text": "What is this?"}],
                [{"image": images["cat"]}, {"text": "Which colour?"}],
                [{"image": images["cat"]}, {"text": "What is this?"}]]
    plain = LLM(str(path), enable_prefix_caching=False, **OPTIONS)
    expected = [plain.generate([r], SamplingParams(max_tokens=5, ignore_eos=True))[0].token_ids for r in requests]
    out = run_ranks(tmp_path, 2, {"model": str(path), "requests": requests, "max_tokens": 5, "max_batch_size": 1})
    outputs = json.loads((out / "outputs.json").read_text())
    assert [o["token_ids"] for o in outputs] == expected
    assert [o["cached_prompt_tokens"] > 0 for o in outputs] == [False, True, True]


def test_the_fourth_turn_of_a_chat_about_one_image_computes_only_its_new_tokens(path, images):
    from atb_models.multimodal.prompt import Message

    llm = LLM(str(path), **OPTIONS)
    plain = LLM(str(path), enable_prefix_caching=False, **OPTIONS)
    history = [Message("user", ({"image": images["cat"]}, {"text": "What is this?"}))]
    questions = ["Which colour is it?", "Is it big?", "Where is it?"]
    for turn in range(4):
        out, expected = llm.generate([history], PARAMS)[0], plain.generate([history], PARAMS)[0]
        assert out.token_ids == expected.token_ids and out.error is None
        if turn == 3:
            break
        computed_before = llm.preprocessor(history).token_ids + out.token_ids[:-1]  # K/V written in this turn
        history = history + [Message("assistant", ({"text": out.text},)), Message("user", ({"text": questions[turn]},))]
    prompt = llm.preprocessor(history).token_ids
    common = next((i for i, (a, b) in enumerate(zip(prompt, computed_before)) if a != b),
                  min(len(prompt), len(computed_before)))
    # Every full block of what the third turn computed that the fourth prompt repeats is reused; the rest of the
    # fourth prompt is its new turn (plus the part of a block that was not full).
    assert out.cached_prompt_tokens == min(common // BLOCK, (len(prompt) - 1) // BLOCK) * BLOCK
    assert len(prompt) - out.cached_prompt_tokens < len(prompt) - common + BLOCK
    assert common > len(prompt) // 2


def test_features_taken_from_the_encoder_cache_survive_their_eviction_within_the_step(path, images):
    """A budget of one medium: the cat's features come from the cache in a step that also runs the dog's, whose
    put evicts the cat's; the step still uses the cat's features it took."""
    llm = LLM(str(path), **OPTIONS)
    plain = LLM(str(path), enable_prefix_caching=False, **OPTIONS)
    llm.generate([[{"text": "First:"}, {"image": images["cat"]}]], PARAMS)
    llm.runner.encoder_cache.max_bytes = llm.runner.encoder_cache.bytes  # room for the cat's features alone
    batch = [[{"text": "A different question comes first here:"}, {"image": images["cat"]}],
             [{"image": images["dog"]}, {"text": "What is this?"}]]
    outputs = llm.generate(batch, PARAMS)
    assert [o.token_ids for o in outputs] == [o.token_ids for o in plain.generate(batch, PARAMS)]
    assert [o.cached_visual_items for o in outputs] == [1, 0]
    assert len(llm.runner.encoder_cache) == 1  # the dog's replaced the cat's


def test_a_16_bit_cache_keeps_decode_written_blocks_out_of_the_prefix_cache(tiny_checkpoint):
    """A decode step stores K/V rounded from float32 sums, a prefill of the same tokens rounds its own way: in a
    bfloat16 cache, a prompt that read an earlier answer's decode-written blocks was answered unlike with caching
    off. Only prefill-written blocks are cached there; a float32 cache, where both agree, caches the answer too."""
    from atb_models.engine.block_manager import BlockManager
    from atb_models.engine.scheduler import Scheduler
    from tests.test_engine import text_seq

    cached = {}
    for cache_decoded in (True, False):
        manager = BlockManager(num_blocks=20, block_size=4, cache_decoded_blocks=cache_decoded)
        scheduler = Scheduler(manager, 2, 100, eos_token_ids=[])
        seq = text_seq(0, 10, max_tokens=12)  # a 10-token prompt: blocks 0-1 prefill-written, 2 shared, 3-4 decoded
        scheduler.add(seq)
        while scheduler.has_work():
            seqs, _ = scheduler.schedule()
            scheduler.finish_step(seqs, [7] * len(seqs))
        follow_up = text_seq(1, 0, first_token=0)
        follow_up.token_ids = follow_up.token_ids + seq.token_ids + [5]
        cached[cache_decoded] = len(manager.cached_prefix(follow_up))
    assert cached == {True: 5, False: 2}

    from tests.test_kernels import NATIVE_BF16

    for dtype in ("float32", "bfloat16") if NATIVE_BF16 else ("float32",):
        llm = LLM(str(tiny_checkpoint()), dtype=dtype, device="cpu", max_input_length=64, max_output_length=8)
        assert llm.block_manager.cache_decoded_blocks == (dtype == "float32")
