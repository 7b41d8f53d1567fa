"""Which devices this machine has, asked the same way everywhere (CLI options, calibration_device,
the CPU features that kernels and benchmarks check)."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=None)
def cpu_flags() -> frozenset[str]:
    """The CPU's feature flags ("avx2", "avx512_vnni", "amx_int8", ...) from /proc/cpuinfo; empty
    where there is none (not Linux)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return frozenset()


def device_count(device: torch.device) -> int:
    """How many devices of `device`'s type torch sees on this machine (1 for cpu, 0 if none)."""
    if device.type == "cpu":
        return 1
    if device.type == "mps":
        return int(torch.backends.mps.is_available())
    backend = getattr(torch, device.type, None)
    available = getattr(backend, "is_available", None)
    if not (available and available()):
        return 0
    return backend.device_count() if hasattr(backend, "device_count") else 1


def exists(device: torch.device) -> bool:
    return (device.index or 0) < device_count(device)


def peak_memory_mb() -> float | None:
    """This process's peak resident memory (VmHWM) in MiB, where Linux tells it; None elsewhere."""
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


def available_memory_bytes() -> int | None:
    """Memory the system can give this process now without swapping (Linux's MemAvailable); None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


@functools.lru_cache(maxsize=None)
def _malloc_trim():
    """glibc's `malloc_trim`, or None (another C library, no libc found)."""
    import ctypes
    import ctypes.util

    try:
        return getattr(ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6"), "malloc_trim", None)
    except OSError:
        return None


def release_free_memory() -> None:
    """Hand the C heap's free pages back to the system (glibc's `malloc_trim(0)`; a no-op elsewhere).

    Tensors of a few MB that torch frees go back to glibc's heap, not to the system, and freed holes between
    live allocations stay resident: over many blocks of calibration that creeps up the process's peak
    resident memory. Called between layer groups and blocks, where the big temporaries have just gone."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def last_level_cache_bytes(default: int = 32 << 20) -> int:
    """Size of the largest CPU cache (Linux sysfs, e.g. L3 "32768K"); `default` where unknown."""
    import glob
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(path) as f:
                text = f.read().strip().upper()
            sizes.append(int(text[:-1]) * {"K": 1 << 10, "M": 1 << 20}[text[-1]] if text[-1] in "KM" else int(text))
        except (OSError, ValueError, KeyError):
            continue
    return max(sizes, default=default)
