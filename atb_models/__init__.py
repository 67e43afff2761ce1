"""atb_models: a paged-attention inference kit for the Qwen2-VL family."""
from atb_models.engine.llm import LLM, RequestOutput
from atb_models.engine.sampling_params import SamplingParams
from atb_models.errors import UserError

__all__ = ["LLM", "RequestOutput", "SamplingParams", "UserError"]
