"""Loading and sizing images and videos: everything that touches a media file, and every way it can be bad.

Images come back as RGB PIL images at their own size (the image processor resizes them). Videos come back as a
uint8 array of sampled frames already resized to their grid, following the qwen-vl-utils sampling rule.

Checking a file (`probe_media_file`) needs neither torch nor transformers, which are imported where a video is
sampled and sized: run_pa refuses a bad file before they load.
"""

from __future__ import annotations

import math
import os
import warnings
from contextlib import contextmanager
from typing import TYPE_CHECKING, Iterator, Sequence, Union

import numpy as np
from PIL import Image

from atb_models.errors import UserError

if TYPE_CHECKING:
    import cv2

# FFmpeg inside OpenCV prints its own complaints about a corrupt file ("moov atom not found") on stderr; the kit
# reports the file itself, in one line. Must be set before OpenCV loads its video backend.
os.environ.setdefault("OPENCV_FFMPEG_LOGLEVEL", "-8")

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp")
VIDEO_EXTENSIONS = (".mp4", ".wmv", ".avi")
IMAGE_FORMATS = frozenset({"JPEG", "MPO", "PNG", "BMP"})  # as PIL names them; MPO is a camera's multi-frame JPEG

MAX_IMAGE_PIXELS = 10**8  # decompression-bomb guard

# One-channel modes deeper than 8 bits (16-bit modes aside): the full scales their values may be meant on.
DEEP_FULL_SCALES = {"I": (255, 65535), "F": (1.0, 255)}

# Video sizing (qwen-vl-utils' constants): frames come in temporal pairs, at least 4 of them; each frame gets
# at least 128 and at most 768 merged tokens, and the whole video about 24576 at most.
FRAME_FACTOR = 2
VIDEO_MIN_FRAMES = 4
VIDEO_MIN_PIXELS = 128 * 28 * 28
VIDEO_MAX_FRAME_PIXELS = 768 * 28 * 28
VIDEO_TOTAL_PIXELS = 24576 * 28 * 28

ImageSource = Union[str, os.PathLike, Image.Image]
VideoSource = Union[str, os.PathLike, Sequence[ImageSource]]


MEDIA_KINDS = ("image", "video")


def check_media_limits(limits, where: str = "") -> dict:
    """limit_mm_per_prompt (vLLM's name): the most images and videos one request may hold, {"image": N, "video": M},
    either left out for no limit; checked, in messages beginning with `where`. Torch-free: the flag's parser
    (cli.run_pa) and the Preprocessor share it."""
    if not isinstance(limits, dict):
        raise UserError(f"{where}must map image and video to the most of each a request may hold, got {limits!r}")
    for kind, limit in limits.items():
        if kind not in MEDIA_KINDS:
            raise UserError(f"{where}{kind!r} is not a modality it limits ({', '.join(MEDIA_KINDS)})")
        if isinstance(limit, bool) or not isinstance(limit, int) or limit < 0:
            raise UserError(f"{where}{kind} must be a whole number of {kind}s, 0 or more, got {limit!r}")
    return dict(limits)


def check_media_counts(kinds: list, limits: dict) -> None:
    """A request's media, by kind in prompt order, within limit_mm_per_prompt (`check_media_limits`): counted before
    any of them is read, so a request of thousands of images is refused at once."""
    for kind, limit in limits.items():
        count = kinds.count(kind)
        if count > limit:
            raise UserError(f"the request holds {count} {kind}{'s' if count != 1 else ''}, more than "
                            f"--limit_mm_per_prompt {kind}={limit} allows")


def describe(source) -> str:
    """How a media source is named in messages."""
    if isinstance(source, Image.Image):
        return f"<PIL image {source.width}x{source.height}>"
    return os.fspath(source)


def classify_media(path: Union[str, os.PathLike]) -> str:
    """'image' or 'video', by the file's extension (case-insensitive)."""
    ext = os.path.splitext(os.fspath(path))[1].lower()
    if not ext and os.path.isdir(path):
        raise UserError(f"{os.fspath(path)} is a folder, not an image or video file (--dataset_path takes a folder "
                        "of them)")
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    raise UserError(
        f"unsupported file type '{ext or '(none)'}' for {os.fspath(path)}: "
        f"images {' '.join(IMAGE_EXTENSIONS)}, videos {' '.join(VIDEO_EXTENSIONS)}"
    )


def _check_file(path: str, what: str) -> None:
    if not os.path.exists(path):
        raise UserError(f"{what} file not found: {path}")
    if not os.path.isfile(path):
        raise UserError(f"{what} path is not a file: {path}")
    if not os.access(path, os.R_OK):
        raise UserError(f"{what} file is not readable: {path}")


@contextmanager
def _open_image_file(path: str) -> Iterator[Image.Image]:
    """The image file opened (only its header read yet), of a supported format whatever its extension says, and
    within the size limit; PIL's complaints, here or in the caller's decoding inside the block, as a UserError
    naming the file."""
    try:
        # PIL warns above its own (smaller) limit and refuses above twice it; this module's limit decides.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(path) as image:
                if image.format not in IMAGE_FORMATS:
                    raise UserError(
                        f"image {path} is a {image.format or 'unknown'} file: "
                        f"supported formats are {' '.join(sorted(IMAGE_FORMATS))}"
                    )
                if image.width * image.height > MAX_IMAGE_PIXELS:
                    raise UserError(
                        f"image {path} is {image.width}x{image.height} pixels, "
                        f"more than the limit of {MAX_IMAGE_PIXELS}"
                    )
                yield image
    except Image.DecompressionBombError:
        raise UserError(f"image {path} is larger than the limit of {MAX_IMAGE_PIXELS} pixels") from None
    except (OSError, ValueError, SyntaxError) as err:  # PIL's ways of saying "corrupt, truncated or not an image"
        # A video given as an image (the Python API's item key and the server's content type name the medium, not
        # the file's extension, which only run_pa goes by): say so.
        video = os.path.splitext(path)[1].lower() in VIDEO_EXTENSIONS
        hint = ": a video is given as a video, not as an image" if video else ""
        raise UserError(f"cannot read image {path}: corrupt or not an image ({err}){hint}") from None


def _deep_to_8bit(image: Image.Image) -> np.ndarray:
    """uint8 values of a one-channel image deeper than 8 bits (I;16*, I, F), scaled rather than clipped: over the
    full scale of its bit depth when its values fit one (65535 for 16-bit modes; 255 or 65535 for I; 1 or 255 for
    F), else stretched over its own finite range. PIL's convert("RGB") would clip every value above 255 to white."""
    values = np.asarray(image, dtype=np.float64)
    finite = values[np.isfinite(values)]
    low, high = (float(finite.min()), float(finite.max())) if finite.size else (0.0, 0.0)
    full_scales = (65535,) if image.mode.startswith("I;16") else DEEP_FULL_SCALES[image.mode]
    full = next((scale for scale in full_scales if low >= 0 and high <= scale), None)
    start, span = (0.0, full) if full is not None else (low, (high - low) or 1.0)
    values = np.nan_to_num(values, nan=start, posinf=start + span, neginf=start)
    return np.clip((values - start) * (255 / span), 0, 255).round().astype(np.uint8)


def _to_rgb(image: Image.Image) -> Image.Image:
    """A new RGB image (a copy even when `image` is RGB already)."""
    if image.mode in DEEP_FULL_SCALES or image.mode.startswith("I;16"):
        return Image.fromarray(_deep_to_8bit(image), "L").convert("RGB")
    return image.convert("RGB")


def load_image(source: ImageSource) -> Image.Image:
    """An RGB PIL image from a path or a PIL image; bad files and unreadable (e.g. closed) PIL images are a
    UserError naming them. Images deeper than 8 bits are scaled down to 8."""
    if isinstance(source, Image.Image):
        try:
            source.load()  # a closed image says so here, not deep inside the image processor
            return source if source.mode == "RGB" else _to_rgb(source)
        except (OSError, ValueError) as err:
            raise UserError(f"cannot read {describe(source)}: {err}") from None
    path = os.fspath(source)
    _check_file(path, "image")
    with _open_image_file(path) as image:
        return _to_rgb(image)


def _opencv():
    """OpenCV, imported with the first video: only videos need it, and it is slow to import."""
    import cv2

    return cv2


def _open_video(path: str) -> cv2.VideoCapture:
    capture = _opencv().VideoCapture(path)
    if not capture.isOpened():
        capture.release()
        raise UserError(f"cannot open video {path}: corrupt or not a video")
    return capture


def _check_frame_rate(native_fps: float, path: str) -> None:
    if not math.isfinite(native_fps) or native_fps <= 0:
        raise UserError(f"video {path} does not record its frame rate")


def probe_media_file(path: Union[str, os.PathLike]) -> str:
    """'image' or 'video': a file named on the command line checked cheaply, before the model loads (it exists,
    is a readable file of a known type, its header decodes), so a bad one is reported at once, not after loading.

    Images: the header only (format and size). Videos: the container opens, records a frame rate and a size,
    and its first frame decodes.
    """
    path = os.fspath(path)
    kind = classify_media(path)
    _check_file(path, kind)
    if kind == "image":
        with _open_image_file(path):
            return kind
    cv2 = _opencv()
    capture = _open_video(path)
    try:
        native_fps = capture.get(cv2.CAP_PROP_FPS)
        width, height = capture.get(cv2.CAP_PROP_FRAME_WIDTH), capture.get(cv2.CAP_PROP_FRAME_HEIGHT)
        decodes = capture.grab()
    finally:
        capture.release()
    if not decodes:
        raise UserError(f"video {path} yields no frames: corrupt or not a video")
    if not (width > 0 and height > 0):
        raise UserError(f"video {path} does not record its frame size: corrupt or not a video")
    _check_frame_rate(native_fps, path)
    return kind


def fit_to_grid(
    height: int, width: int, *, factor: int, min_pixels: float, max_pixels: float, source
) -> tuple[int, int]:
    """smart_resize's (height, width); its refusals (a side under `factor`, aspect ratio over 200) as UserErrors,
    and so is a size it would return with a side of 0 (an elongated image, or any image under a max_pixels of a
    token or two)."""
    from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

    try:
        resized = smart_resize(height, width, factor=factor, min_pixels=min_pixels, max_pixels=max_pixels)
    except ValueError as err:
        raise UserError(f"{describe(source)} is {width}x{height} pixels, which the model cannot take: {err}") from None
    if min(resized) < factor:
        raise UserError(
            f"{describe(source)} is {width}x{height} pixels: fitted to max_pixels {max_pixels:g}, its shorter side "
            f"would shrink below {factor} pixels (raise max_pixels, or crop an elongated image)"
        )
    return resized


def video_frame_count(total_frames: int, native_fps: float, fps: float, max_frames: int, *, source) -> int:
    """How many frames to sample from a clip: `fps` frames per second, even, at least 4 and at most `max_frames`."""
    min_frames = math.ceil(VIDEO_MIN_FRAMES / FRAME_FACTOR) * FRAME_FACTOR
    max_frames = math.floor(min(max_frames, total_frames) / FRAME_FACTOR) * FRAME_FACTOR
    count = total_frames / native_fps * fps
    count = min(max(count, min_frames), max_frames, total_frames)
    count = math.floor(count / FRAME_FACTOR) * FRAME_FACTOR
    if not FRAME_FACTOR <= count <= total_frames:
        raise UserError(
            f"video {describe(source)} has {total_frames} frame(s); the model needs at least {FRAME_FACTOR}"
        )
    return int(count)


def video_frame_indices(total_frames: int, count: int) -> list[int]:
    """Evenly spread frame indices, first and last included (torch's linspace and rounding, as qwen-vl-utils)."""
    import torch

    return torch.linspace(0, total_frames - 1, count).round().long().tolist()


def video_frame_max_pixels(num_frames: int, max_pixels: float | None = None) -> float:
    """Per-frame pixel budget: the video's total budget shared across its temporal pairs, within per-frame bounds."""
    shared = VIDEO_TOTAL_PIXELS / num_frames * FRAME_FACTOR
    budget = max(min(VIDEO_MAX_FRAME_PIXELS, shared), int(1.05 * VIDEO_MIN_PIXELS))
    return budget if max_pixels is None else min(budget, max_pixels)


def _resize(frame: np.ndarray, height: int, width: int) -> np.ndarray:
    # PIL's bicubic widens its kernel when shrinking (antialiased), like the torchvision resize qwen-vl-utils uses
    # and the filter the image processor applies to still images; cv2.INTER_CUBIC aliases on large reductions.
    if frame.shape[:2] == (height, width):
        return frame
    return np.asarray(Image.fromarray(frame).resize((width, height), Image.BICUBIC))


def _frame_size(height: int, width: int, num_frames: int, max_pixels, factor: int, source) -> tuple[int, int]:
    # A caller's max_pixels below the video minimum lowers the minimum too: smart_resize would otherwise enlarge
    # a small frame past the cap the caller asked for.
    min_pixels = VIDEO_MIN_PIXELS if max_pixels is None else min(VIDEO_MIN_PIXELS, max_pixels)
    return fit_to_grid(
        height,
        width,
        factor=factor,
        min_pixels=min_pixels,
        max_pixels=video_frame_max_pixels(num_frames, max_pixels),
        source=source,
    )


def _read_video_frames(path: str, indices: list[int], target_size) -> tuple[list[np.ndarray], int]:
    """Decode sequentially (no seeking, which is unreliable across codecs), keeping the frames at `indices` as RGB
    resized to `target_size(height, width)` of the first one; returns them and how many frames were decoded: up to
    the last index, or all the file holds when frames follow it (a recorded count that understates them)."""
    cv2 = _opencv()
    capture = cv2.VideoCapture(path)
    wanted = set(indices)
    kept: dict[int, np.ndarray] = {}
    size = None
    decoded = 0
    try:
        while decoded <= indices[-1] and capture.grab():
            if decoded in wanted:
                ok, frame = capture.retrieve()
                if not ok:
                    break
                frame = cv2.cvtColor(frame, cv2.COLOR_BGR2RGB)
                size = size or target_size(*frame.shape[:2])
                kept[decoded] = _resize(frame, *size)
            decoded += 1
        if decoded > indices[-1] and capture.grab():  # one grab past the last index: cheap when nothing follows
            decoded += 1 + _count_frames(capture)
    finally:
        capture.release()
    return [kept[i] for i in indices if i in kept], decoded


def _count_frames(capture: cv2.VideoCapture) -> int:
    count = 0
    while capture.grab():
        count += 1
    return count


def count_video_frames(path: Union[str, os.PathLike]) -> int:
    """Frames OpenCV reads from the file, counted one by one (the container's count can be an estimate)."""
    capture = _opencv().VideoCapture(os.fspath(path))
    try:
        return _count_frames(capture)
    finally:
        capture.release()


def _load_video_file(path: str, fps: float, max_frames: int, max_pixels, factor: int) -> tuple[np.ndarray, float]:
    _check_file(path, "video")
    cv2 = _opencv()
    capture = _open_video(path)
    try:
        native_fps = capture.get(cv2.CAP_PROP_FPS)
        total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT))
        if total <= 0:  # some containers do not record it
            total = _count_frames(capture)
    finally:
        capture.release()
    if total <= 0:
        raise UserError(f"video {path} yields no frames: corrupt or not a video")
    _check_frame_rate(native_fps, path)

    # The recorded frame count can overstate what decodes, or understate it (an AVI header's count, a count
    # estimated from the duration): then sample again from the frames that do decode, so that the frames taken
    # span the whole clip, as qwen-vl-utils' reader (which decodes every frame) spans it.
    for _ in range(2):
        count = video_frame_count(total, native_fps, fps, max_frames, source=path)
        frames, decoded = _read_video_frames(
            path,
            video_frame_indices(total, count),
            lambda height, width, count=count: _frame_size(height, width, count, max_pixels, factor, path),
        )
        if len(frames) == count and decoded == total:
            return np.stack(frames), count / total * native_fps
        if decoded == 0:
            raise UserError(f"video {path} yields no frames: corrupt or not a video")
        total = decoded
    raise UserError(f"video {path} stops decoding after {decoded} frames: corrupt video")


def _load_frame_list(frames: Sequence[ImageSource], fps: float, max_frames: int, max_pixels,
                     factor: int) -> tuple[np.ndarray, float]:
    if len(frames) == 0:
        raise UserError("a video given as a list of frames needs at least one frame")
    limit = max(FRAME_FACTOR, max_frames // FRAME_FACTOR * FRAME_FACTOR)
    if len(frames) > limit:  # more frames than allowed: an even spread of them, first and last included
        fps = fps * limit / len(frames)  # the rate of the frames kept, which time-aligned positions follow
        frames = [frames[i] for i in video_frame_indices(len(frames), limit)]
    images = [load_image(frame) for frame in frames]
    images += [images[-1]] * (-len(images) % FRAME_FACTOR)  # whole temporal pairs
    first = images[0]
    height, width = _frame_size(first.height, first.width, len(images), max_pixels, factor, frames[0])
    resized = [_resize(np.asarray(image), height, width) for image in images]
    return np.stack(resized), fps


def load_video(
    source: VideoSource,
    fps: float = 0.5,
    max_frames: int = 768,
    max_pixels: float | None = None,
    *,
    factor: int = 28,
) -> tuple[np.ndarray, float]:
    """Sampled, resized frames (uint8 [T, H, W, 3], T even, H and W multiples of `factor`) and their frame rate.

    A video file is sampled at `fps` frames per second (at least 4, at most `max_frames`). A list of frame images
    is used whole (an even spread of `max_frames` of them when it is longer), padded to an even count with its
    last frame, every frame resized to the first one's size.
    """
    if isinstance(source, (str, os.PathLike)):
        return _load_video_file(os.fspath(source), fps, max_frames, max_pixels, factor)
    return _load_frame_list(list(source), fps, max_frames, max_pixels, factor)
