"""From a chat request's messages to the kit's request: each image or video url made a file the Preprocessor reads.

Only two kinds of url are taken, and nothing is ever fetched from the network: a `data:` URL (base64), whose bytes
are written into the request's own temporary folder (removed as soon as the request is preprocessed, whatever
happens), and, only under --allowed_local_media_path, a `file://` path whose real path (symbolic links resolved)
lies inside that folder. The Preprocessor then checks the file as it checks any (format, size, corrupt data), so
an image sent inline and one named on run_pa's command line are held to the same rules.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import itertools
import os
from typing import Optional
from urllib.parse import unquote, urlsplit

from atb_models.multimodal.prompt import ITEM_OPTIONS, Message
from atb_models.serve.fields import bad_request
from atb_models.serve.protocol import MediaPart

# The file suffix a data URL's media type gets; the Preprocessor reads the contents, not the name, but OpenCV is
# happier with a container's usual suffix.
SUFFIXES = {"image/jpeg": ".jpg", "image/jpg": ".jpg", "image/png": ".png", "image/bmp": ".bmp",
            "video/mp4": ".mp4", "video/x-msvideo": ".avi", "video/avi": ".avi", "video/x-ms-wmv": ".wmv"}


class MediaResolver:
    def __init__(self, allowed_local_media_path: Optional[str]):
        self.allowed_root = None if allowed_local_media_path is None else os.path.realpath(allowed_local_media_path)

    def messages(self, parsed: list, folder: str, options: Optional[dict] = None) -> list[Message]:
        """The parsed messages as the engine's Messages, media written into or found for `folder`'s request; each
        image and video item given its kind's `options` (the request's mm_processor_kwargs) as its own keys."""
        counter = itertools.count(1)  # names the request's files image1.png, video2.mp4 ...
        own = {kind: {key: value for key, value in (options or {}).items() if key in ITEM_OPTIONS[kind]}
               for kind in ("image", "video")}
        return [dataclasses.replace(message, items=tuple(
                    part if isinstance(part, dict) else {**self._item(part, folder, next(counter)), **own[part.kind]}
                    for part in message.items))
                for message in parsed]

    def _item(self, part: MediaPart, folder: str, number: int) -> dict:
        scheme = urlsplit(part.url).scheme.lower()
        if scheme == "data":
            return {part.kind: _write_data_url(part, folder, number)}
        if scheme == "file":
            return {part.kind: self._local_file(part)}
        shown = f"{scheme}:" if scheme else part.url[:40]
        raise bad_request(f"{part.kind} url {shown!r}: only data: URLs (base64) are accepted"
                          + (", and file:// paths inside --allowed_local_media_path" if self.allowed_root else ""))

    def _local_file(self, part: MediaPart) -> str:
        if self.allowed_root is None:
            raise bad_request(f"{part.kind} url: file:// paths are refused (the server was started without "
                              "--allowed_local_media_path)")
        split = urlsplit(part.url)
        if split.netloc not in ("", "localhost"):
            raise bad_request(f"{part.kind} url: a file:// url must name a local path, not host {split.netloc!r}")
        local = unquote(split.path)
        if "\x00" in local:
            raise bad_request(f"{part.kind} url: a file:// path must not hold a NUL character")
        path = os.path.realpath(local)
        if os.path.commonpath([path, self.allowed_root]) != self.allowed_root:
            raise bad_request(f"{part.kind} url: {local} is outside --allowed_local_media_path")
        return path


def _write_data_url(part: MediaPart, folder: str, number: int) -> str:
    header, comma, payload = part.url.partition(",")
    media_type, *options = header[len("data:"):].split(";")
    if not comma or "base64" not in options:
        raise bad_request(f"{part.kind} url: a data: URL must be base64 (data:<type>;base64,<data>)")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise bad_request(f"{part.kind} url: the data: URL's base64 is invalid") from None
    if not data:
        raise bad_request(f"{part.kind} url: the data: URL is empty")
    path = os.path.join(folder, f"{part.kind}{number}{SUFFIXES.get(media_type.lower(), '')}")
    with open(path, "wb") as f:
        f.write(data)
    return path
