"""Shared fixtures: tiny random Qwen2-VL checkpoints and sample media, built once per test session; and the
suite's progress display.

The checkpoint builder is imported inside the fixtures that use it: it brings transformers' tokenizer trainers and
OpenCV, which a run of tests that need no checkpoint should not wait for."""

from __future__ import annotations

from pathlib import Path
from typing import Callable

import pytest


@pytest.hookimpl(trylast=True)
def pytest_configure(config: pytest.Config) -> None:
    """Name each test file as its tests start, even under -q (which alone prints nothing but dots), so that a
    running suite shows where it is."""
    reporter = config.pluginmanager.get_plugin("terminalreporter")
    if reporter is not None:
        reporter.showfspath = True


def _kit_loggers():
    import logging

    return [logging.getLogger(name) for name in ("atb_models", "modeltest")]


# The kit's loggers as the suite found them, before any test (or fixture) ran a CLI entry in this process.
_ORIGINAL_LOGGING = [(log.handlers[:], log.level, log.propagate) for log in _kit_loggers()]


@pytest.fixture(autouse=True)
def kit_logging_restored():
    """A CLI entry run in this process (cli.entry.configure_logging) gives the kit's loggers a handler of their own
    and stops them propagating, which would hide their records from caplog in every later test: each test starts
    and ends with the loggers as the suite found them."""
    def restore():
        for log, (handlers, level, propagate) in zip(_kit_loggers(), _ORIGINAL_LOGGING):
            log.handlers[:], log.level, log.propagate = handlers, level, propagate

    restore()
    yield
    restore()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Callable[..., Path]:
    """tiny_checkpoint(**build_checkpoint_kwargs) -> checkpoint folder; built once per distinct set of kwargs.

    Treat the folder as read-only: other tests share it.
    """
    from atb_models.demo.checkpoint import build_checkpoint

    built: dict[tuple, Path] = {}

    def get(**kwargs) -> Path:
        key = tuple(sorted(kwargs.items()))
        if key not in built:
            built[key] = build_checkpoint(tmp_path_factory.mktemp("checkpoint"), **kwargs)
        return built[key]

    return get


@pytest.fixture(scope="session")
def sample_image_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A 320x240 RGB JPEG."""
    from atb_models.demo.checkpoint import make_image

    path = tmp_path_factory.mktemp("media") / "sample.jpg"
    make_image(path, width=320, height=240, seed=0)
    return path


@pytest.fixture(scope="session")
def sample_video_path(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An 8-frame, 2 fps, 160x120 mp4."""
    from atb_models.demo.checkpoint import make_video

    return make_video(tmp_path_factory.mktemp("media") / "sample.mp4", num_frames=8, fps=2.0, width=160, height=120)


@pytest.fixture(scope="session")
def sample_frames(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """Four different 160x120 PNG frames, in order."""
    from atb_models.demo.checkpoint import make_frames

    return make_frames(tmp_path_factory.mktemp("frames"), 4, width=160, height=120, seed=0)


@pytest.fixture
def gpu_policy_on_cpu(monkeypatch) -> Callable[..., None]:
    """gpu_policy_on_cpu(native_bf16=...): LLM takes the dtype decisions of a simulated GPU (with or without native
    bf16, for a bfloat16 checkpoint) and carries them out on this machine's CPU."""
    def simulate(native_bf16: bool) -> None:
        import dataclasses

        from atb_models.engine import llm as llm_module
        from atb_models.platform import Capabilities, resolve_plan

        gpu = Capabilities(kind="cuda", name="simulated GPU", native_bf16=native_bf16, native_fp16=True,
                           device_count=1)
        plan = dataclasses.replace(resolve_plan("auto", "auto", "bfloat16", caps=gpu), kind="cpu", index=None,
                                   dist_backend="gloo")
        monkeypatch.setattr(llm_module, "resolve_plan", lambda *args: plan)

    return simulate


@pytest.fixture(autouse=True)
def restore_kit_logger():
    """run_pa's main(), called in-process by some tests, configures the "atb_models" logger for a console; the
    next test must see it as it was (propagating to pytest's log capture)."""
    import logging

    kit_logger = logging.getLogger("atb_models")
    saved = kit_logger.handlers[:], kit_logger.level, kit_logger.propagate
    yield
    kit_logger.handlers[:], kit_logger.level, kit_logger.propagate = saved
