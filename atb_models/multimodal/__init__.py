"""Turning a request of images, videos and text into model inputs: media loading and sizing, the chat prompt with
expanded vision placeholders, and M-RoPE positions."""

from atb_models.multimodal.media import classify_media, load_image, load_video
from atb_models.multimodal.prompt import Message, Preprocessor, ProcessedPrompt, VisualInput
from atb_models.multimodal.rope_index import rope_index

__all__ = [
    "Message",
    "Preprocessor",
    "ProcessedPrompt",
    "VisualInput",
    "classify_media",
    "load_image",
    "load_video",
    "rope_index",
]
