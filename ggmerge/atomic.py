"""Write-to-temporary-then-rename, so no final path ever holds a half-written file."""
from __future__ import annotations

import contextlib
import errno
import os
import shutil
from pathlib import Path
from typing import Iterator

from .errors import GGMergeError

TMP_SUFFIX = ".ggmerge-partial"


def _explain(exc: OSError, path: Path) -> GGMergeError:
    if exc.errno == errno.ENOSPC:
        return GGMergeError("no space left on device while writing", path=path)
    if exc.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return GGMergeError("output location is not writable", path=path)
    return GGMergeError(f"cannot write: {exc.strerror or exc}", path=path)


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, *, overwrite: bool = True) -> Iterator[Path]:
    """Yield a temporary path beside ``final``; rename it over ``final`` only on success.

    Works for files and for directories (an HF model folder is written whole, then renamed).
    On any exception (including KeyboardInterrupt) the temporary is removed and nothing appears
    at ``final``.
    """
    final = Path(final)
    if final.exists() and not overwrite:
        raise GGMergeError("output already exists (use --force to replace it)", path=final)
    try:
        final.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise _explain(exc, final.parent) from None
    tmp = final.with_name(final.name + TMP_SUFFIX)
    with output_lock(final):
        # the lock is ours: a partial output left here is a dead writer's, safe to clear
        _remove(tmp)
        yield from _write(final, tmp)


def _write(final: Path, tmp: Path) -> Iterator[Path]:
    try:
        yield tmp
        if final.is_dir() and not final.is_symlink():
            old = final.with_name(final.name + ".ggmerge-old")
            _remove(old)
            os.replace(final, old)
            os.replace(tmp, final)
            _remove(old)
        else:
            os.replace(tmp, final)
    except OSError as exc:
        _remove(tmp)
        raise _explain(exc, final) from None
    except BaseException:
        _remove(tmp)
        raise


LOCK_SUFFIX = ".ggmerge-lock"


@contextlib.contextmanager
def output_lock(final: str | os.PathLike) -> Iterator[None]:
    """Hold the lock of output ``final`` (a ``<final>.ggmerge-lock`` file with the holder's pid, locked
    with ``flock``): a second ggmerge writing the same output is refused with a message naming the
    first, instead of deleting its half-written temporary. The kernel drops the lock when its holder
    exits, however it ends, so a lock left by a killed run never blocks the next one."""
    import fcntl

    lock = Path(final).with_name(Path(final).name + LOCK_SUFFIX)
    while True:
        try:
            fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise _explain(exc, lock) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise GGMergeError(f"another ggmerge (pid {holder}) is writing this output; wait for it to "
                               "finish or stop it", path=final) from None
        # the file may have been removed by its previous holder between our open and our lock
        try:
            same = os.fstat(fd).st_ino == os.stat(lock).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield
    finally:
        with contextlib.suppress(OSError):
            os.unlink(lock)
        os.close(fd)


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(OSError):
            p.unlink()
