"""All-or-nothing writes of a checkpoint directory and of single files, and recovery after a crash.

A save replaces a checkpoint directory as one transaction:

1. everything is written into a temporary sibling, `.NAME.hf_quant-tmp-<pid>-<random>`;
2. the files of the old directory that the user keeps (every entry the new save did not write that
   is not a weight file, per `WEIGHT_FILE_PATTERNS`: a tokenizer, a hand-written README.md) are
   linked or copied into it; every file and directory in it is fsynced;
3. commit: on Linux the temporary directory and the target are swapped by one
   `renameat2(RENAME_EXCHANGE)`, so the target path never stops existing; elsewhere (or on a file
   system without it) the old directory is renamed to `.NAME.hf_quant-bak-<pid>-<random>` and the
   new one renamed into place, and that second rename is the commit point;
4. the parent directory is fsynced, and the old directory is removed.

A process killed at any point leaves the target as the complete old checkpoint or the complete new
one, plus at most one sibling named after the dead process's PID. `recover(target)`, run at the
start of every save here (and by the loader), puts that right: a backup whose target is missing is
renamed back, and every other sibling of a dead process is removed. Siblings of a live process (a
concurrent save) are never touched.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import errno
import fnmatch
import logging
import os
import re
import secrets
import shutil
import stat
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

logger = logging.getLogger("hf_quant")

# Weight files a new save makes stale: left beside the new ones they could be loaded instead.
WEIGHT_FILE_PATTERNS = ("model*.safetensors", "model.safetensors.index.json")

_TAG = ".hf_quant-"
# Every temporary or backup name: `.NAME.hf_quant-KIND-PID-RANDOM` (RANDOM in tempfile's alphabet).
_LEFTOVER = re.compile(r"\.(.+)\.hf_quant-(tmp|bak)-(\d+)-[a-z0-9_]+")
_POSIX = os.name == "posix"


def _prefix(name: str, kind: str) -> str:
    return f".{name}{_TAG}{kind}-{os.getpid()}-"


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    if not _POSIX:  # os.kill(pid, 0) would terminate the process on Windows: never guess there
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (OSError, OverflowError):  # EPERM: it exists, under another user
        return True
    return True


def _leftovers(parent: Path, name: str | None = None) -> list[tuple[Path, str, int]]:
    """(path, kind, pid) of the temporary / backup entries in `parent` (made for `name`, if given)."""
    try:
        entries = list(os.scandir(parent))
    except (FileNotFoundError, NotADirectoryError):
        return []
    found = []
    for entry in entries:
        m = _LEFTOVER.fullmatch(entry.name)
        if m and (name is None or m.group(1) == name):
            found.append((Path(entry.path), m.group(2), int(m.group(3))))
    return found


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    else:
        path.unlink()


def _fsync(path: Path, directory: bool = False) -> None:
    if directory and not _POSIX:  # directories cannot be opened on Windows; NTFS journals renames
        return
    flags = os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0)
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_tree(root: Path) -> None:
    """fsync every regular file under `root`, then every directory, deepest first, `root` last."""
    dirs = []
    for top, subdirs, files in os.walk(root):
        for f in files:
            p = Path(top) / f
            if not p.is_symlink():
                _fsync(p)
        dirs.append(Path(top))
    for d in reversed(dirs):
        _fsync(d, directory=True)


def recover(target: str | os.PathLike) -> None:
    """Put a checkpoint directory (or file) back in order after a save was killed.

    If `target` is missing but a backup of a dead save is there, the backup (the complete old
    checkpoint) is renamed back. Every other temporary or backup sibling of a dead process is
    removed, and so are temporary files of dead processes inside `target` (from `atomic_write_text`).
    Entries of live processes are left alone. Safe to call at any time, on any path; it changes
    nothing when there is nothing to recover.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():
        target = target.resolve()
    dead = [(p, kind) for p, kind, pid in _leftovers(target.parent, target.name) if not _pid_alive(pid)]
    if not os.path.lexists(target):
        backups = [p for p, kind in dead if kind == "bak"]
        if backups:  # killed between moving the old checkpoint aside and moving the new one in
            newest = max(backups, key=lambda p: p.lstat().st_ctime_ns)
            os.rename(newest, target)
            _fsync(target.parent, directory=True)
            logger.warning("hf_quant: %s: restored the previous checkpoint; an interrupted save had moved it aside.",
                           target)
            dead = [(p, kind) for p, kind in dead if p != newest]
    for path, _ in dead:
        try:
            _remove(path)
        except OSError as e:  # e.g. a read-only cache: a leftover is harmless, loads and saves go on
            logger.warning("hf_quant: could not remove %s, left by an interrupted save: %s", path, e)
    if target.is_dir():
        for path, kind, pid in _leftovers(target):
            if kind == "tmp" and path.is_file() and not path.is_symlink() and not _pid_alive(pid):
                with contextlib.suppress(OSError):
                    path.unlink()


def _umask() -> int:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)  # the only portable read; restored at once
    os.umask(mask)
    return mask


def _link_or_copy(src: str, dst: str) -> str:
    try:
        os.link(src, dst, follow_symlinks=False)
    except OSError:
        shutil.copy2(src, dst, follow_symlinks=False)
    return dst


def _carry_over(old: Path, new: Path) -> None:
    """Bring into `new` every entry of `old` the new save did not write and that is not a weight file
    (hard links where the file system allows, copies otherwise)."""
    for entry in os.scandir(old):
        name = entry.name
        if os.path.lexists(new / name) or any(fnmatch.fnmatch(name, pat) for pat in WEIGHT_FILE_PATTERNS):
            continue
        if _LEFTOVER.fullmatch(name):  # a temporary file of an interrupted write, never part of a checkpoint
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry.path), new / name)
        elif entry.is_dir():
            shutil.copytree(entry.path, new / name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry.path, str(new / name))


def _libc_renameat2():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True)
        fn = libc.renameat2  # glibc >= 2.28, musl >= 1.2.5
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _libc_renameat2()
_AT_FDCWD, _RENAME_EXCHANGE = -100, 2


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths (Linux renameat2 RENAME_EXCHANGE). False where the system
    or the file system cannot; then nothing has changed."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
        return False
    raise OSError(err, os.strerror(err), str(a), None, str(b))


def _commit(tmp: Path, target: Path) -> Path | None:
    """Put `tmp` in the place of the existing directory `target`. Returns the path now holding the
    old checkpoint, to be removed by the caller."""
    if _exchange(tmp, target):
        return tmp
    backup = target.parent / (_prefix(target.name, "bak") + secrets.token_hex(4))
    os.rename(target, backup)
    try:
        os.rename(tmp, target)  # the commit point
    except BaseException:
        if not os.path.lexists(target):
            os.rename(backup, target)
        raise
    return backup


@contextlib.contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Write a checkpoint directory all-or-nothing (see the module docstring).

    Yields an empty temporary directory beside `target` to write into. If the block raises, the
    temporary directory is deleted and `target` is left exactly as it was. Otherwise the written
    directory, plus the entries of the old `target` that are not weight files and that the block
    did not write (a tokenizer, a hand-written README), replaces `target` in one step. A new
    directory gets the mode the umask gives; a replaced one keeps its mode.
    """
    target = Path(os.path.abspath(target))
    if target.is_symlink():  # save into the directory the link points to; the link stays
        target = target.resolve()
    if os.path.lexists(target) and not target.is_dir():
        raise ValueError(f"{target} is a file; pass a directory to save the checkpoint into.")
    target.parent.mkdir(parents=True, exist_ok=True)
    recover(target)
    tmp = Path(tempfile.mkdtemp(prefix=_prefix(target.name, "tmp"), dir=target.parent))
    old: Path | None = None
    try:
        yield tmp
        exists = target.is_dir()
        if exists:
            _carry_over(target, tmp)
        os.chmod(tmp, stat.S_IMODE(target.stat().st_mode) if exists else 0o777 & ~_umask())
        _fsync_tree(tmp)
        if exists:
            old = _commit(tmp, target)
        else:
            os.rename(tmp, target)
        _fsync(target.parent, directory=True)
        if old is not None:
            shutil.rmtree(old)
    finally:
        for leftover in (tmp, old):
            if leftover is not None and os.path.lexists(leftover) and leftover != target:
                shutil.rmtree(leftover, ignore_errors=True)


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Replace one file's contents by an atomic rename: readers see the old file or the new one.

    The new contents are fsynced before the rename and the directory after it. The file keeps its
    mode (a new one gets the mode the umask gives).
    """
    path = Path(path)
    recover(path)  # temporary files of dead writers of this file
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    fd, tmp = tempfile.mkstemp(prefix=_prefix(path.name, "tmp"), dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.chmod(tmp, mode)  # mkstemp makes 0600
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    _fsync(path.parent, directory=True)
