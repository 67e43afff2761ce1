"""The kit's Qwen2-VL against transformers' reference implementation on random tiny checkpoints:
greedy tokens identical, float32 logits within 1e-4, for every kind of input and for continuous batching."""
import os
import pytest
import torch

from atb_models import LLM, SamplingParams
from atb_models.demo.checkpoint import TinyShape, make_image
from atb_models.host import cpu_flags
from atb_models.layers.sharding import ceil_div
from tests.parity_utils import LogitsRecorder, reference_generate, reference_prompt_logits
from tests.test_kernels import NO_NATIVE_BF16, float32_library_expected, refuses_bf16

MAX_NEW = 6
TOLERANCE = 1e-4

SHAPES = {
    "gqa": TinyShape(),
    "mha_tied": TinyShape(num_key_value_heads=4, tie_word_embeddings=True),
    "mqa_3layers": TinyShape(num_key_value_heads=1, num_hidden_layers=3, vision_depth=1),
    # MLP weights of >= 256K elements: on the CPU they run through oneDNN in its packed layout, the rest F.linear.
    "packed_mlp": TinyShape(hidden_size=256, intermediate_size=1024, num_hidden_layers=1, vision_depth=1),
    # A tied LM head of >= 256K elements in 64-row groups: packed for the CPU's panel kernel, the embedding reading
    # its rows from there.
    "packed_tied_head": TinyShape(hidden_size=512, intermediate_size=1024, num_hidden_layers=1, vision_depth=1,
                                  num_attention_heads=8, tie_word_embeddings=True, vocab_size=640),
}


def make_llm(path, **kwargs):
    options = dict(dtype="float32", device="cpu", max_batch_size=4, max_input_length=1024, max_output_length=16,
                   block_size=16)
    options.update(kwargs)
    return LLM(str(path), **options)


def assert_matches_reference(llm, path, requests):
    recorder = LogitsRecorder(llm)
    outputs = llm.generate(requests, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    for i, (request, out) in enumerate(zip(requests, outputs)):
        assert out.error is None, out.error
        prompt = llm.preprocessor(request)
        ref_tokens, ref_logits = reference_generate(path, prompt, MAX_NEW)
        assert out.token_ids == ref_tokens, f"request {i}"
        ours = recorder.by_seq[i]
        assert len(ours) == len(ref_logits)
        worst = max((a - b).abs().max().item() for a, b in zip(ours, ref_logits))
        assert worst < TOLERANCE, f"request {i}: logits differ by {worst}"
    return outputs


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    d = tmp_path_factory.mktemp("parity_media")
    wide = d / "wide.png"
    make_image(wide, width=600, height=30, seed=3)       # aspect ratio 20:1
    odd = d / "odd.jpg"
    make_image(odd, width=97, height=131, seed=4)
    return {"wide": str(wide), "odd": str(odd)}


@pytest.mark.parametrize("shape_name", sorted(SHAPES))
def test_text_and_one_image_match_transformers(tiny_checkpoint, sample_image_path, shape_name):
    path = tiny_checkpoint(shape=SHAPES[shape_name])
    llm = make_llm(path)
    if shape_name == "packed_tied_head":
        from atb_models.kernels.linear import PanelLinear, is_panel_packed

        model = llm.runner.model
        packs = isinstance(model.lm_head.kernel, PanelLinear)  # (an AVX-512 CPU's: elsewhere oneDNN keeps it tied)
        assert is_panel_packed(model.lm_head.weight) == packs and (model.model.embed_tokens.weight is None) == packs
        # where the CPU has AMX, the float32 products of these bfloat16-valued weights run on its tiles in three parts
        import os

        from atb_models.kernels.linear import BF16_AMX_ENV, F32_TILES_NAME
        from atb_models.kernels.native import NativeLibrary

        library = NativeLibrary.load() if packs else None  # (None where the AVX2 library packs it: no tiles)
        tiles = library is not None and bool(library.atb_bf16_amx_available()) and os.environ.get(BF16_AMX_ENV) != "0"
        assert (F32_TILES_NAME in llm.runner.kernels.describe()) == tiles
        assert library is None or library.atb_f32_use_amx(-1) == int(tiles)
    # The image goes through the kit's own rotary and quick-GELU where a native library loads (any AVX-512 CPU; the
    # AVX2 one for this float32 model on a CPU with AVX2 and FMA).
    native = float32_library_expected(llm.runner.plan)
    assert ("vision rotary native" in llm.runner.kernels.describe()) == native
    assert ("quick-GELU native" in llm.runner.kernels.describe()) == native
    assert_matches_reference(llm, path, [
        [{"text": "Hello, what colour is the sky?"}],
        [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}],
    ])


def test_two_images_of_odd_sizes_match_transformers(tiny_checkpoint, media):
    path = tiny_checkpoint()
    llm = make_llm(path)
    assert_matches_reference(llm, path, [
        [{"image": media["wide"]}, {"text": "Compare"}, {"image": media["odd"]}, {"text": "these two."}],
    ])


def test_image_and_video_in_one_prompt_match_transformers(tiny_checkpoint, sample_image_path, sample_video_path):
    path = tiny_checkpoint()
    llm = make_llm(path)
    assert_matches_reference(llm, path, [
        [{"video": str(sample_video_path)}, {"image": str(sample_image_path)}, {"text": "Describe both."}],
    ])


def test_video_given_as_frames_matches_transformers(tiny_checkpoint, sample_frames):
    path = tiny_checkpoint()
    llm = make_llm(path)
    assert_matches_reference(llm, path, [
        [{"video": [str(f) for f in sample_frames]}, {"text": "What happens in this video?"}],
    ])


def test_logprobs_are_the_reference_models_log_softmax_whatever_the_sampling(tiny_checkpoint, sample_image_path):
    """Each generated token's logprob and the step's top 3 are transformers' log-softmax of its logits, for a
    greedy request and, beside it in one batch, a sampled one with a penalty (raw logprobs, not the draw's)."""
    path = tiny_checkpoint()
    llm = make_llm(path)
    request = [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}]
    greedy, sampled = llm.generate([request, [{"text": "Tell me a story."}]], [
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, logprobs=3),
        SamplingParams(max_tokens=MAX_NEW, ignore_eos=True, logprobs=0, temperature=2.0, top_k=5, seed=7,
                       repetition_penalty=1.5)])
    ref_tokens, ref_logits = reference_generate(path, llm.preprocessor(request), MAX_NEW)
    assert greedy.token_ids == ref_tokens and len(greedy.logprobs) == MAX_NEW
    for entry, token, logits in zip(greedy.logprobs, ref_tokens, ref_logits):
        expected = torch.log_softmax(logits, -1)
        assert entry.token_id == token and abs(entry.logprob - expected[token].item()) < TOLERANCE
        assert [i for i, _ in entry.top] == torch.topk(expected, 3).indices.tolist()
        assert all(abs(v - expected[i].item()) < TOLERANCE for i, v in entry.top)
    assert [e.token_id for e in sampled.logprobs] == sampled.token_ids and all(not e.top for e in sampled.logprobs)
    assert all(e.logprob <= 0 for e in sampled.logprobs)
    assert make_llm(path).generate([request], SamplingParams(max_tokens=2))[0].logprobs is None  # not asked


@pytest.mark.parametrize("chunked", [False, True], ids=["whole", "chunked"])
def test_prompt_logprobs_are_the_reference_models_log_softmax_over_the_prompt(tiny_checkpoint, sample_image_path,
                                                                              chunked):
    """Each prompt token's logprob given those before it (visual tokens included) and the top 2 at each position
    are transformers' log-softmax of its prompt logits: computed whole or 24 tokens a step, beside a request asking
    for none, and again for a second copy of the prompt whose blocks the first put in the prefix cache."""
    path = tiny_checkpoint()
    llm = make_llm(path, enable_chunked_prefill=chunked, max_prefill_tokens=24 if chunked else -1)
    request = [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}]
    asking = SamplingParams(max_tokens=2, ignore_eos=True, prompt_logprobs=2)
    first, plain = llm.generate([request, [{"text": "Hello"}]], [asking, SamplingParams(max_tokens=2)])
    prompt = llm.preprocessor(request)
    expected = torch.log_softmax(reference_prompt_logits(path, prompt), -1)
    assert plain.prompt_logprobs is None
    again = llm.generate([request], asking)[0]
    assert again.cached_prompt_tokens == 0  # a prefix in the cache has no logits: computed again
    reference_tokens, _ = reference_generate(path, prompt, 2)
    for output in (first, again):
        assert output.token_ids == reference_tokens
        entries = output.prompt_logprobs
        assert len(entries) == len(prompt.token_ids) and entries[0] is None
        for position, entry in enumerate(entries[1:], start=1):
            row = expected[position - 1]
            assert entry.token_id == prompt.token_ids[position]
            assert abs(entry.logprob - row[entry.token_id].item()) < TOLERANCE
            assert [i for i, _ in entry.top] == torch.topk(row, 2).indices.tolist()
    if chunked:
        assert sum(record.is_prefill for record in llm.step_records) > 2  # the prompt took several chunks


def test_chunked_prefill_matches_transformers_with_images_split_across_chunks(tiny_checkpoint, sample_image_path,
                                                                             media):
    """Prompts computed 24 tokens a step (images straddling chunks take their features whole, each chunk its
    slice), alongside decode steps of the requests already running."""
    path = tiny_checkpoint()
    llm = make_llm(path, enable_chunked_prefill=True, max_prefill_tokens=24)
    assert_matches_reference(llm, path, [
        [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}],
        [{"image": media["wide"]}, {"text": "Compare"}, {"image": media["odd"]}, {"text": "these two."}],
        [{"text": "Hello"}],
    ])
    kinds = [record.is_prefill for record in llm.step_records]
    assert kinds.count(True) > 3 and any(a and not b for a, b in zip(kinds, kinds[1:]))


def test_continuous_batch_of_eight_equals_each_request_alone(tiny_checkpoint, sample_image_path, media,
                                                             sample_frames):
    path = tiny_checkpoint()
    requests = [
        [{"text": "Hi"}],
        [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}],
        [{"text": "Describe a long and winding road through the green hills at night, please."}],
        [{"image": media["odd"]}, {"text": "Colour?"}],
        [{"video": [str(f) for f in sample_frames]}, {"text": "Describe this video."}],
        [{"image": media["wide"]}, {"image": str(sample_image_path)}, {"text": "Two pictures."}],
        [{"text": "The sky is blue and the grass is"}],
        [{"image": str(sample_image_path)}, {"text": "Is there a cat?"}],
    ]
    # Three slots for eight requests: later requests are admitted while earlier ones decode, and different
    # max_tokens make sequences finish at different steps.
    batched = make_llm(path, max_batch_size=3)
    params = [SamplingParams(max_tokens=3 + i % 4, ignore_eos=True) for i in range(len(requests))]
    outs = batched.generate(requests, params)
    assert any(r.is_prefill for r in batched.step_records[3:]), "no admission happened mid-run"
    alone = make_llm(path, max_batch_size=1)
    for request, p, out in zip(requests, params, outs):
        single = alone.generate([request], p)[0]
        assert out.token_ids == single.token_ids
        assert len(out.token_ids) == p.max_tokens


def test_preemption_under_a_small_cache_keeps_outputs(tiny_checkpoint, sample_image_path):
    path = tiny_checkpoint()
    requests = [[{"image": str(sample_image_path)}, {"text": f"Question {i}"}] for i in range(4)]
    # 17 new tokens cross at least one block boundary (blocks of 16) whatever the prompt length.
    params = SamplingParams(max_tokens=17, ignore_eos=True)
    roomy = make_llm(path, max_batch_size=4, max_output_length=17).generate(requests, params)
    # Room for three prompts and one spare block: the fourth request waits, and the three running ones
    # outgrow the cache, so the youngest is preempted and recomputed. (Prefix caching off: the shared image would
    # save the blocks; tests/test_prefix_cache.py preempts with it on.)
    prompt_blocks = ceil_div(roomy[0].prompt_token_count, 16)
    tight_llm = make_llm(path, max_batch_size=4, max_output_length=17, num_blocks=3 * prompt_blocks + 1,
                         enable_prefix_caching=False)
    tight = tight_llm.generate(requests, params)
    assert [o.token_ids for o in tight] == [o.token_ids for o in roomy]
    assert tight_llm.scheduler.num_preemptions > 0
    assert tight_llm.block_manager.num_free_blocks == tight_llm.block_manager.num_blocks


@pytest.mark.parametrize("layout,shards", [("nested", 1), ("classic", 3), ("nested", 2)])
def test_checkpoint_layouts_load_the_same_model(tiny_checkpoint, sample_image_path, layout, shards):
    request = [[{"image": str(sample_image_path)}, {"text": "What is this?"}]]
    params = SamplingParams(max_tokens=4, ignore_eos=True)
    base = make_llm(tiny_checkpoint())
    other = make_llm(tiny_checkpoint(layout=layout, shards=shards))
    rec_a, rec_b = LogitsRecorder(base), LogitsRecorder(other)
    assert base.generate(request, params)[0].token_ids == other.generate(request, params)[0].token_ids
    assert torch.equal(torch.stack(rec_a.by_seq[0]), torch.stack(rec_b.by_seq[0]))


# Every linear of the language model large enough for the CPU's packed kernels: on an AVX-512 CPU a bfloat16 decode
# step then runs the native decoder layer (kernels.decoder_layer.NativeDecoderLayer) on bf16 panels and KV cache.
# Heads of 64 (language model) and 80 (vision tower): sizes the kit's bfloat16 attention takes.
NATIVE_BF16_SHAPE = TinyShape(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                              num_key_value_heads=2, vision_depth=1, vision_embed_dim=160, vision_num_heads=2)
# Logits of about 1.5 after two bf16 layers: bf16 steps there are 2^-7, and the two sides round at different points.
BF16_TOLERANCE = 0.04


def test_bf16_matches_transformers_in_bf16(tiny_checkpoint, sample_image_path):
    """Greedy tokens identical to transformers' bf16 where its own bf16 is deterministic (the same tokens twice),
    logits within bf16's resolution; on an AVX-512 CPU through the native bf16 decode path, where the CPU has
    AVX512-BF16 the prompt's attention through the kit's bfloat16 kernel (the image's too where it has no AMX), and
    where it has AMX-BF16 every product on the kit's AMX tiles (unless ATB_MODELS_CPU_BF16_AMX=0 turns them off:
    then, where the CPU has AVX512-BF16, decode's rows by the dot product where it measures faster)."""
    from atb_models.kernels.attention import NativeBf16Attention
    from atb_models.kernels.decoder_layer import NativeDecoderLayer

    path = tiny_checkpoint(shape=NATIVE_BF16_SHAPE)
    if refuses_bf16(lambda: make_llm(path, dtype="bfloat16")):
        pytest.skip(NO_NATIVE_BF16)
    llm = make_llm(path, dtype="bfloat16")
    kernels = llm.runner.kernels
    if torch.backends.cpu.get_cpu_capability() == "AVX512":
        assert isinstance(kernels.decoder_layer, NativeDecoderLayer)
        assert all(kernels.decoder_layer.weights_of(layer) is not None for layer in llm.runner.model.model.layers)
    assert ("vision rotary native" in kernels.describe()) == (torch.backends.cpu.get_cpu_capability() == "AVX512")
    flags = cpu_flags()
    native_attention = torch.backends.cpu.get_cpu_capability() == "AVX512" and "avx512_bf16" in flags
    assert isinstance(kernels.attention, NativeBf16Attention) == native_attention
    assert isinstance(kernels.vision_attention, NativeBf16Attention) == (native_attention and "amx_bf16" not in flags)
    if "amx_bf16" in flags and native_attention and os.environ.get("ATB_MODELS_CPU_BF16_AMX") != "0":
        assert "on AMX tiles" in kernels.describe()
    requests = [[{"text": "Hello, what colour is the sky?"}],
                [{"image": str(sample_image_path)}, {"text": "What is in the picture?"}]]
    recorder = LogitsRecorder(llm)
    outputs = llm.generate(requests, SamplingParams(max_tokens=MAX_NEW, ignore_eos=True))
    compared = 0
    for i, (request, out) in enumerate(zip(requests, outputs)):
        assert out.error is None, out.error
        prompt = llm.preprocessor(request)
        ref_tokens, ref_logits = reference_generate(path, prompt, MAX_NEW, torch.bfloat16)
        if reference_generate(path, prompt, MAX_NEW, torch.bfloat16)[0] != ref_tokens:
            continue  # transformers' bf16 is not deterministic on this prompt here: no reference to hold to
        assert out.token_ids == ref_tokens, f"request {i}"
        worst = max((a - b).abs().max().item() for a, b in zip(recorder.by_seq[i], ref_logits))
        assert worst < BF16_TOLERANCE, f"request {i}: logits differ by {worst}"
        compared += 1
    assert compared, "transformers' bf16 gave different tokens on each of its two runs of every prompt"


def test_bf16_checkpoint_is_converted_to_the_compute_dtype_on_load(tiny_checkpoint):
    llm = make_llm(tiny_checkpoint())  # stored as bfloat16, computed in float32
    assert {p.dtype for p in llm.runner.model.parameters()} == {torch.float32}
    assert llm.runner.model.model.layers[0].k_cache.dtype == torch.float32


# torch's and oneDNN's own switches: their operators run as on a CPU without AVX-512.
AVX2_ONLY_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2"}


@pytest.mark.slow
@pytest.mark.parametrize("shape_name", ["gqa", "packed_mlp", "packed_tied_head"])
def test_a_cpu_without_avx512_runs_the_avx2_linears_and_matches_transformers(tiny_checkpoint, sample_image_path,
                                                                             shape_name):
    """The path of a CPU with AVX2 but not AVX-512, emulated here by limiting torch and oneDNN to AVX2 in a fresh
    process: the AVX-512 library stays unloaded (saying why), the AVX2 one runs the packed linears (the MLP, the
    tied head: bfloat16 panels of the checkpoint's values), the norms, the activation, the decode attention and,
    where all four of a layer's linears are packed (packed_tied_head), whole decode steps of the decoder layers;
    and tokens and logits match transformers under the same limits."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    from atb_models.kernels.native import compiler

    if not {"avx2", "fma"} <= cpu_flags() or compiler() is None:
        pytest.skip("the AVX2 library needs a CPU with AVX2 and FMA and a C++ compiler")
    root = Path(__file__).resolve().parent.parent
    path = tiny_checkpoint(shape=SHAPES[shape_name])
    code = (
        "import torch\n"
        "from atb_models.cli.entry import configure_logging\n"
        "from tests.test_parity import assert_matches_reference, make_llm\n"
        "configure_logging()\n"
        "assert torch.backends.cpu.get_cpu_capability() == 'AVX2'\n"
        f"llm = make_llm({str(path)!r})\n"
        "print(llm.runner.kernels.describe())\n"
        "from atb_models.kernels.linear import is_panel_packed\n"
        f"assert any(is_panel_packed(p) for p in llm.runner.model.parameters()) == ({shape_name!r} != 'gqa')\n"
        "fused = llm.runner.kernels.decoder_layer\n"
        f"assert all(fused.weights_of(layer) is not None for layer in llm.runner.model.model.layers) == "
        f"({shape_name!r} == 'packed_tied_head')\n"
        f"assert_matches_reference(llm, {str(path)!r}, [[{{'text': 'Hello, what colour is the sky?'}}],\n"
        f"    [{{'image': {str(sample_image_path)!r}}}, {{'text': 'What is in the picture?'}}]])\n")
    env = {**os.environ, **AVX2_ONLY_ENV, "PYTHONPATH": os.pathsep.join([str(root), os.environ.get("PYTHONPATH", "")])}
    done = subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("linear panel (AVX2), RMSNorm native (AVX2), silu-and-mul native (AVX2), decode "
                                  "attention native (AVX2), prompt attention sdpa, vision attention sdpa, decoder "
                                  "layers native (AVX2), int8 weights torch"), \
        done.stdout
    assert "torch reports AVX2 for this CPU (ATEN_CPU_CAPABILITY=avx2)" in done.stderr
    assert "the kit's AVX2 kernels (cpu_kernels_avx2) run a float32 model's" in done.stderr
