"""The kit's own CPU kernels (atb_models/csrc): compiled with the machine's C++ compiler on first use, cached, and
loaded with ctypes. A build takes about two seconds and needs no PyTorch headers: the kernels work on raw float
pointers, and link OpenMP against the libgomp PyTorch has already loaded.

Whether a kernel is used at all is atb_models/platform.py's decision; this module only builds and loads. Nothing
here raises: a missing compiler or a failed build returns None with the reason logged once, and the caller keeps
its fallback.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from atb_models.config import kit_home

logger = logging.getLogger("atb_models.native")

SOURCE_DIR = Path(__file__).resolve().parent / "csrc"
CXX_FLAGS = ("-O3", "-mavx512f", "-mfma", "-fopenmp", "-shared", "-fPIC", "-std=c++17")

_loaded: dict = {}


def cache_dir() -> Path:
    """native/ under the kit's home (config.kit_home)."""
    return kit_home() / "native"


def compiler() -> str | None:
    return os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")


def build(name: str) -> Path | None:
    """csrc/<name>.cpp compiled into the cache (named by a hash of the sources, csrc's headers included, flags and
    compiler, so an edit or another compiler builds anew), or None where no compiler is found or the build fails."""
    cxx = compiler()
    if cxx is None:
        logger.info("no C++ compiler found (set CXX): the kit's %s kernel is not built", name)
        return None
    source = SOURCE_DIR / f"{name}.cpp"
    sources = [source, *sorted(SOURCE_DIR.glob("*.h"))]
    digest = hashlib.sha256(b"".join(path.read_bytes() for path in sources)
                            + " ".join((cxx, *CXX_FLAGS)).encode()).hexdigest()[:16]
    target = cache_dir() / f"{name}-{digest}.so"
    if target.is_file():
        return target
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: ranks building at once never load a half-written library.
        fd, staging = tempfile.mkstemp(prefix=f".{name}-", suffix=".so", dir=target.parent)
        os.close(fd)
        try:
            result = subprocess.run([cxx, *CXX_FLAGS, str(source), "-o", staging], capture_output=True, text=True,
                                    timeout=300)
            if result.returncode != 0:
                last = (result.stderr.strip().splitlines() or ["no message"])[-1]
                logger.info("building the kit's %s kernel failed (%s): %s", name, cxx, last)
                return None
            os.replace(staging, target)
        finally:
            if os.path.exists(staging):
                os.unlink(staging)
    except (OSError, subprocess.SubprocessError) as e:
        logger.info("building the kit's %s kernel failed: %s", name, e)
        return None
    return target


def load(name: str) -> ctypes.CDLL | None:
    """The built library, loaded once per process (None where it cannot be built or loaded)."""
    if name not in _loaded:
        path = build(name)
        library = None
        if path is not None:
            try:
                library = ctypes.CDLL(str(path))
            except OSError as e:
                logger.info("loading the kit's %s kernel failed: %s", name, e)
        _loaded[name] = library
    return _loaded[name]
