"""`serve`: the analogue of `vllm bench serve`. Sends N chat requests (a mix of image and text-only prompts, every
output run to its length) to a running server, or to one it starts, at a given arrival rate and concurrency, and
reports requests/s, output tokens/s, and TTFT and TPOT percentiles per concurrency level. Given no --url it can
then compare the server at concurrency 16 with `LLM.generate` running the same first 16 requests as one batch in
this process, the two timed in turn a few times while the (idle) server stays up: the batcher, not the HTTP layer,
should set the pace.

The requests are `compare`'s batch16 workload (growing images, mixed output lengths), every second one without
its image; streamed, so that the first token's time is seen as a client sees it.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import requests as http

from atb_models.benchmark.compare import make_requests
from atb_models.benchmark.engines import Request
from atb_models.benchmark.presets import Preset, benchmark_dir
from atb_models.errors import UserError

logger = logging.getLogger("atb_models.benchmark")

SERVER_START_TIMEOUT_S = 600
COMPARED_CONCURRENCY = 16
CLIENT_NICENESS = 10  # the benchmark process's, once it has started its server


@dataclass
class Result:
    ttft: float  # seconds from sending to the first text
    latency: float  # seconds from sending to the last chunk
    output_tokens: int

    @property
    def tpot(self) -> Optional[float]:
        return (self.latency - self.ttft) / (self.output_tokens - 1) if self.output_tokens > 1 else None


def workload(preset: Preset, num_requests: int) -> list[Request]:
    """num_requests requests cycling over the preset's batch16 ones, every second one text-only."""
    base = make_requests(preset.workloads, benchmark_dir(preset) / "media")["batch16"]
    chosen = [base[i % len(base)] for i in range(num_requests)]
    return [Request([r.items[-1]] if i % 2 else r.items, r.max_tokens) for i, r in enumerate(chosen)]


def chat_body(request: Request, model: str) -> dict:
    """The request in OpenAI's terms; images as data: URLs, as a remote client sends them."""
    import base64

    content = []
    for item in request.items:
        if "image" in item:
            data = base64.b64encode(Path(item["image"]).read_bytes()).decode()
            content.append({"type": "image_url", "image_url": {"url": f"data:image/png;base64,{data}"}})
        else:
            content.append({"type": "text", "text": item["text"]})
    return {"model": model, "messages": [{"role": "user", "content": content}], "max_tokens": request.max_tokens,
            "temperature": 0, "ignore_eos": True, "stream": True, "stream_options": {"include_usage": True}}


def send(url: str, body: dict, api_key: Optional[str]) -> Result:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    start = time.perf_counter()
    first, tokens = None, 0
    with http.post(f"{url}/v1/chat/completions", json=body, headers=headers, stream=True, timeout=3600) as response:
        if response.status_code != 200:
            raise UserError(f"the server answered {response.status_code}: {response.text[:300]}")
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and chunk.get("choices") and chunk["choices"][0]["delta"].get("content"):
                first = time.perf_counter()
    end = time.perf_counter()
    return Result((first or end) - start, end - start, tokens)


def run_level(url: str, model: str, bodies: list, concurrency: int, rate: float, api_key: Optional[str],
              seed: int = 0) -> tuple[list, float]:
    """Every body sent, arrivals spaced by an exponential law of mean 1/rate (all at once for an infinite rate),
    at most `concurrency` in flight; the results and the wall time."""
    rng = random.Random(seed)
    arrivals, t = [], 0.0
    for _ in bodies:
        arrivals.append(t)
        if rate != float("inf"):
            t += rng.expovariate(rate)
    results: list = [None] * len(bodies)
    next_index = iter(range(len(bodies)))
    lock = threading.Lock()
    errors: list = []
    start = time.perf_counter()

    def worker() -> None:
        while True:
            with lock:
                i = next(next_index, None)
            if i is None or errors:
                return
            delay = start + arrivals[i] - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            try:
                results[i] = send(url, bodies[i], api_key)
            except (UserError, http.RequestException) as e:
                errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(min(concurrency, len(bodies)))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    if errors:
        raise UserError(f"a benchmark request failed: {errors[0]}")
    return results, time.perf_counter() - start


def percentiles(values: list, points=(50, 90, 99)) -> list:
    if not values:
        return [float("nan")] * len(points)
    if len(values) == 1:
        return values * len(points)
    cuts = statistics.quantiles(values, n=100, method="inclusive")
    return [cuts[p - 1] for p in points]


def summary_row(concurrency: int, results: list, seconds: float) -> list:
    tokens = sum(r.output_tokens for r in results)
    ttft = percentiles([r.ttft * 1e3 for r in results])
    tpot = percentiles([r.tpot * 1e3 for r in results if r.tpot is not None])
    return [concurrency, len(results), len(results) / seconds, tokens / seconds, *ttft, *tpot]


HEADERS = ["concurrency", "requests", "req/s", "output tok/s", "TTFT p50 ms", "p90", "p99", "TPOT p50 ms", "p90",
           "p99"]


class StartedServer:
    """`python -m atb_models.serve` in a child process on a free port, stopped by SIGTERM."""

    def __init__(self, model_path: str, options: list):
        import socket

        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        self.url = f"http://127.0.0.1:{port}"
        command = [sys.executable, "-m", "atb_models.serve", "--model_path", model_path, "--port", str(port),
                   *options]
        logger.info("starting the server: %s", " ".join(command))
        self.process = subprocess.Popen(command, stdout=subprocess.DEVNULL)
        try:
            self._wait_healthy()
        except BaseException:
            self.stop()
            raise

    def _wait_healthy(self) -> None:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise UserError(f"the server exited with status {self.process.returncode} (its error is above)")
            try:
                if http.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return
            except http.RequestException:
                pass
            time.sleep(0.5)
        raise UserError(f"the server was not healthy within {SERVER_START_TIMEOUT_S} s")

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def served_model(url: str, api_key: Optional[str]) -> str:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        return http.get(f"{url}/v1/models", headers=headers, timeout=30).json()["data"][0]["id"]
    except (http.RequestException, ValueError, KeyError, IndexError) as e:
        raise UserError(f"cannot list the models of {url}: {e}") from None


class GenerateRun:
    """`LLM.generate` on the compared requests as one batch, in this process, the way a script runs it (after one
    untimed run of the same batch: lazily built kernels and buffers)."""

    def __init__(self, model_path: str, preset: Preset, dtype: str, device: str, batch: list):
        from atb_models import LLM, SamplingParams

        # Prefix caching off, as in the server the benchmark starts: every timed run repeats the warm-up.
        self.llm = LLM(model_path, dtype=dtype, device=device, max_batch_size=len(batch),
                       max_input_length=preset.max_input_length, max_output_length=preset.max_output_length,
                       enable_prefix_caching=False)
        self.prompts = [r.items for r in batch]
        self.params = [SamplingParams(max_tokens=r.max_tokens, ignore_eos=True) for r in batch]
        try:
            self.llm.generate(self.prompts, self.params)
        except BaseException:
            self.close()
            raise

    def tokens_per_second(self) -> float:
        start = time.perf_counter()
        outputs = self.llm.generate(self.prompts, self.params)
        return sum(len(out.token_ids) for out in outputs) / (time.perf_counter() - start)

    def close(self) -> None:
        self.llm.close()


def compare_with_generate(url: str, model: str, bodies: list, api_key: Optional[str], generate: GenerateRun,
                          repeats: int) -> str:
    """The server at concurrency 16 and generate on the same 16 requests, timed in turn `repeats` times: on a
    machine whose load drifts, a pair shares its minutes, so the figure is the median of the pairs' ratios."""
    pairs = []
    for _ in range(repeats):
        results, seconds = run_level(url, model, bodies, COMPARED_CONCURRENCY, float("inf"), api_key)
        pairs.append((sum(r.output_tokens for r in results) / seconds, generate.tokens_per_second()))
        logger.info("paired run: server %.1f, LLM.generate %.1f output tokens/s", *pairs[-1])
    return serve_vs_generate_line(pairs)


def serve_vs_generate_line(pairs: list) -> str:
    """The closing line for (server, generate) output tokens/s pairs: medians, and the median of the ratios."""
    ratios = [served / generated for served, generated in pairs]
    listed = ", ".join(f"{r:.3f}" for r in ratios)
    return (f"serve_vs_generate[c{COMPARED_CONCURRENCY}]: server {statistics.median(p[0] for p in pairs):.1f} "
            f"output tok/s, LLM.generate {statistics.median(p[1] for p in pairs):.1f} output tok/s, ratio "
            f"{statistics.median(ratios):.3f} (median of {len(pairs)} paired runs: {listed})")


def run_serve_benchmark(preset: Preset, model_path: Optional[str], url: Optional[str], api_key: Optional[str],
                        dtype: str, device: str, concurrencies: list, num_requests: int, rate: float,
                        compare_generate: bool, repeats: int = 3) -> str:
    from tabulate import tabulate

    batch = workload(preset, num_requests)
    if compare_generate and (url is not None or len(batch) < COMPARED_CONCURRENCY):
        raise UserError(f"--compare_generate needs a server the benchmark starts (no --url) and --num_requests of "
                        f"at least {COMPARED_CONCURRENCY}")
    server = None
    if url is None:
        server = StartedServer(model_path, ["--dtype", dtype, "--device", device,
                                            "--max_batch_size", str(max(*concurrencies, COMPARED_CONCURRENCY)),
                                            "--max_input_length", str(preset.max_input_length),
                                            "--max_output_length", str(preset.max_output_length),
                                            "--max_queue", str(max(num_requests, 1)),
                                            # each concurrency level sends the same requests: none from the cache
                                            "--no_prefix_caching"])
        url = server.url
        # The load generator yields the cores to the server it measures: with two cores and no others, the 16
        # clients' threads would otherwise preempt the engine's OpenMP threads at every chunk, which a remote
        # client does not (vllm bench serve is run from another machine or other cores). The server started
        # before this keeps its priority; LLM.generate below runs here with nothing else to yield to.
        os.nice(CLIENT_NICENESS)
    rows, closing = [], None
    try:
        model = served_model(url, api_key)
        bodies = [chat_body(r, model) for r in batch]
        run_level(url, model, bodies[:1], 1, float("inf"), api_key)  # warm-up, untimed
        for concurrency in concurrencies:
            results, seconds = run_level(url, model, bodies, concurrency, rate, api_key)
            rows.append(summary_row(concurrency, results, seconds))
            logger.info("concurrency %d: %.1f output tokens/s", concurrency, rows[-1][3])
        if compare_generate:
            compared = bodies[:COMPARED_CONCURRENCY]
            if COMPARED_CONCURRENCY not in concurrencies:  # the server warmed at that batch too, untimed
                run_level(url, model, compared, COMPARED_CONCURRENCY, float("inf"), api_key)
            # The server stays up, idle while generate runs: the pairs alternate within the same minutes.
            generate = GenerateRun(model_path, preset, dtype, device, batch[:COMPARED_CONCURRENCY])
            try:
                closing = compare_with_generate(url, model, compared, api_key, generate, repeats)
            finally:
                generate.close()
    finally:
        if server is not None:
            server.stop()
    lines = [tabulate(rows, headers=HEADERS, floatfmt=".1f")]
    return "\n".join(lines if closing is None else [*lines, closing])
