"""The reference for families the kit's pinned transformers (4.46) lacks: transformers 4.51.3 in a venv of its own,
run as a separate process. Qwen2.5-VL's parity tests, the benchmark's `compare` and modeltest's `--backend hf` use it.

This module is the kit's side: it makes the venv under the kit's cache folder (`ensure_venv`; `python -m
atb_models.oracle venv` is what .ci/run calls), builds random tiny checkpoints there (`build_checkpoint`), asks for
greedy tokens and logits of preprocessed prompts (`reference`, for the parity tests) and keeps a model loaded in a
worker process for timed runs (`RemoteReference`). Builds and references run in a process of their own each, or in one
`OracleWorker` given to them (a test session's many calls pay the venv's imports once). `worker.py` is the other side:
run by the venv's Python, it imports transformers 4.51.3 and nothing of the kit.
"""
from __future__ import annotations

import abc
import io
import json
import logging
import os
import shutil
import subprocess
import socket
import sys
import tempfile
from multiprocessing.connection import Connection
from pathlib import Path

from atb_models.errors import UserError

logger = logging.getLogger("atb_models")

TRANSFORMERS_VERSION = "4.51.3"
TORCH_VERSION = "2.13.0"
VENV_NAME = f"oracle-qwen25-transformers{TRANSFORMERS_VERSION}"
WORKER = Path(__file__).resolve().parent / "worker.py"


def venv_dir() -> Path:
    from atb_models.config import kit_home

    return kit_home() / VENV_NAME


def venv_python() -> Path:
    return venv_dir() / "bin" / "python"


def venv_ready() -> bool:
    python = venv_python()
    if not python.is_file():
        return False
    probe = subprocess.run([str(python), "-c", "import transformers, torch; print(transformers.__version__)"],
                           capture_output=True, text=True)
    return probe.returncode == 0 and probe.stdout.strip() == TRANSFORMERS_VERSION


def ensure_venv() -> Path:
    """The oracle venv's Python, creating the venv first when it is missing or incomplete (a minute or two: pip
    installs torch and transformers from the package registry; torch is the kit's own version)."""
    if not venv_ready():
        target = venv_dir()
        logger.info("creating the reference venv (transformers %s) in %s, once", TRANSFORMERS_VERSION, target)
        shutil.rmtree(target, ignore_errors=True)
        subprocess.run([sys.executable, "-m", "venv", str(target)], check=True)
        subprocess.run([str(venv_python()), "-m", "pip", "install", "-q", f"torch=={TORCH_VERSION}",
                        f"transformers=={TRANSFORMERS_VERSION}"], check=True)
        if not venv_ready():
            raise RuntimeError(f"{target}: transformers {TRANSFORMERS_VERSION} does not import after installing")
    return venv_python()


def _worker_env() -> dict:
    """The worker sees no PYTHONPATH (the kit's packages must not shadow the venv's) and never reaches the hub."""
    env = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    env["HF_HUB_OFFLINE"] = "1"
    return env


def _run_worker(*args: str) -> None:
    done = subprocess.run([str(venv_python()), str(WORKER), *args], capture_output=True, text=True, env=_worker_env())
    if done.returncode != 0:
        raise RuntimeError(f"the Qwen2.5-VL oracle failed ({' '.join(args[:1])}):\n{done.stderr[-4000:]}")


class _WorkerProcess(abc.ABC):
    """A process of the venv running worker.py's `command`, reached over a private socket pair (its end passed to
    the worker as --fd); `close` asks it to end (`_send_close`, in the wire format of the subclass's command), then
    kills it if it does not go within seconds."""

    def __init__(self, command: str, *arguments: str, env: dict | None = None):
        ours, theirs = socket.socketpair()
        with theirs:
            self._process = subprocess.Popen([str(venv_python()), str(WORKER), command, "--fd", str(theirs.fileno()),
                                              *arguments], pass_fds=(theirs.fileno(),), env=env or _worker_env())
        self._connection = Connection(ours.detach())

    @abc.abstractmethod
    def _send_close(self) -> None:
        """Sends the worker its command's request to end."""

    def close(self) -> None:
        if self._process.poll() is None:
            try:
                self._send_close()
                self._process.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                self._process.kill()
                self._process.wait()
        self._connection.close()


class OracleWorker(_WorkerProcess):
    """One process of the venv running builds and references on request (worker.py's `jobs`), one at a time: the
    imports of torch and transformers, seconds each time, are paid once. Close it (or use it as a context manager);
    a worker that dies is a RuntimeError at the next request."""

    def __init__(self):
        super().__init__("jobs")

    def run(self, command: str, *arguments) -> None:
        try:
            self._connection.send_bytes(json.dumps([command, *arguments]).encode())
            status, detail = json.loads(self._connection.recv_bytes())
        except (EOFError, OSError):
            raise RuntimeError(f"the Qwen2.5-VL oracle worker ended (exit code {self._process.wait()})") from None
        if status != "ok":
            raise RuntimeError(f"the Qwen2.5-VL oracle failed ({command}):\n{detail}")

    def _send_close(self) -> None:
        self._connection.send_bytes(json.dumps(["close"]).encode())

    def __enter__(self) -> OracleWorker:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def build_checkpoint(like: Path, out_dir: Path, seed: int = 0, max_pixels: int | None = None,
                     worker: OracleWorker | None = None, **shape) -> Path:
    """A random tiny Qwen2.5-VL checkpoint in out_dir, built by transformers 4.51.3, with the tokenizer and
    processor files of the Qwen2-VL checkpoint `like`; `shape` overrides worker.DEFAULT_SHAPE."""
    settings = {"shape": shape, "seed": seed, "max_pixels": max_pixels}
    if worker is not None:
        worker.run("build", str(like), str(out_dir), settings)
    else:
        _run_worker("build", "--like", str(like), "--out", str(out_dir), "--settings", json.dumps(settings))
    return Path(out_dir)


def build_demo_checkpoint(out_dir, shape: dict | None = None, image_max_pixels: int | None = None,
                          max_position_embeddings: int = 32768, seed: int = 0) -> Path:
    """The registry's demo builder for Qwen2.5-VL (the benchmark's presets): the kit's Qwen2-VL demo builder writes
    the tokenizer and processor files, transformers 4.51.3 the model (the venv is made on first use)."""
    from atb_models.demo.checkpoint import TinyShape, build_checkpoint as build_qwen2_vl

    ensure_venv()
    with tempfile.TemporaryDirectory(prefix="atb-qwen25-like-") as like:
        build_qwen2_vl(like, shape=TinyShape(max_position_embeddings=max_position_embeddings), seed=seed,
                       image_max_pixels=image_max_pixels or 28 * 28 * 64)
        return build_checkpoint(Path(like), Path(out_dir), seed=seed, max_pixels=image_max_pixels, **(shape or {}))


def reference(model_dir: Path, prompts: list, max_new_tokens: int, work_dir: Path,
              worker: OracleWorker | None = None) -> list:
    """[(greedy tokens, [per-step float32 logits])] from transformers for each prompt, given as generate()'s
    inputs (benchmark.engines.reference_inputs of one prompt) and, optionally, full_attention: True to run every
    vision block over the whole image (what a wrong window order amounts to)."""
    import torch

    inputs, out = Path(work_dir) / "oracle_inputs.pt", Path(work_dir) / "oracle_reference.json"
    torch.save(prompts, inputs)
    if worker is not None:
        worker.run("reference", str(model_dir), str(inputs), str(out), max_new_tokens)
    else:
        _run_worker("reference", "--model", str(model_dir), "--inputs", str(inputs), "--out", str(out),
                    "--max_new_tokens", str(max_new_tokens))
    return [(r["tokens"], torch.tensor(r["logits"])) for r in json.loads(out.read_text())]


class RemoteReference(_WorkerProcess):
    """transformers' model of a checkpoint, loaded once in a worker process of the venv and driven like
    `engines.LocalReference`: `generate(inputs, clock, **kwargs)` returns the sequences, and the worker's token
    times (time.perf_counter reads CLOCK_MONOTONIC, one clock for every process) fill `clock.times`.

    The two processes take turns over a private socket pair: this side waits on the reply while the worker
    computes, so timed runs of the two never share the cores. The worker uses as many torch threads as this
    process. A worker that dies is an EOFError here, reported as one UserError."""

    def __init__(self, model_path: str, dtype, vision_dtype, device, class_name: str):
        import torch

        ensure_venv()
        settings = {"model": str(model_path), "class": class_name, "dtype": str(dtype).removeprefix("torch."),
                    "vision_dtype": str(vision_dtype).removeprefix("torch."), "device": str(device),
                    "threads": torch.get_num_threads()}
        super().__init__("serve", "--settings", json.dumps(settings),
                         env={**_worker_env(), "TRANSFORMERS_VERBOSITY": "error"})
        try:
            ready = self._receive()
        except BaseException:
            self.close()
            raise
        self.pad_token_id, self.eos_token_id = ready["pad_token_id"], ready["eos_token_id"]
        self.language_model_sizes, self.lm_head_size = ready["language_model_sizes"], ready["lm_head_size"]
        self.description = f"{ready['description']} (transformers {TRANSFORMERS_VERSION}, in {venv_dir()})"

    def _send(self, message) -> None:
        """torch.save's bytes: Connection.send would pickle tensors through torch's shared-memory reducers."""
        import torch

        buffer = io.BytesIO()
        torch.save(message, buffer)
        self._connection.send_bytes(buffer.getvalue())

    def _receive(self):
        import torch

        try:
            status, payload = torch.load(io.BytesIO(self._connection.recv_bytes()), weights_only=True)
        except (EOFError, OSError):
            code = self._process.wait()
            raise UserError(f"the reference worker ({venv_python()}) ended with exit code {code}; its messages are "
                            "above") from None
        if status == "error":
            raise UserError(f"the reference model failed: {payload}")
        return payload

    def generate(self, inputs: dict, clock=None, **kwargs):
        self._send(("generate", inputs, kwargs, clock is not None))
        sequences, times = self._receive()
        if clock is not None:
            clock.times += times
        return sequences

    def _send_close(self) -> None:
        self._send(("close",))

    def __del__(self):
        if getattr(self, "_connection", None) is not None:
            self.close()
