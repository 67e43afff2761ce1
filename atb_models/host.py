"""What the operating system says about this machine, read in one place: /proc/cpuinfo's fields and the memory
still available. Empty answers where there is no /proc (not Linux)."""

from __future__ import annotations

import os
from pathlib import Path


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
