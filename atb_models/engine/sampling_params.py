from dataclasses import dataclass
from typing import Optional

from atb_models.errors import UserError


@dataclass
class SamplingParams:
    """How one request is decoded. temperature 0 is greedy; every field is honoured."""

    max_tokens: Optional[int] = None      # None: the engine's max_output_length
    temperature: float = 0.0
    top_k: int = 0                        # 0: no top-k cut
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    seed: Optional[int] = None
    ignore_eos: bool = False

    def __post_init__(self):
        if self.max_tokens is not None and self.max_tokens < 1:
            raise UserError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise UserError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise UserError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 < self.top_p <= 1:
            raise UserError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.repetition_penalty <= 0:
            raise UserError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0
