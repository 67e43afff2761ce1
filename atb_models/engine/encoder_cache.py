"""The vision-encoder cache: the vision tower's output for an image or video, keyed by its content hash
(multimodal.prompt.content_hash), least recently used first out when its byte budget is exceeded. A request whose
prefix blocks were evicted, but whose image was seen, still skips the vision tower."""
from __future__ import annotations

from collections import OrderedDict

import torch


class EncoderCache:
    def __init__(self, max_bytes: int):
        self.max_bytes = max_bytes
        self.bytes = 0
        self._entries: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        features = self._entries.get(key)
        if features is not None:
            self._entries.move_to_end(key)
        return features

    def put(self, key: str, features: torch.Tensor) -> None:
        """Keeps `features` unless they alone exceed the budget; evicts the least recently used to make room."""
        size = features.numel() * features.element_size()
        if size > self.max_bytes or key in self._entries:
            return
        if features.untyped_storage().nbytes() > size:
            # A slice of a step's batched tower output: kept as it is, it would hold the whole batch's memory (long
            # after its step-mates' entries left) while the budget counts only its own bytes.
            features = features.clone()
        while self.bytes + size > self.max_bytes:
            _, evicted = self._entries.popitem(last=False)
            self.bytes -= evicted.numel() * evicted.element_size()
        self._entries[key] = features
        self.bytes += size

    def __len__(self) -> int:
        return len(self._entries)
