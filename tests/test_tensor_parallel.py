"""Tensor parallelism with gloo on the CPU: the same tiny checkpoints at 1, 2, 4 and 8 ranks, including shapes
that need zero heads and replicated KV heads, give the tokens of one rank and of transformers.

Each behaviour runs at 2 ranks in the default run; its 4- and 8-rank cases are marked slow (`-m slow`)."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from atb_models.demo.checkpoint import TinyShape
from tests.parity_utils import free_port, reference_for_request

ROOT = Path(__file__).resolve().parents[1]
MAX_TOKENS = 5

# 12 query heads / 2 KV heads like Qwen2-VL-2B, 28 / 4 like 7B (head_dim 8 to stay tiny).
SHAPE_2B = TinyShape(hidden_size=192, intermediate_size=256, num_attention_heads=12, num_key_value_heads=2)
SHAPE_7B = TinyShape(hidden_size=224, intermediate_size=256, num_attention_heads=28, num_key_value_heads=4)
# 3 query heads / 1 KV head: at 2 ranks the KV head is replicated and the second rank pads its one real query head
# with a zero head, what 2B and 7B need only at 8 ranks.
SHAPE_ZERO_HEAD_AT_2 = TinyShape(hidden_size=48, num_attention_heads=3, num_key_value_heads=1)


def launch(tmp_path, world_size: int, job: dict):
    """Run tests/tp_worker.py on `world_size` ranks through the kit's torchrun launcher; its temporary folder
    (TMPDIR) must be empty after it, whether the job succeeded or failed."""
    out = tmp_path / f"ws{world_size}"
    out.mkdir()
    job = dict(job, out=str(out))
    job_file = out / "job.json"
    job_file.write_text(json.dumps(job))
    temp = tmp_path / f"tmpdir{world_size}"
    temp.mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(temp))
    cmd = [sys.executable, "-m", "atb_models.launch", "--nproc_per_node", str(world_size),
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "tp_worker.py"),
           str(job_file)]
    done = subprocess.run(cmd, env=env, cwd=str(tmp_path), capture_output=True, text=True, timeout=300)
    assert not list(temp.iterdir()), list(temp.iterdir())  # (torchrun's log folders included)
    return out, done


def run_ranks(tmp_path, world_size: int, job: dict) -> Path:
    out, done = launch(tmp_path, world_size, job)
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def requests(image, video):
    return [
        [{"image": str(image)}, {"text": "What is in the picture?"}],
        [{"video": str(video)}, {"image": str(image)}, {"text": "Describe both."}],
        [{"text": "Hello, what colour is the sky?"}],
    ]


def assert_equal_to_reference(model, reqs, out: Path):
    outputs = json.loads((out / "outputs.json").read_text())
    logits = torch.load(out / "logits.pt")
    for i, request in enumerate(reqs):
        ref_tokens, ref_logits = reference_for_request(model, request, MAX_TOKENS)
        assert outputs[i]["token_ids"] == ref_tokens, f"request {i}"
        assert (logits[i] - ref_logits).abs().max().item() < 1e-4


@pytest.mark.parametrize("world_size", [2, pytest.param(4, marks=pytest.mark.slow),
                                        pytest.param(8, marks=pytest.mark.slow)])
def test_2b_head_shape_matches_transformers_at_every_world_size(tiny_checkpoint, sample_image_path,
                                                                sample_video_path, tmp_path, world_size):
    model = tiny_checkpoint(shape=SHAPE_2B)
    reqs = requests(sample_image_path, sample_video_path)
    out = run_ranks(tmp_path, world_size, {"model": str(model), "requests": reqs, "max_tokens": MAX_TOKENS})
    assert_equal_to_reference(model, reqs, out)
    per_rank = [json.loads((out / f"tokens_rank{r}.json").read_text()) for r in range(world_size)]
    assert all(tokens == per_rank[0] for tokens in per_rank)
    # Media were decoded once, by the node's leader; the others read the pixels from shared memory, and no
    # segment or segment list is left behind.
    preprocessed = [json.loads((out / f"preprocessed_rank{r}.json").read_text()) for r in range(world_size)]
    assert preprocessed == [len(reqs)] + [0] * (world_size - 1)
    assert not (out / "shm_names.txt").exists()
    assert not [n for n in os.listdir("/dev/shm") if n.startswith("atbm_")]


def test_chunked_prefill_at_two_ranks_matches_transformers(tiny_checkpoint, sample_image_path, sample_video_path,
                                                           tmp_path):
    """Every rank's scheduler cuts the same chunks: the ranks stay in step through chunk and decode steps."""
    model = tiny_checkpoint(shape=SHAPE_2B)
    reqs = requests(sample_image_path, sample_video_path)
    out = run_ranks(tmp_path, 2, {"model": str(model), "requests": reqs, "max_tokens": MAX_TOKENS,
                                  "engine": {"enable_chunked_prefill": True, "max_prefill_tokens": 40}})
    assert_equal_to_reference(model, reqs, out)


@pytest.mark.parametrize("shape,world_size", [
    pytest.param(SHAPE_ZERO_HEAD_AT_2, 2, id="3_heads_at_two_ranks"),
    pytest.param(SHAPE_7B, 8, id="7b_at_eight_ranks", marks=pytest.mark.slow),
])
def test_zero_heads_and_replicated_kv_heads_match_transformers(tiny_checkpoint, sample_image_path,
                                                               sample_video_path, tmp_path, shape, world_size):
    model = tiny_checkpoint(shape=shape)
    reqs = requests(sample_image_path, sample_video_path)
    out = run_ranks(tmp_path, world_size, {"model": str(model), "requests": reqs, "max_tokens": MAX_TOKENS})
    assert_equal_to_reference(model, reqs, out)


def test_seeded_sampling_and_prompt_logprobs_are_those_of_one_rank(tiny_checkpoint, tmp_path):
    model = tiny_checkpoint(shape=TinyShape(tie_word_embeddings=True))
    job = {"model": str(model), "requests": [[{"text": "Tell me a story."}], [{"text": "Colours?"}]],
           "max_tokens": 8, "sampling": {"temperature": 1.5, "top_p": 0.9, "seed": 11, "prompt_logprobs": 2}}
    alone = run_ranks(tmp_path, 1, job)
    one = json.loads((alone / "tokens_rank0.json").read_text())
    out = run_ranks(tmp_path, 2, job)
    assert json.loads((out / "tokens_rank0.json").read_text()) == one
    assert json.loads((out / "tokens_rank1.json").read_text()) == one
    for single, double in zip(*(json.loads((o / "outputs.json").read_text()) for o in (alone, out))):
        expected, got = single["prompt_logprobs"], double["prompt_logprobs"]
        assert expected[0] is got[0] is None and len(got) == len(expected) > 5
        for (token, logprob, top), (token2, logprob2, top2) in zip(expected[1:], got[1:]):
            assert token == token2 and abs(logprob - logprob2) < 1e-4 and [t[0] for t in top] == [t[0] for t in top2]


def test_structured_output_at_two_ranks_ends_every_rank_alike_with_one_ranks_answers(tiny_checkpoint, tmp_path):
    """Every rank feeds each answer's matcher the drawn tokens, so all finish it at the same step."""
    model = tiny_checkpoint(shape=TinyShape(tie_word_embeddings=True))
    job = {"model": str(model), "requests": [[{"text": "Tell me a story."}], [{"text": "Colours?"}]],
           "max_tokens": 16, "sampling": {"temperature": 1.0, "seed": 5,
                                          "structured_output": {"regex": "[a-c]{2,6}(!|\\?)"}}}
    alone = json.loads((run_ranks(tmp_path, 1, job) / "outputs.json").read_text())
    out = run_ranks(tmp_path, 2, job)
    assert json.loads((out / "outputs.json").read_text()) == alone
    assert all(re.fullmatch(r"[a-c]{2,6}(!|\?)", o["text"]) and o["finish_reason"] == "stop" for o in alone)
    assert json.loads((out / "tokens_rank1.json").read_text()) == [o["token_ids"] for o in alone]


def test_speculative_decoding_at_two_ranks_gives_the_tokens_of_one_plain_rank(tiny_checkpoint, tmp_path):
    """Every rank guesses alike (from the tokens) and follows rank 0's check of the guesses."""
    model = tiny_checkpoint(shape=TinyShape(tie_word_embeddings=True))
    requests_ = [[{"text": "Repeat: the cat sat on the mat, the cat sat on the mat."}], [{"text": "Colours?"}]]
    job = {"model": str(model), "requests": requests_, "max_tokens": 16}
    one = json.loads((run_ranks(tmp_path, 1, job) / "tokens_rank0.json").read_text())
    out = run_ranks(tmp_path, 2, dict(job, engine={"num_speculative_tokens": 4}))
    assert json.loads((out / "tokens_rank0.json").read_text()) == one
    assert json.loads((out / "tokens_rank1.json").read_text()) == one
    stats = [json.loads((out / f"speculative_rank{rank}.json").read_text()) for rank in range(2)]
    assert stats[0] == stats[1] and stats[0][1] > 0  # guesses were checked, and some held


def test_beam_search_at_two_ranks_gives_every_rank_the_answers_of_one(tiny_checkpoint, sample_image_path, tmp_path):
    """Every rank forks and copies the same blocks, following rank 0's ranking of the candidates."""
    requests_ = [[{"image": str(sample_image_path)}, {"text": "What is it?"}], [{"text": "Hello there"}]]
    job = {"model": str(tiny_checkpoint(shape=TinyShape(tie_word_embeddings=True))), "requests": requests_,
           "max_tokens": 12, "beam_search": {"beam_width": 3, "max_tokens": 12}}
    one = json.loads((run_ranks(tmp_path, 1, job) / "beams_rank0.json").read_text())
    out = run_ranks(tmp_path, 2, job)
    for rank in range(2):
        got = json.loads((out / f"beams_rank{rank}.json").read_text())
        assert [[tokens for tokens, _ in answers] for answers in got] == [[t for t, _ in a] for a in one]
        assert max(abs(s - t) for answers, theirs in zip(got, one) for (_, s), (_, t) in zip(answers, theirs)) < 1e-4


def test_each_rank_reads_only_its_slices(tiny_checkpoint, tmp_path):
    from safetensors import safe_open

    model = tiny_checkpoint(shape=SHAPE_2B)
    out = run_ranks(tmp_path, 4, {"model": str(model), "requests": [[{"text": "Hi"}]], "max_tokens": 1})
    with safe_open(str(model / "model.safetensors"), framework="pt") as f:
        full = {name: f.get_slice(name) for name in f.keys()}
        sizes = {name: s.get_shape() for name, s in full.items()}
    bytes_of = {name: 2 * torch.Size(shape).numel() for name, shape in sizes.items()}  # bf16 on disk
    for rank in range(4):
        read = json.loads((out / f"read_rank{rank}.json").read_text())
        assert set(read) == set(bytes_of)  # every tensor read exactly by the loader, none twice
        for name, n in read.items():
            sharded = any(p in name for p in ("mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "lm_head"))
            if name.startswith("model.layers.") and sharded:
                assert n == bytes_of[name] // 4, name
            elif ".self_attn.q_proj" in name or ".self_attn.o_proj" in name:
                assert n == bytes_of[name] * 3 // 12, name     # 3 of 12 query heads
            elif ".self_attn.k_proj" in name or ".self_attn.v_proj" in name:
                assert n == bytes_of[name] // 2, name          # 1 of 2 KV heads
            elif name == "lm_head.weight":
                assert n == bytes_of[name] // 4, name
            else:
                assert n == bytes_of[name], name                # replicated: vision, norms, embedding


def test_ranks_stop_when_their_launcher_is_killed(tmp_path):
    """SIGKILL of the launcher leaves torchrun's agent no chance to stop the ranks: each gets SIGTERM from the
    kernel (launch.die_with_launcher) and ends as on any SIGTERM, not running on with no parent."""
    script = tmp_path / "rank.py"
    script.write_text(
        "import os, sys, time\n"
        f"sys.path.insert(0, {str(ROOT)!r})\n"
        "from atb_models.cli.entry import run_entry_point\n"
        "def body():\n"
        f"    open(os.path.join({str(tmp_path)!r}, 'rank' + os.environ['RANK']), 'w').write(str(os.getpid()))\n"
        "    time.sleep(120)\n"
        "    return 0\n"
        "sys.exit(run_entry_point(body))\n")
    (tmp_path / "tmp").mkdir()
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1", TMPDIR=str(tmp_path / "tmp"))
    launcher = subprocess.Popen([sys.executable, "-m", "atb_models.launch", "--nproc_per_node", "2", "--master_addr",
                                 "127.0.0.1", "--master_port", str(free_port()), str(script)], env=env,
                                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        pid_files = [tmp_path / "rank0", tmp_path / "rank1"]
        deadline = time.monotonic() + 120
        while not all(f.exists() and f.read_text() for f in pid_files) and time.monotonic() < deadline:
            time.sleep(0.1)
        pids = [int(f.read_text()) for f in pid_files]
        launcher.kill()
        launcher.wait()
        deadline = time.monotonic() + 20
        while any(_running(pid) for pid in pids) and time.monotonic() < deadline:
            time.sleep(0.1)
        assert not [pid for pid in pids if _running(pid)]
    finally:
        if launcher.poll() is None:
            launcher.kill()


def _running(pid: int) -> bool:
    """Whether the process exists and is not a zombie (an orphan's exit is reaped by whoever adopted it)."""
    try:
        return Path(f"/proc/{pid}/status").read_text().split("State:")[1].split()[0] != "Z"
    except (FileNotFoundError, IndexError):
        return False


@pytest.mark.parametrize("how,cause", [("raise", "injected failure for the test"), ("kill", "killed by SIGKILL")])
def test_a_failing_rank_ends_the_job_quickly_with_one_line(tiny_checkpoint, tmp_path, how, cause):
    job = {"model": str(tiny_checkpoint()), "requests": [[{"text": "Hi"}]], "max_tokens": 2, "fail_rank": 1,
           "fail_how": how}
    start = time.monotonic()
    _, done = launch(tmp_path, 2, job)
    assert time.monotonic() - start < 120
    assert done.returncode == 1
    errors = [line for line in done.stderr.splitlines() if line.startswith("Error:")]
    # (the launcher's output in the message: one run in many dozens ended with status 1 and no Error line, cause unseen)
    assert errors == [f"Error: rank 1: {cause}"], done.stderr[-3000:]
    assert "Traceback" not in done.stderr, done.stderr[-3000:]
