"""Outputs that appear whole or not at all: a folder is written beside its target and renamed into place.

``with replacing(target) as tmp:`` yields an empty folder ``.<name>.partial-<pid>-<random>`` beside ``target`` (the same
file system, so the rename is one metadata step). When the block ends normally the new folder takes the target's place:
on Linux in one atomic ``renameat2(RENAME_EXCHANGE)``, elsewhere by moving the old folder aside (``.<name>.old-…``),
renaming the new one in and removing the old one; an interrupted swap is undone the next time. When the block raises,
or the process dies (kill -9, out of memory), the partial folder is all that is left: the target — the previous output,
or nothing — is untouched, and a later stage never reads half of one. Partial folders of processes that are gone are
removed by the next write to the same target. A full disk (ENOSPC / EDQUOT anywhere in the block, also when a library
wraps it) becomes a :class:`StageError` naming the folder, the free space and the way out.

Durability against a power cut is not the aim (nothing is fsync'ed): this guards against the process dying.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import glob
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.core.errors import StageError

PARTIAL, OLD = ".partial-", ".old-"
_FULL = (errno.ENOSPC, errno.EDQUOT)
_FULL_TEXT = ("no space left on device", "disk quota exceeded", "storagefull", "os error 28")
_RENAME_EXCHANGE, _AT_FDCWD = 2, -100


def check_replaceable(target: Path, marker: str | None = None, what: str = "output") -> None:
    """Refuse, before any work, a target that is a file, or a non-empty folder without ``marker`` (not an earlier
    output of this kind: replacing it would delete what else it holds)."""
    target = Path(target)
    if target.is_file() or (target.exists() and not target.is_dir()):
        raise StageError(f"{target} is a file, not a folder; give a folder path for the {what}")
    if marker and target.is_dir() and any(target.iterdir()) and not (target / marker).exists():
        raise StageError(f"{target} holds other files and is not a {what} folder (no {marker}); writing the {what} "
                         f"would replace the whole folder: set an empty or new folder instead")


@contextlib.contextmanager
def replacing(target: Path, *, marker: str | None = None, what: str = "output", enabled: bool = True,
              after_write: Callable[[Path], None] | None = None) -> Iterator[Path]:
    """Yield an empty folder beside ``target``; when the block ends normally it replaces ``target`` whole.

    ``marker``: a file every earlier output holds (see :func:`check_replaceable`). ``enabled=False`` (ranks other than
    0 of several processes) yields a scratch folder that is removed afterwards and never put in place.
    ``after_write``: called with the written folder just before the swap (tests hook a kill there).
    """
    target = Path(target).absolute()
    if not enabled:
        scratch = Path(tempfile.mkdtemp(prefix=f"zh-align-rank-{target.name}-"))
        try:
            yield scratch
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
        return
    check_replaceable(target, marker, what)
    with disk_full_is_stage_error(target.parent, what):
        target.parent.mkdir(parents=True, exist_ok=True)
        recover(target)
        staged = Path(tempfile.mkdtemp(prefix=f".{target.name}{PARTIAL}{os.getpid()}-", dir=target.parent))
        try:
            staged.chmod(_mode(target))  # mkdtemp's 0700 would hide the output from the other users of the box
            yield staged
            if after_write is not None:
                after_write(staged)
            _swap(staged, target)
        finally:
            shutil.rmtree(staged, ignore_errors=True)  # on success it holds the previous output (or is gone)


def _mode(target: Path) -> int:
    """The permissions of the folder being replaced, else those a new folder gets (0777 less the umask)."""
    if target.is_dir():
        return target.stat().st_mode & 0o7777
    mask = os.umask(0)
    os.umask(mask)
    return 0o777 & ~mask


def _swap(staged: Path, target: Path) -> None:
    """Put ``staged`` where ``target`` is: one atomic exchange where the system has it, else two renames."""
    if not target.exists():
        os.rename(staged, target)
        return
    if _exchange(staged, target):
        return  # staged now holds the previous output; the caller removes it
    old = target.parent / f".{target.name}{OLD}{os.getpid()}"
    os.rename(target, old)
    os.rename(staged, target)  # a death between the two renames: recover() puts `old` back next time
    shutil.rmtree(old, ignore_errors=True)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two paths atomically (Linux renameat2 RENAME_EXCHANGE); False where the system or file system lacks it."""
    rename = getattr(_libc(), "renameat2", None) if os.name == "posix" else None
    if rename is None:
        return False
    if rename(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    code = ctypes.get_errno()
    if code in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(code, os.strerror(code), str(b))


def _libc():
    try:
        return ctypes.CDLL(None, use_errno=True)
    except OSError:
        return None


def recover(target: Path) -> list[Path]:
    """Tidy what an interrupted write of ``target`` left: a previous output moved aside and never replaced goes back;
    partial folders of processes that are gone are removed. Returns the folders removed or restored."""
    target = Path(target).absolute()
    touched = []
    for old in sorted(target.parent.glob(glob.escape(f".{target.name}{OLD}") + "*")):
        if _alive(old.name.rsplit("-", 1)[-1]):
            continue
        if not target.exists():
            os.rename(old, target)
        else:
            shutil.rmtree(old, ignore_errors=True)
        touched.append(old)
    for part in sorted(target.parent.glob(glob.escape(f".{target.name}{PARTIAL}") + "*")):
        pid = part.name[len(f".{target.name}{PARTIAL}"):].split("-", 1)[0]
        if not _alive(pid):
            shutil.rmtree(part, ignore_errors=True)
            touched.append(part)
    return touched


def _alive(pid: str) -> bool:
    if not pid.isdigit():
        return False
    if int(pid) == os.getpid():
        return False  # our own leftovers from an earlier, failed write in this process
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# ------------------------------------------------------------------------------------------------------------------
# A full disk
# ------------------------------------------------------------------------------------------------------------------
def is_disk_full(err: BaseException) -> bool:
    """Whether an error (or one it was raised from) is a full disk or quota; libraries that wrap the OS error (the
    safetensors writer, Arrow) are recognised by its text."""
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _FULL:
            return True
        if any(t in str(err).lower() for t in _FULL_TEXT):
            return True
        err = err.__cause__ or err.__context__
    return False


def disk_full_message(where: Path, what: str = "output") -> str:
    free = _free(where)
    return (f"disk full at {where} ({free} free) while writing the {what}; the previous {what} there is untouched. "
            f"Free space, or set output_dir (DEST for a pull) to a disk with room, then run again")


@contextlib.contextmanager
def disk_full_is_stage_error(where: Path, what: str = "output") -> Iterator[None]:
    """A full disk inside the block becomes a StageError with :func:`disk_full_message`."""
    try:
        yield
    except StageError:
        raise
    except Exception as err:
        if is_disk_full(err):
            raise StageError(disk_full_message(where, what)) from err
        raise


def _free(where: Path) -> str:
    path = Path(where)
    while not path.exists() and path != path.parent:
        path = path.parent
    try:
        free = shutil.disk_usage(path).free
    except OSError:
        return "unknown"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if free < 1024 or unit == "GiB":
            return f"{free:.0f} {unit}" if unit == "B" else f"{free:.1f} {unit}"
        free /= 1024
    return "unknown"
