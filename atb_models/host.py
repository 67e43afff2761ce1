"""What the operating system says about this machine, read in one place: /proc/cpuinfo's fields and the memory
still available (empty answers where there is no /proc: not Linux); the last-level cache; memory on its huge pages;
and MKL's vector math settled on its kernels before a model's threads first call it."""

from __future__ import annotations

import contextlib
import logging
import math
import mmap
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from atb_models.errors import UserError
from atb_models.layers.sharding import ceil_div

logger = logging.getLogger("atb_models.host")

HUGE_PAGE = 2 << 20  # bytes: x86-64's transparent huge page


def read_cpuinfo() -> str:
    """The text of /proc/cpuinfo, or "" where there is none."""
    try:
        return Path("/proc/cpuinfo").read_text(errors="replace")
    except OSError:
        return ""


def cpuinfo_field(cpuinfo: str, key: str) -> str:
    """The first processor's `key` ("model name", "flags") in /proc/cpuinfo text, or ""."""
    for line in cpuinfo.splitlines():
        name, sep, value = line.partition(":")
        if sep and name.strip() == key:
            return value.strip()
    return ""


# Flags of this machine's CPU the kit is to act as if it lacked (space-separated): a CPU without them stood in for,
# the kernels built and chosen as there (.ci/run's pass as an AVX-512 CPU without VNNI, AVX512-BF16 or AMX).
FLAGS_OFF_ENV = "ATB_MODELS_CPU_FLAGS_OFF"


def cpu_flags(cpuinfo: str | None = None) -> set[str]:
    """The first processor's flags ("avx2", "avx512_bf16", "amx_bf16", ...) in /proc/cpuinfo text, empty where there
    is none; by default this machine's, less those $ATB_MODELS_CPU_FLAGS_OFF names."""
    if cpuinfo is not None:
        return set(cpuinfo_field(cpuinfo, "flags").split())
    return set(cpuinfo_field(read_cpuinfo(), "flags").split()) - set(os.environ.get(FLAGS_OFF_ENV, "").split())


# PyTorch's operators that MKL's vector math (VML) computes, in float32 and float64 only (bfloat16 and float16 take
# PyTorch's own loops): ATen/cpu/vml.h's IMPLEMENT_VML_MKL list in torch 2.13, which a test reads.
VECTOR_MATH_OPERATORS = ("cos", "sin", "tan", "exp", "log", "log2", "log10", "sqrt", "tanh", "erf", "erfc", "erfinv",
                         "atan", "asin", "acos", "trunc")
# Two engines built at once on two threads would make the first calls at once again.
_settling = threading.Lock()


def settle_vector_math() -> None:
    """Runs each of VECTOR_MATH_OPERATORS once on a few elements (one thread) in float32 and float64: called before a
    model is built (again for each model: 1.9 ms the first time in a process, 0.05 ms after, measured on the AMX
    Xeon).

    MKL chooses each function's kernel (instruction set and accuracy) at its first call, and that choice is not safe
    when the first call comes from two threads at once, as a parallel operator's halves do. On the AMX Xeon with 2
    threads, one engine's K cache differed from another's by 1e-4 in 6 processes of 20; perf probes on a process
    where it did showed the prefill's rotary `cos` running its first half on the AVX2 kernel of the low-accuracy
    mode (mkl_vml_kernel_sCos_L9EPnnn: cos(1) = 0.5403335 for 0.5403023). With these first calls made on one
    thread, none of 16 differed and the probes saw only the right kernel (docs/PERFORMANCE.md, "The KV caches that
    differed")."""
    with _settling:
        for dtype in (torch.float32, torch.float64):
            x = torch.full((8,), 0.5, dtype=dtype)
            for name in VECTOR_MATH_OPERATORS:
                getattr(torch, name)(x)


def available_memory_bytes() -> int:
    """Memory the operating system can still hand out (MemAvailable: page cache it can drop included)."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


def last_level_cache_bytes(caches: Path = Path("/sys/devices/system/cpu/cpu0/cache")) -> int:
    """The size of the first CPU's largest-level cache as sysfs reports it ("32768K"), or 0 where it does not."""
    best_level, size = 0, 0
    for index in caches.glob("index*"):
        try:
            level, text = int((index / "level").read_text()), (index / "size").read_text().strip()
            value = int(text.rstrip("KMG")) * {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}.get(text[-1:], 1)
        except (OSError, ValueError):
            continue
        if level > best_level:
            best_level, size = level, value
    return size


class HugePages:
    """Packed weights laid one after another into large private anonymous mappings advised for transparent huge
    pages (a bump allocator; each tensor from a 64-byte boundary): a model's weights, packed in the order a decode
    step reads them, lie on huge pages end to end. empty_on_huge_pages gives each weight a mapping of its own and
    advises its whole 2 MB stretches only, so a weight under 2 MB (a layer's o_proj in a small model) and each
    weight's tail stayed on 4 KB pages, where a one-row linear on o's weights took 1.18 times as long
    (docs/PERFORMANCE.md); here only a mapping's last, partly used huge page holds memory no weight uses.

    A mapping is reserved RESERVE bytes at a time (address space: pages become resident as the weights are written)
    and lives while any of its tensors does (they are views of it), the current one while this object does too.
    Where huge pages are off ($ATB_MODELS_HUGE_PAGES=0) or the system gives no such mapping, each tensor is an
    ordinary torch.empty. One per packing kernel object: two models never share one."""

    RESERVE = 256 << 20

    def __init__(self):
        self._lock = threading.Lock()
        self._mapping = None  # the current mapping as a uint8 tensor, and how many of its bytes are taken
        self._taken = 0
        self._refused = False  # the system refused a mapping: ordinary pages from then on (asked, and logged, once)

    def empty(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """An uninitialised contiguous tensor in the current mapping (a new one where it has no room)."""
        nbytes = math.prod(shape) * dtype.itemsize
        advice = getattr(mmap, "MADV_HUGEPAGE", None)
        if advice is None or self._refused or not huge_pages_wanted():
            return torch.empty(shape, dtype=dtype)
        with self._lock:
            start = ceil_div(self._taken, 64) * 64
            if self._mapping is None or start + nbytes > self._mapping.numel():
                size = max(self.RESERVE, ceil_div(nbytes, HUGE_PAGE) * HUGE_PAGE)
                try:
                    self._mapping = _advised_mapping(size, size, advice)
                except (OSError, ValueError) as e:
                    logger.info("no huge-page mapping of %d bytes for packed weights (%s): ordinary pages", size, e)
                    self._refused = True
                    return torch.empty(shape, dtype=dtype)
                start = 0
            self._taken = start + nbytes
            return self._mapping[start:start + nbytes].view(dtype).view(shape)


def _advised_mapping(nbytes: int, advised: int, advice: int) -> torch.Tensor:
    """`nbytes` bytes of a private anonymous mapping from a 2 MB boundary, the first `advised` of them (whole huge
    pages) advised for huge pages, as a uint8 tensor that holds the mapping while any view of it lives."""
    mapping = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)  # room for the boundary
    raw = torch.frombuffer(mapping, dtype=torch.uint8)
    offset = -raw.data_ptr() % HUGE_PAGE
    if advised:
        mapping.madvise(advice, offset, advised)
    return raw[offset:offset + nbytes]


def process_temp_folder(prefix: str, parent: str | None = None) -> str:
    """A new temporary folder (in `parent`, default the system's) named `prefix` + this process's id + a random
    part, made after removing those of the same prefix whose process is gone: a process killed by SIGKILL runs no
    exit path, and its folder would stay for ever. The caller removes its own folder on its exit paths."""
    root = parent or tempfile.gettempdir()
    with contextlib.suppress(OSError):
        for name in os.listdir(root):
            pid = name[len(prefix):].split("-", 1)[0] if name.startswith(prefix) else ""
            if pid.isdigit() and int(pid) != os.getpid() and not _process_alive(int(pid)):
                shutil.rmtree(os.path.join(root, name), ignore_errors=True)
    return tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root)


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # (another user's: alive)
        return True
    return True


def huge_pages_wanted() -> bool:
    """$ATB_MODELS_HUGE_PAGES: 1 (the default) or 0, checked."""
    value = os.environ.get("ATB_MODELS_HUGE_PAGES", "1")
    if value not in ("0", "1"):
        raise UserError(f"ATB_MODELS_HUGE_PAGES={value!r}: expected 1 (weights streamed in decoding on 2 MB pages "
                        "where the kernel allows) or 0 (the allocator's pages)")
    return value == "1"


def empty_on_huge_pages(shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
    """An uninitialised CPU tensor whose whole 2 MB stretches the kernel is asked to back with transparent huge
    pages (madvise MADV_HUGEPAGE on a private anonymous mapping, the data starting on a 2 MB boundary): a weight a
    decode step streams from memory. With 4 KB pages a core's stream crosses a page every 64 cache lines, and its
    hardware prefetcher stops at each; on the kit's AMD EPYC one core read 10-30% more a second from such pages
    (docs/PERFORMANCE.md). Where the tensor is under one huge page, the system has no MADV_HUGEPAGE or
    $ATB_MODELS_HUGE_PAGES is 0, an ordinary torch.empty. The mapping lives as long as the tensor (and its views)."""
    nbytes = math.prod(shape) * dtype.itemsize
    advice = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or advice is None or not huge_pages_wanted():
        return torch.empty(shape, dtype=dtype)
    try:
        # Only the whole huge pages inside are advised, so the tail stays on small pages and nothing beyond the
        # tensor is made resident.
        raw = _advised_mapping(nbytes, nbytes // HUGE_PAGE * HUGE_PAGE, advice)
    except (OSError, ValueError) as e:
        logger.info("no huge pages for a %d-byte weight (%s): ordinary pages", nbytes, e)
        return torch.empty(shape, dtype=dtype)
    return raw.view(dtype).view(shape)
