"""From a request (images, videos and text, in order) to what the model runs: token ids with every vision
placeholder expanded, each visual's normalised patches and grid, and the M-RoPE positions."""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass

import jinja2
import jinja2.meta
import torch
from PIL import Image

from atb_models.errors import UserError
from atb_models.multimodal.media import (check_media_counts, check_media_limits, describe, fit_to_grid, load_image,
                                         load_video)
from atb_models.models import model_family
from atb_models.multimodal.rope_index import rope_index

logger = logging.getLogger(__name__)

ITEM_KINDS = ("image", "video", "text")
# What an item may say besides its medium (qwen-vl-utils' names): an image its own pixel bounds, in place of the
# server-wide --min_pixels / --max_pixels; a video its frame rate and its frames' pixel ceiling (--max_pixels's role
# for videos).
ITEM_OPTIONS = {"image": ("min_pixels", "max_pixels"), "video": ("fps", "max_pixels"), "text": ()}
ROLES = ("system", "user", "assistant", "tool")

# The frame rate a video given as a list of frames is taken to be sampled at, unless its item names one
# (qwen-vl-utils' rule); a video file is sampled at --video_fps.
FRAME_LIST_FPS = 2.0


@dataclass
class VisualInput:
    kind: str  # "image" | "video"
    pixel_values: torch.Tensor  # [num_patches, 3*2*14*14] float32, normalised, as the HF image processor outputs
    grid_thw: tuple[int, int, int]  # in patches
    num_tokens: int  # t*h*w // merge**2: the placeholder's length in the prompt
    seconds_per_grid: float | None = None  # a video's seconds per temporal grid step (temporal_patch_size / fps)
    content_hash: str = ""  # of the pixels, grid and seconds per grid step: the same medium gives the same hash
    start: int = 0          # index of its first placeholder token in the prompt


@dataclass
class ProcessedPrompt:
    token_ids: list[int]  # placeholders expanded
    visuals: list[VisualInput]  # in prompt order
    positions: torch.Tensor  # [3, L] int64 M-RoPE positions
    rope_delta: int  # max(positions) + 1 - L
    text: str  # the request as shown to people, e.g. "<image: cat.jpg> What is this?"


@dataclass(frozen=True)
class ToolCall:
    """A function call an assistant turn made (OpenAI's tool_calls entry): its id, the function's name, and its
    arguments as a JSON object's text."""

    id: str
    name: str
    arguments: str


def json_object(text) -> dict | None:
    """`text` read as a JSON object (a ToolCall's arguments), None where it is not one's text."""
    try:
        value = json.loads(text)
    except (TypeError, ValueError, RecursionError):  # (RecursionError: a text nested too deeply to read)
        return None
    return value if isinstance(value, dict) else None


@dataclass(frozen=True)
class Message:
    """One turn of a conversation: who speaks ("system", "user", "assistant", or "tool": a function's result) and
    what, as a request's items. A request may be a list of Messages (a chat with its history, as the server
    receives it); a system turn replaces the chat template's default system prompt. A plain list of items is one
    user turn. An assistant turn may hold the ToolCalls it made (its items then perhaps none); a tool turn may name
    the call it answers."""

    role: str
    items: tuple
    tool_calls: tuple = ()
    tool_call_id: str | None = None


def conversation(request) -> list[Message]:
    """The request as turns: its Messages, or one user turn holding its items."""
    is_message = [isinstance(part, Message) for part in request]
    if not any(is_message):
        return [Message("user", tuple(request))]
    if not all(is_message):
        raise UserError("a request is either a list of items or a list of Messages, not a mix of both")
    for message in request:
        if message.role not in ROLES:
            raise UserError(f"a message's role must be one of {', '.join(ROLES)}, got {message.role!r}")
        _check_tool_fields(message)
    return list(request)


def _check_tool_fields(message: Message) -> None:
    """A Message's tool_calls (ToolCalls, arguments a JSON object's text, as the template is given them) and
    tool_call_id, checked: a library caller's dicts would otherwise fail the whole batch, not this request."""
    calls = message.tool_calls
    if not isinstance(calls, (tuple, list)) or not all(isinstance(call, ToolCall) for call in calls):
        raise UserError(f"a message's tool_calls must be a tuple of ToolCall(id, name, arguments), got {calls!r}")
    for call in calls:
        if not all(isinstance(value, str) for value in (call.id, call.name, call.arguments)):
            raise UserError(f"a ToolCall's id, name and arguments are strings, got {call!r}")
        if json_object(call.arguments) is None:
            raise UserError(f"a ToolCall's arguments must be a JSON object's text, got {call.arguments!r}")
    if message.tool_call_id is not None and not isinstance(message.tool_call_id, str):
        raise UserError(f"a message's tool_call_id must be a string, got {message.tool_call_id!r}")


def _items(request) -> list:
    """Every item of a request in prompt order, its turns' items one after another."""
    return [item for part in request for item in (part.items if isinstance(part, Message) else [part])]


def content_hash(kind: str, pixel_values: torch.Tensor, grid_thw: tuple, seconds_per_grid: float | None) -> str:
    """What identifies a preprocessed image or video for the caches (engine.block_manager, the vision-encoder
    cache): its patches' bytes, its grid and, for a video, the seconds per grid step its positions count."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{kind} {tuple(grid_thw)} {seconds_per_grid!r} {pixel_values.dtype}".encode())
    digest.update(pixel_values.contiguous().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def check_frame_rate(fps, name: str) -> None:
    """A frame rate given by a flag (--video_fps), an item or a request field, refused in one line naming it."""
    if isinstance(fps, bool) or not isinstance(fps, (int, float)) or not math.isfinite(fps) or fps <= 0:
        raise UserError(f"{name} must be a positive number of frames per second, got {fps!r}")


def _item_kind(item, number: int) -> str:
    """The item's medium, its other keys (ITEM_OPTIONS) its kind's; their values are checked with the
    Preprocessor's settings (`Preprocessor._item_settings`)."""
    keys = list(item) if isinstance(item, dict) else []
    media = [key for key in keys if key in ITEM_KINDS]
    if len(media) != 1:
        held = f"keys {keys}" if isinstance(item, dict) else f"a {type(item).__name__}"
        raise UserError(f"request item {number} must hold exactly one of image, video, text (it holds {held})")
    kind = media[0]
    others = [key for key in keys if key != kind and key not in ITEM_OPTIONS[kind]]
    if others:
        takes = " and ".join(ITEM_OPTIONS[kind]) or "nothing"
        raise UserError(f"request item {number}: {'an' if kind == 'image' else 'a'} {kind} item takes {takes} besides "
                        f"its {kind}, not {', '.join(map(repr, others))}")
    value = item[kind]
    if kind == "text" and not isinstance(value, str):
        raise UserError(f"request item {number}: text must be a string, not {type(value).__name__}")
    if kind == "text":
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:  # (a lone surrogate: the tokenizer takes only text UTF-8 can hold)
            raise UserError(f"request item {number}: text holds {value[e.start]!r} at character {e.start}, a lone "
                            "surrogate, which is not a character") from None
    if kind == "image" and not isinstance(value, (str, os.PathLike, Image.Image)):
        raise UserError(f"request item {number}: image must be a path or a PIL image, not {type(value).__name__}")
    if kind == "video" and not isinstance(value, (str, os.PathLike, list, tuple)):
        raise UserError(f"request item {number}: video must be a path or a list of frames, not {type(value).__name__}")
    return kind


def _display(kind: str, value) -> str:
    if kind == "text":
        return value
    if kind == "video" and isinstance(value, (list, tuple)):
        return f"<video: {len(value)} frames>"
    return f"<{kind}: {describe(value)}>"


def _template_reads(template: str, name: str) -> bool:
    """Whether a chat template reads the variable `name` (a template without `tools` never shows them)."""
    try:
        parsed = jinja2.Environment(extensions=["jinja2.ext.loopcontrols"]).parse(template)
    except jinja2.TemplateSyntaxError:  # a tag of transformers' own ({% generation %}): its text must do
        return name in template
    return name in jinja2.meta.find_undeclared_variables(parsed)


def describe_request(request) -> str:
    """A request as people read it: "<image: cat.jpg> What is this?". Never fails, even on a malformed request
    (it names what it was given)."""
    try:
        return " ".join(_display(kind, value) for item in _items(request) for kind, value in item.items()
                        if kind in ITEM_KINDS)
    except (TypeError, AttributeError):
        return repr(request)


def _check_video_settings(fps, max_frames, frames_per_step: int) -> None:
    check_frame_rate(fps, "--video_fps")
    if isinstance(max_frames, bool) or not isinstance(max_frames, int) or max_frames < frames_per_step:
        raise UserError(
            f"--video_max_frames must be an integer of at least {frames_per_step} (the model reads a video "
            f"{frames_per_step} frames at a time), got {max_frames!r}"
        )


# The image processor's settings that decide how it cuts patches, and the vision config's names for them.
PATCH_SETTINGS = (("patch_size", "patch_size"), ("temporal_patch_size", "temporal_patch_size"),
                  ("merge_size", "spatial_merge_size"))


def _check_patches_fit_the_tower(processor, vision_config, source: str) -> None:
    """The image processor cuts the patches the vision tower takes: each of its patch settings equals the vision
    config's, else the first image fails deep in the tower (a patch of the wrong length) or, with a larger merge
    size, is silently fed to it in the wrong order."""
    for name, model_name in PATCH_SETTINGS:
        ours, model = getattr(processor, name, None), getattr(vision_config, model_name, None)
        if ours != model:
            raise UserError(f"{name} {ours!r} of {source} differs from vision_config.{model_name} {model!r} in "
                            "config.json: the image processor must cut the patches the vision tower takes")


def check_pixel_bounds(low, high, low_name: str, high_name: str, factor: int, max_input_length,
                       where: str = "") -> None:
    """Image pixel bounds refused in one line naming where each came from (`where`, then the bound's name: a flag,
    the checkpoint's file, a request item's key): a ceiling below one merged token, a floor above the ceiling, or
    a floor that makes every image longer than the prompt budget (resizing up to such a floor alone would take
    minutes). `low` None: a ceiling alone (a video's frames, whose floor follows their ceiling: media._frame_size).
    The one check of the flags, of a request item's own bounds and of the server's mm_processor_kwargs."""
    for name, value in ((low_name, low), (high_name, high)) if low is not None else ((high_name, high),):
        if isinstance(value, bool) or not isinstance(value, int):
            raise UserError(f"{where}{name} must be a whole number of pixels, got {value!r}")
    if low is not None and low < 0:
        raise UserError(f"{where}{low_name} must be 0 or more, got {low}")
    if high < factor**2:
        raise UserError(f"{where}{high_name} must be at least {factor**2} (one {factor}x{factor} token), got {high}")
    if low is None:
        return
    if low > high:
        raise UserError(f"{where}{low_name} {low} is more than {high_name} {high}")
    fewest_tokens = math.ceil(low / factor**2)
    if max_input_length is not None and fewest_tokens > max_input_length:
        raise UserError(
            f"{where}{low_name} {low} makes every image at least {fewest_tokens} tokens ({factor}x{factor} pixels "
            f"each), more than --max_input_length {max_input_length}"
        )


def _with_bounds(processor, min_pixels: int, max_pixels: int):
    """`processor` resizing within these bounds: its smart_resize reads min_pixels and max_pixels, `size` says the
    same to whoever prints or saves it."""
    processor.min_pixels, processor.max_pixels = min_pixels, max_pixels
    processor.size = {"min_pixels": min_pixels, "max_pixels": max_pixels}
    return processor


class Preprocessor:
    """Turns requests into ProcessedPrompts for one checkpoint (its chat template, image processor and token ids).
    The image processor class is the registry's for the config's model_type (atb_models.models)."""

    def __init__(
        self,
        model_path,
        config,
        tokenizer,
        *,
        min_pixels: int | None = None,
        max_pixels: int | None = None,
        video_fps: float = 0.5,
        video_max_frames: int = 768,
        max_input_length: int | None = None,
        chat_template: str | None = None,
        limit_mm_per_prompt: dict | None = None,
    ):
        """`max_input_length`, when given, is the prompt token budget: pixel bounds that make every image longer
        are refused here, and an image that would exceed it fails its request before it is resized.
        `limit_mm_per_prompt`: the most images and videos a request may hold ({"image": N, "video": M}, either
        left out for no limit); a request holding more fails before any of its media is read."""
        self.limit_mm_per_prompt = check_media_limits({} if limit_mm_per_prompt is None else limit_mm_per_prompt,
                                                      "--limit_mm_per_prompt: ")
        self.tokenizer = tokenizer
        self.vocab_size = config.vocab_size
        self.image_token_id = config.image_token_id
        self.video_token_id = config.video_token_id
        self.vision_start_token_id = config.vision_start_token_id
        self.spatial_merge_size = config.vision_config.spatial_merge_size
        # Qwen2.5-VL places a video's grid steps at their time (rope_index); Qwen2-VL's config has no such field.
        self.tokens_per_second = getattr(config.vision_config, "tokens_per_second", None)
        self.video_fps = video_fps
        self.video_max_frames = video_max_frames
        self.video_max_pixels = max_pixels
        # A template given (the server's --chat_template) replaces the checkpoint's.
        self.chat_template = chat_template or tokenizer.chat_template or self._read_chat_template(model_path)
        self.takes_tools = _template_reads(self.chat_template, "tools")
        # (a message's field, which no variable list shows: a template that never names it drops the calls)
        self.shows_tool_calls = "tool_calls" in self.chat_template
        self._render([{"role": "user", "content": [{"type": "text", "text": "Hi"}]}], None, False,
                     "a one-line chat")  # a broken template fails the start, not every request

        image_processor_class = model_family(config.model_type).image_processor_class()
        processor_file = os.path.join(model_path, "preprocessor_config.json")
        if os.path.isfile(processor_file):
            # The concrete class reads only the JSON: unlike AutoImageProcessor it never follows an `auto_map` to
            # the folder's Python. transformers ignores the flag here; it states the rule of the kit's every load.
            source = processor_file
            try:
                processor = image_processor_class.from_pretrained(model_path, trust_remote_code=False)
            except (OSError, ValueError, TypeError) as err:
                raise UserError(f"cannot read {model_path}/preprocessor_config.json: {err}") from None
        else:
            logger.warning("%s has no preprocessor_config.json; using the image processor's defaults", model_path)
            source = "the image processor's defaults (no preprocessor_config.json)"
            processor = image_processor_class()
        _check_patches_fit_the_tower(processor, config.vision_config, source)
        self.image_processor = _with_bounds(processor, processor.min_pixels if min_pixels is None else min_pixels,
                                            processor.max_pixels if max_pixels is None else max_pixels)
        # Where each image bound in force came from, as messages name it: the flag, else the checkpoint's file.
        self.bound_names = {name: f"--{name}" if given is not None else f"{name} in preprocessor_config.json"
                            for name, given in (("min_pixels", min_pixels), ("max_pixels", max_pixels))}
        self.factor = processor.patch_size * processor.merge_size  # one merged token's side in pixels
        self.max_input_length = max_input_length
        # Characters a token covers at most (byte-level BPE: a vocabulary entry's length is its bytes; an added
        # token's, its text), times 4 for the normalizer's composing of characters (NFC: a letter and its marks
        # become one): text longer than max_input_length of these cannot fit, and is refused untokenized.
        self.token_characters = 4 * max(map(len, tokenizer.get_vocab()), default=1)
        _check_video_settings(video_fps, video_max_frames, processor.temporal_patch_size)
        check_pixel_bounds(processor.min_pixels, processor.max_pixels, self.bound_names["min_pixels"],
                           self.bound_names["max_pixels"], self.factor, max_input_length)

    @staticmethod
    def _read_chat_template(model_path) -> str:
        # Some checkpoints keep the template beside the processor rather than in tokenizer_config.json.
        path = os.path.join(model_path, "chat_template.json")
        if not os.path.isfile(path):
            raise UserError(
                f"{model_path} has no chat template (neither in tokenizer_config.json nor in chat_template.json)"
            )
        with open(path, encoding="utf-8") as f:
            return json.load(f)["chat_template"]

    def __call__(self, request: list, continue_final_message: bool = False, tools: list | None = None
                 ) -> ProcessedPrompt:
        """`request`: a list of items (one user turn) or of Messages (a conversation). The prompt ends with the
        template's opening of the assistant's answer; with `continue_final_message`, the conversation's last
        message, an assistant's ending in text, is left open instead, for the model to continue (an answer's start
        given by the caller). `tools`: OpenAI's function descriptions, given to the template (which may show them
        to the model: `takes_tools`)."""
        turns = conversation(request)
        items = _items(turns)
        if not items:
            raise UserError("the request is empty: give at least one image, video or text item")
        kinds = [_item_kind(item, number) for number, item in enumerate(items, start=1)]
        check_media_counts(kinds, self.limit_mm_per_prompt)
        values = [item[kind] for item, kind in zip(items, kinds)]
        characters = sum(len(value) for kind, value in zip(kinds, values) if kind == "text")
        # (the functions and the calls made are text of the prompt too)
        characters += sum(len(call.name) + len(call.arguments) for turn in turns for call in turn.tool_calls)
        characters += len(json.dumps(tools, ensure_ascii=False, default=repr)) if tools else 0
        if self.max_input_length is not None and characters > self.max_input_length * self.token_characters:
            # (tokenizing megabytes would hold up every request behind this one, to refuse it after)
            raise UserError(f"the request's text has {characters} characters, more than --max_input_length "
                            f"{self.max_input_length} tokens can hold")

        # Every item's settings are checked before any medium is read.
        settings = [self._item_settings(item, kind, f"request item {number}: ")
                    for number, (item, kind) in enumerate(zip(items, kinds), start=1)]
        visuals = [self._visual(kind, value, setting)
                   for kind, value, setting in zip(kinds, values, settings) if kind != "text"]
        # (an assistant turn holding function calls ends in them, whatever text it holds before them)
        last = turns[-1]
        if continue_final_message and (last.role != "assistant" or not last.items or last.tool_calls
                                       or kinds[-1] != "text"):
            raise UserError("continue_final_message continues the last message: it must be the assistant's, "
                            "ending in text (not in function calls)")
        if not self.shows_tool_calls and any(turn.tool_calls for turn in turns):
            raise UserError("the chat template does not show an assistant's tool calls, so the model would not see "
                            "the calls it made: give a template that does (the server's --chat_template, "
                            "examples/chat_templates/qwen2_vl_tool_use.jinja)")
        token_ids = self._expand_placeholders(self._tokenize(turns, kinds, values, continue_final_message, tools),
                                              visuals)
        grids = {kind: [v.grid_thw for v in visuals if v.kind == kind] for kind in ("image", "video")}
        positions, rope_delta = rope_index(
            token_ids,
            grids["image"] or None,
            grids["video"] or None,
            image_token_id=self.image_token_id,
            video_token_id=self.video_token_id,
            vision_start_token_id=self.vision_start_token_id,
            spatial_merge_size=self.spatial_merge_size,
            video_seconds_per_grid=[v.seconds_per_grid for v in visuals if v.kind == "video"],
            tokens_per_second=self.tokens_per_second,
        )
        text = describe_request(request)
        return ProcessedPrompt(token_ids, visuals, positions, rope_delta, text)

    def plain(self, prompt) -> ProcessedPrompt:
        """A text completion's prompt as it is, without the chat template: a string (its special tokens' text, such
        as <|im_start|>, read as those tokens, as transformers' tokenizer does) or a list of token ids. Text only:
        an image or video placeholder token, which would have no pixels behind it, is refused."""
        if isinstance(prompt, str):
            _item_kind({"text": prompt}, 1)  # (a lone surrogate)
            if self.max_input_length is not None and len(prompt) > self.max_input_length * self.token_characters:
                raise UserError(f"the prompt has {len(prompt)} characters, more than --max_input_length "
                                f"{self.max_input_length} tokens can hold")
            token_ids, text = self.tokenizer(prompt, add_special_tokens=False)["input_ids"], prompt
        elif isinstance(prompt, (list, tuple)):
            # (before anything reads them: decoding millions of ids held the one preprocessing thread for seconds)
            if self.max_input_length is not None and len(prompt) > self.max_input_length:
                raise UserError(f"the prompt has {len(prompt)} tokens, more than --max_input_length "
                                f"{self.max_input_length}")
            bad = [t for t in prompt if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.vocab_size]
            if bad:
                raise UserError(f"the prompt's token ids must be integers in 0..{self.vocab_size - 1} (the "
                                f"vocabulary), got {bad[0]!r}")
            token_ids = list(prompt)
            text = self.tokenizer.decode(token_ids)
        else:
            raise UserError(f"a prompt must be a string or a list of token ids, got {type(prompt).__name__}")
        if not token_ids:
            raise UserError("the prompt is empty")
        if {self.image_token_id, self.video_token_id} & set(token_ids):
            image_pad, video_pad = self.tokenizer.convert_ids_to_tokens([self.image_token_id, self.video_token_id])
            raise UserError(f"a text prompt must not hold the vision placeholder tokens {image_pad} or {video_pad}: "
                            "send images and videos through the chat API")
        positions, rope_delta = rope_index(token_ids, None, None, image_token_id=self.image_token_id,
                                           video_token_id=self.video_token_id,
                                           vision_start_token_id=self.vision_start_token_id,
                                           spatial_merge_size=self.spatial_merge_size)
        return ProcessedPrompt(token_ids, [], positions, rope_delta, text)

    def check_request_options(self, options: dict, where: str) -> None:
        """Options that apply to every image and video of a request (ITEM_OPTIONS' keys: the server's
        mm_processor_kwargs), checked as an item's own are, the messages beginning with `where`."""
        for kind in ("image", "video"):
            self._item_settings({kind: None, **{key: options[key] for key in ITEM_OPTIONS[kind] if key in options}},
                                kind, where)

    def _item_settings(self, item: dict, kind: str, where: str) -> dict:
        """What `_visual` needs of an item besides its medium, its own keys (ITEM_OPTIONS) checked as the flags are
        and taking the place of the server-wide settings: an image's pixel bounds, a video's frame rate (None: the
        default for its source) and its frames' pixel ceiling (None: qwen-vl-utils' budget alone)."""
        if kind == "image":
            names = {name: name if name in item else self.bound_names[name] for name in ITEM_OPTIONS["image"]}
            low = item.get("min_pixels", self.image_processor.min_pixels)
            high = item.get("max_pixels", self.image_processor.max_pixels)
            if "min_pixels" in item or "max_pixels" in item:
                check_pixel_bounds(low, high, names["min_pixels"], names["max_pixels"], self.factor,
                                   self.max_input_length, where)
            # (what a too-large image's message says to lower)
            ceiling = "its max_pixels" if "max_pixels" in item else "--max_pixels"
            return {"min_pixels": low, "max_pixels": high, "ceiling": ceiling}
        if kind == "video":
            if "fps" in item:
                check_frame_rate(item["fps"], f"{where}fps")
            if "max_pixels" in item:
                check_pixel_bounds(None, item["max_pixels"], "", "max_pixels", self.factor, None, where)
            return {"fps": item.get("fps"), "max_pixels": item.get("max_pixels", self.video_max_pixels)}
        return {}

    def _image_processor(self, min_pixels: int, max_pixels: int):
        """The image processor resizing within these bounds: the shared one, or for an item's own bounds a shallow
        copy (the shared one serves every request, perhaps several at once, and is never changed)."""
        processor = self.image_processor
        if (min_pixels, max_pixels) == (processor.min_pixels, processor.max_pixels):
            return processor
        return _with_bounds(copy.copy(processor), min_pixels, max_pixels)

    def _visual(self, kind: str, source, settings: dict) -> VisualInput:
        """One image or video, with its item's settings (`_item_settings`): an image's pixel bounds; a video's
        frame rate, which overrides its default (FRAME_LIST_FPS for a list of frames, --video_fps for a file), and
        its frames' pixel ceiling."""
        seconds_per_grid = None
        if kind == "image":
            image = load_image(source)
            processor = self._image_processor(settings["min_pixels"], settings["max_pixels"])
            # The processor's own resize refuses tiny or extreme images with a bare ValueError, and returns a
            # side of 0 for some: the size is settled here, as a UserError for this request alone. (The same
            # bounds as the processor's resize: the sizes agree.)
            height, width = fit_to_grid(
                image.height,
                image.width,
                factor=self.factor,
                min_pixels=processor.min_pixels,
                max_pixels=processor.max_pixels,
                source=source,
            )
            tokens = height * width // self.factor**2
            if self.max_input_length is not None and tokens > self.max_input_length:
                # Refused before the processor resizes and normalises it, which for such an image takes long.
                raise UserError(
                    f"{describe(source)} would take {tokens} tokens at {width}x{height} pixels, more than "
                    f"--max_input_length {self.max_input_length}: lower {settings['ceiling']} or raise "
                    "--max_input_length"
                )
            out = processor(images=[image], videos=None, return_tensors="pt")
            pixel_values, grid = out["pixel_values"], out["image_grid_thw"][0]
        else:
            fps = settings["fps"]
            if fps is None:
                fps = FRAME_LIST_FPS if isinstance(source, (list, tuple)) else self.video_fps
            frames, sampled_fps = load_video(
                source, fps, self.video_max_frames, settings["max_pixels"], factor=self.factor
            )
            seconds_per_grid = self.image_processor.temporal_patch_size / sampled_fps
            logger.debug("%s: %d frames at %g fps, %g s per temporal grid step", _display(kind, source), len(frames),
                         sampled_fps, seconds_per_grid)
            # The frames are already sized for their pixel budget; resizing again would apply the image budget.
            out = self.image_processor(
                images=None, videos=[frames], do_resize=False, input_data_format="channels_last", return_tensors="pt"
            )
            pixel_values, grid = out["pixel_values_videos"], out["video_grid_thw"][0]
        t, h, w = (int(x) for x in grid)
        return VisualInput(kind, pixel_values, (t, h, w), t * h * w // self.spatial_merge_size**2, seconds_per_grid,
                           content_hash(kind, pixel_values, (t, h, w), seconds_per_grid))

    def _tokenize(self, turns: list[Message], kinds: list[str], values: list, continue_final: bool,
                  tools: list | None) -> list[int]:
        parts = iter([{"type": "text", "text": v} if k == "text" else {"type": k} for k, v in zip(kinds, values)])
        chat = []
        for turn in turns:
            message = {"role": turn.role, "content": [next(parts) for _ in turn.items]}
            if turn.tool_calls:  # arguments as an object, as templates print them (tojson)
                message["tool_calls"] = [{"id": call.id, "type": "function", "function": {
                    "name": call.name, "arguments": json.loads(call.arguments)}} for call in turn.tool_calls]
            if turn.tool_call_id is not None:
                message["tool_call_id"] = turn.tool_call_id
            chat.append(message)
        rendered = self._render(chat, tools, continue_final, "this conversation")
        try:
            rendered.encode("utf-8")
        except UnicodeEncodeError as e:  # (the items' text is checked; the tools' and calls' strings reach only here)
            raise UserError(f"the tools or tool calls hold {rendered[e.start]!r}, a lone surrogate (JSON's \\ud800 "
                            "alone), which is not a character") from None
        return self.tokenizer(rendered, add_special_tokens=False)["input_ids"]

    def _render(self, chat: list, tools: list | None, continue_final: bool, what: str) -> str:
        try:
            return self.tokenizer.apply_chat_template(
                chat,
                tools=tools,
                chat_template=self.chat_template,
                tokenize=False,
                add_generation_prompt=not continue_final,
                continue_final_message=continue_final,
            )
        except jinja2.TemplateError as e:  # a syntax error, a template's own raise_exception, a chat it cannot print
            raise UserError(f"the chat template cannot render {what}: {e}") from None

    def _expand_placeholders(self, token_ids: list[int], visuals: list[VisualInput]) -> list[int]:
        ids = torch.tensor(token_ids, dtype=torch.long)
        is_placeholder = (ids == self.image_token_id) | (ids == self.video_token_id)
        placeholder_kinds = ["image" if i == self.image_token_id else "video" for i in ids[is_placeholder].tolist()]
        if placeholder_kinds != [v.kind for v in visuals]:
            image_pad, video_pad = self.tokenizer.convert_ids_to_tokens([self.image_token_id, self.video_token_id])
            raise UserError(
                f"the prompt holds {len(placeholder_kinds)} image/video placeholders for {len(visuals)} images/videos; "
                f"text must not contain vision tokens such as {image_pad} or {video_pad}"
            )
        repeats = torch.ones_like(ids)
        repeats[is_placeholder] = torch.tensor([v.num_tokens for v in visuals], dtype=torch.long)
        starts = (repeats.cumsum(0) - repeats)[is_placeholder].tolist()
        for visual, start in zip(visuals, starts):
            visual.start = start
        return ids.repeat_interleave(repeats).tolist()
