"""atb_models: a paged-attention inference kit for the Qwen2-VL family.

    from atb_models import LLM, SamplingParams

The names below are imported on first use (PEP 562), so that `import atb_models`, and a command line's --help,
do not wait for torch and the engine.
"""

import importlib

_EXPORTS = {
    "BeamSearchParams": "atb_models.engine.sampling_params",
    "LLM": "atb_models.engine.llm",
    "Message": "atb_models.multimodal.prompt",
    "RequestOutput": "atb_models.engine.llm",
    "SamplingParams": "atb_models.engine.sampling_params",
    "StructuredOutput": "atb_models.engine.structured_output",
    "ToolCall": "atb_models.multimodal.prompt",
    "UserError": "atb_models.errors",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'atb_models' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value  # looked up once
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
