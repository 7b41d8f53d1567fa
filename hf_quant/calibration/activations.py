"""The cached calibration activations: each block's inputs, one (args, kwargs) per window.

In memory they are a list. When they do not fit (`QuantConfig.spill_activations`), the hidden states
(the first positional argument, the one that is large) go to a file in `QuantConfig.spill_dir` and are
read back one window at a time (`SpilledInputs`, a sequence like the list); the other arguments (masks,
position embeddings, which repeat from window to window and are shared) stay in memory. A block's
outputs are written to the next file as they are produced, so memory holds a window or two, never all.
Reads and writes are plain `pread` / `pwrite` on the file: the kernel's page cache keeps what fits and the
process's resident memory stays small. Bit-identical to the in-memory list.
"""

from __future__ import annotations

import errno
import logging
import os
import shutil
import tempfile
import weakref
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from ..config import QuantConfig
from ..core.devices import available_memory_bytes

logger = logging.getLogger("hf_quant")

AUTO_FRACTION = 0.25  # "auto" spills activations larger than this share of the available memory (x2 with outputs)


class SpillTooSmall(OSError):
    """The spill directory cannot hold the calibration activations."""


class SpilledInputs(Sequence):
    """Block inputs whose hidden states live in a file: `self[i]` is (args, kwargs) with args[0] read from it.
    `rest[i]` is (args[1:], kwargs) of window i. The file is removed when the object goes (or `persist` names
    it for a resume)."""

    def __init__(self, directory: str | os.PathLike, rest: list[tuple[tuple, dict]]) -> None:
        fd, path = tempfile.mkstemp(suffix=".activations", dir=directory)
        self._open(fd, path, rest, [])

    def _open(self, fd: int, path: str, rest: list, layout: list, keep: bool = False) -> None:
        self.fd, self.rest, self.layout = fd, rest, layout  # layout[i] = (offset, shape, dtype)
        self._file = {"path": path, "keep": keep}  # its current name; kept on disk once persisted (a resume's)
        weakref.finalize(self, _close_and_unlink, fd, self._file)

    @property
    def path(self) -> str:
        return self._file["path"]

    @property
    def directory(self) -> str:
        return os.path.dirname(self.path)

    def __len__(self) -> int:
        return len(self.rest)

    def hidden(self, i: int) -> torch.Tensor:
        offset, shape, dtype = self.layout[i]
        n = _nbytes(self.layout[i])
        buf = bytearray(n)
        if n and os.preadv(self.fd, [buf], offset) != n:
            raise OSError(f"{self.path}: spilled activations of window {i} are truncated")
        return torch.frombuffer(buf, dtype=torch.uint8).view(dtype).view(shape) if n else torch.empty(shape, dtype=dtype)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if i < 0:
            i += len(self)
        if not 0 <= i < len(self.layout):
            raise IndexError(i)
        args, kwargs = self.rest[i]
        return (self.hidden(i),) + tuple(args), kwargs

    def append_hidden(self, y: torch.Tensor) -> None:
        """Window len(layout)'s hidden states, written at the end of the file."""
        y = y.detach().to("cpu").contiguous()
        offset = self.layout[-1][0] + _nbytes(self.layout[-1]) if self.layout else 0
        data = memoryview(y.view(torch.uint8).numpy().reshape(-1)) if y.numel() else b""
        try:
            written = os.pwrite(self.fd, data, offset)
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG):
                free = shutil.disk_usage(self.directory).free
                raise SpillTooSmall(e.errno, f"QuantConfig.spill_dir ({self.directory}): no space left while spilling "
                                    f"calibration activations ({free / 2**20:.0f} MiB free). Choose a directory on "
                                    "a larger disk, or use fewer / shorter windows (num_samples, seq_len).") from None
            raise
        if written != len(data):
            raise OSError(f"{self.path}: short write of spilled activations")
        self.layout.append((offset, tuple(y.shape), y.dtype))

    def follow(self) -> SpilledInputs:
        """An empty store for the next block's inputs: the same other arguments, a new file beside this one."""
        return SpilledInputs(self.directory, self.rest)

    def persist(self, path: Path) -> None:
        """Keep the file as `path` (+ `.pt` beside it: the layout and the other arguments), for a resume."""
        os.replace(self.path, path.with_suffix(".activations"))
        self._file.update(path=str(path.with_suffix(".activations")), keep=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"spilled": path.with_suffix(".activations").name,
                    "layout": [(o, list(s), str(d).removeprefix("torch.")) for o, s, d in self.layout],
                    "rest": self.rest}, tmp)
        os.replace(tmp, path)

    @classmethod
    def reopen(cls, path: Path, saved: dict) -> SpilledInputs:
        """The store `persist` wrote as `path`."""
        obj = cls.__new__(cls)
        file = path.parent / saved["spilled"]
        fd = os.open(file, os.O_RDWR)
        obj._open(fd, str(file), saved["rest"], [(o, tuple(s), getattr(torch, d)) for o, s, d in saved["layout"]],
                  keep=True)
        return obj


def _close_and_unlink(fd: int, file: dict) -> None:
    try:
        os.close(fd)
        if not file["keep"]:
            os.unlink(file["path"])
    except OSError:
        pass


def _nbytes(entry: tuple) -> int:
    _, shape, dtype = entry
    return torch.Size(shape).numel() * dtype.itemsize


class Spiller:
    """Decides, from the first captured window, whether this run's activations go to disk, and where."""

    def __init__(self, config: QuantConfig, n_windows: int, default_dir: str | os.PathLike | None = None) -> None:
        self.mode, self.n = config.spill_activations, n_windows
        self.explicit_dir = config.spill_dir
        self.default_dir = default_dir
        self._tmp: tempfile.TemporaryDirectory | None = None

    def directory(self) -> str:
        if self.explicit_dir is not None:
            path = Path(self.explicit_dir)
            if not path.is_dir():
                raise ValueError(f"QuantConfig.spill_dir={os.fspath(self.explicit_dir)!r} is not a directory; create "
                                 "it or choose another one.")
            return str(path)
        if self.default_dir is not None:
            return str(self.default_dir)
        self._tmp = tempfile.TemporaryDirectory(prefix="hf_quant-activations-")
        return self._tmp.name

    def store(self, first: torch.Tensor) -> SpilledInputs | None:
        """A SpilledInputs for the run if its activations go to disk (checked for room), else None."""
        total = first.numel() * first.element_size() * self.n
        if self.mode is False:
            return None
        if self.mode == "auto":
            available = available_memory_bytes()
            if available is None or total <= AUTO_FRACTION * available:
                return None
        directory = self.directory()
        needed = 2 * total  # a block's inputs and its outputs
        free = shutil.disk_usage(directory).free
        if free < needed:
            raise SpillTooSmall(errno.ENOSPC, f"QuantConfig.spill_dir ({directory}) has {free / 2**20:.0f} MiB free, but "
                                f"the calibration activations need {needed / 2**20:.0f} MiB there ({self.n} windows "
                                f"of {tuple(first.shape)} {str(first.dtype).removeprefix('torch.')}, twice: a block's "
                                "inputs and outputs). Choose a spill_dir on a larger disk, or use fewer / shorter "
                                "windows (num_samples, seq_len).")
        logger.info("hf_quant: spilling %.0f MiB of calibration activations to %s", total / 2**20, directory)
        return SpilledInputs(directory, [])


def share_repeats(previous: tuple[tuple, dict] | None, rest: tuple[tuple, dict]) -> tuple[tuple, dict]:
    """A window's other arguments (args[1:], kwargs) with each tensor equal to the previous window's replaced by
    that one (masks, position embeddings: the same for every window of one length): windows share them."""
    if previous is None:
        return rest

    def same(new: Any, old: Any) -> Any:
        if (isinstance(new, torch.Tensor) and isinstance(old, torch.Tensor) and new.shape == old.shape
                and new.dtype == old.dtype and new.device == old.device and torch.equal(new, old)):
            return old
        if isinstance(new, (tuple, list)) and type(new) is type(old) and len(new) == len(old):
            return type(new)(same(a, b) for a, b in zip(new, old))
        return new

    args, kwargs = rest
    old_args, old_kwargs = previous
    return (tuple(same(a, old_args[i] if i < len(old_args) else None) for i, a in enumerate(args)),
            {k: same(v, old_kwargs.get(k)) for k, v in kwargs.items()})
