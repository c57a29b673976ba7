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
    _remove(tmp)
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


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=True)
    elif p.exists() or p.is_symlink():
        with contextlib.suppress(OSError):
            p.unlink()
