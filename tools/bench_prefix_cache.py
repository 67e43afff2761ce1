"""Prefix caching and the vision-encoder cache on the cpu-small checkpoint (issue 17's targets), caching on against
off in one process, alternating:

- ttft:    a request with one image (~450 prompt tokens), then another question about the same image: the second
           request's own time to first token over the first's (target <= 0.3); each repeat uses a fresh image;
- textvqa: the modeltest harness (`mm_run.sh textvqa`) over a set of IMAGES pictures with 5 questions each, run with
           and without --no_prefix_caching: the harness's reported time answering (after loading the model), and its
           total with the loading.

    python tools/bench_prefix_cache.py [--repeats 3] [--images 4] [--workloads ttft,textvqa]

Prints one `name: value` line per figure at the end. The checkpoint is the benchmark's cpu-small preset (built on
first use under ~/.cache/atb_models/benchmark).
"""
from __future__ import annotations

import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from atb_models.cli.entry import FlagParser

ROOT = Path(__file__).resolve().parents[1]
QUESTIONS = ["What is written in the image?", "Which colour is the background?", "How many shapes are there?",
             "Describe the picture in one sentence.", "Is there any text at the top?"]
IMAGE_SIZE = (588, 560)  # 21 x 20 merged tokens: 420 visual tokens, about 450 with the chat template


def ttft(model_path: str, repeats: int, media: Path) -> dict:
    from atb_models import LLM, SamplingParams
    from atb_models.demo.checkpoint import make_image

    options = dict(dtype="float32", device="cpu", max_batch_size=1, max_input_length=1024, max_output_length=8)
    engines = {caching: LLM(model_path, enable_prefix_caching=caching, **options) for caching in (True, False)}
    params = SamplingParams(max_tokens=8, ignore_eos=True)
    ratios = {True: [], False: []}
    prompt_tokens = None
    for repeat in range(repeats):
        image = media / f"ttft_{repeat}.png"
        make_image(image, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1], seed=100 + repeat)
        for caching in ((True, False) if repeat % 2 == 0 else (False, True)):
            llm = engines[caching]
            first = llm.generate([[{"image": str(image)}, {"text": QUESTIONS[0]}]], params)[0]
            second = llm.generate([[{"image": str(image)}, {"text": QUESTIONS[1]}]], params)[0]
            prompt_tokens = first.prompt_token_count
            ratios[caching].append(second.first_token_s / first.first_token_s)
            print(f"ttft repeat {repeat + 1}, caching {'on' if caching else 'off'}: first {first.first_token_s:.3f} s, "
                  f"second {second.first_token_s:.3f} s ({second.cached_prompt_tokens} prompt tokens and "
                  f"{second.cached_visual_items} image from the cache)", flush=True)
    return {"prompt_tokens": prompt_tokens, "ttft_second_vs_first[caching on]": statistics.median(ratios[True]),
            "ttft_second_vs_first[caching off]": statistics.median(ratios[False])}


def textvqa(model_path: str, repeats: int, images: int, work: Path) -> dict:
    from atb_models.demo.checkpoint import make_image

    lines, qid = [], 0
    for i in range(images):
        image = work / f"textvqa_{i}.png"
        make_image(image, width=IMAGE_SIZE[0], height=IMAGE_SIZE[1], seed=200 + i)
        for question in QUESTIONS:
            lines.append({"image": str(image), "question": question, "question_id": qid})
            qid += 1
    dataset = work / "textvqa_val.jsonl"
    dataset.write_text("".join(json.dumps(line) + "\n" for line in lines))
    annotations = [{"question_id": line["question_id"], "answers": [{"answer": "zzz"}] * 10} for line in lines]
    (work / "textvqa_val_annotations.json").write_text(json.dumps({"annotations": annotations}))
    harness = ROOT / "tests" / "modeltest"
    env = {**os.environ, "PYTHON": sys.executable,
           "PYTHONPATH": os.pathsep.join([str(ROOT), str(harness), os.environ.get("PYTHONPATH", "")])}
    seconds = {True: [], False: []}
    for repeat in range(repeats):
        for caching in ((True, False) if repeat % 2 == 0 else (False, True)):
            out = work / f"out_{repeat}_{caching}"
            command = ["bash", str(harness / "scripts" / "mm_run.sh"), "textvqa", "qwen2_vl", "--model_path",
                       model_path, "--dataset_path", str(dataset), "--output_dir", str(out), "--device", "cpu",
                       "--dtype", "float32", "--batch_size", "5", "--max_output_length", "8",
                       *([] if caching else ["--no_prefix_caching"])]
            start = time.perf_counter()
            done = subprocess.run(command, cwd=harness, env=env, capture_output=True, text=True)
            wall = time.perf_counter() - start
            if done.returncode != 0:
                raise SystemExit(f"mm_run.sh failed:\n{done.stderr[-3000:]}")
            [report] = out.glob("**/*_result.txt")
            text = report.read_text()
            labels = (r"seconds, model loading included", r"seconds answering \(after loading\)")
            total, answering = (float(re.search(rf"{label}\W+([\d.]+)", text).group(1)) for label in labels)
            seconds[caching].append((answering, total))
            print(f"textvqa repeat {repeat + 1}, caching {'on' if caching else 'off'}: answering {answering:.1f} s, "
                  f"{total:.1f} s with loading, {wall:.1f} s wall", flush=True)
    on, off = ([statistics.median(run[i] for run in seconds[caching]) for i in (0, 1)] for caching in (True, False))
    return {"textvqa_samples": len(lines), "textvqa_answering_seconds[caching on]": on[0],
            "textvqa_answering_seconds[caching off]": off[0], "textvqa_answering_on_vs_off": on[0] / off[0],
            "textvqa_with_loading_on_vs_off": on[1] / off[1]}


def main() -> None:
    parser = FlagParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=4)
    parser.add_argument("--workloads", default="ttft,textvqa")
    parser.add_argument("--model_path", help="default: the cpu-small preset's checkpoint")
    args = parser.parse_args()
    from atb_models.benchmark.presets import PRESETS, ensure_checkpoint

    model_path = args.model_path or str(ensure_checkpoint(PRESETS["cpu-small"]))
    figures = {"load": f"{os.getloadavg()[0]:.1f} (1-minute average at the start, {os.cpu_count()} CPUs)"}
    with tempfile.TemporaryDirectory(prefix="atb-bench-prefix-") as work:
        if "ttft" in args.workloads:
            figures.update(ttft(model_path, args.repeats, Path(work)))
        if "textvqa" in args.workloads:
            figures.update(textvqa(model_path, args.repeats, args.images, Path(work)))
    figures["load_after"] = f"{os.getloadavg()[0]:.1f}"
    for name, value in figures.items():
        print(f"{name}: {value:.2f}" if isinstance(value, float) else f"{name}: {value}")


if __name__ == "__main__":
    main()
