"""Writing files without losing or corrupting anything: checks before work starts, atomic
replacement, and file-system errors in the user's words.

Every file gradfuse writes for a user (checkpoints, artifacts, plots, outputs) goes through
:func:`atomic_file` or :func:`atomic_dir`: the content is written next to its destination under
a temporary name, flushed to disk and renamed into place, so the destination holds the old
content or the new, never a part; on any failure (a full disk included) the temporary is
removed and the error says ``<what> <path>: <why>``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import shutil
import tempfile
from collections.abc import Iterator

from gradfuse.errors import GradfuseError


class FileError(GradfuseError):
    """A file or directory that cannot be read or written: ``<what> <path>: <why>``."""

    def __init__(self, what: str, path: str, why: str):
        self.what, self.path, self.why = what, path, why
        super().__init__(f"{what} {path}: {why}")


def why(e: OSError) -> str:
    """An OSError's reason in words, with the fix where one is obvious."""
    reason = e.strerror or str(e)
    if e.errno is None and "requested and" in reason:  # numpy's short write: "4490 requested and 2016 written"
        e, reason = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)), os.strerror(errno.ENOSPC)
    if e.errno == errno.ENOSPC:
        return f"{reason} (free some space or write elsewhere)"
    if e.errno == errno.EROFS:
        return f"{reason} (write it somewhere writable)"
    if e.errno in (errno.EACCES, errno.EPERM):
        return f"{reason} (no write permission there)"
    return reason


def _existing_ancestor(path: str) -> str:
    folder = os.path.dirname(os.path.abspath(path))
    while not os.path.exists(folder):
        folder = os.path.dirname(folder)
    return folder


def check_writable(path: str, what: str, directory: bool = False) -> None:
    """Refuse, before any work, a destination that cannot be written: an existing path of the
    wrong kind, a parent that is a file, or a folder where creating a file fails (permissions,
    a read-only file system; tried for real, as root ignores permission bits)."""
    if directory and os.path.isfile(path):
        raise FileError(what, path, "is a file, not a directory")
    if not directory and os.path.isdir(path):
        raise FileError(what, path, "is a directory; give a file name")
    folder = _existing_ancestor(path)
    if not os.path.isdir(folder):
        raise FileError(what, path, f"{folder} is a file, not a directory")
    try:
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".gradfuse-probe-"):
            pass
    except OSError as e:
        raise FileError(what, path, f"cannot create files in {folder}: {why(e)}") from None


def _make_parent(path: str, what: str) -> str:
    parent = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(parent, exist_ok=True)
    except OSError as e:
        raise FileError(what, path, f"cannot create {parent}: {why(e)}") from None
    return parent


@contextlib.contextmanager
def atomic_file(path: str, what: str, mode: str = "wb") -> Iterator:
    """``with atomic_file(path, "checkpoint") as f: f.write(...)``: the file appears whole at
    ``path`` when the block ends, or not at all."""
    parent = _make_parent(path, what)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise FileError(what, path, why(e)) from None
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # as open() would make it, not mkstemp's 0600
        with os.fdopen(fd, mode, encoding=None if "b" in mode else "utf-8") as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        _remove(tmp)
        raise FileError(what, path, why(e)) from None
    except BaseException:
        _remove(tmp)
        raise


@contextlib.contextmanager
def atomic_dir(path: str, what: str, replaceable) -> Iterator[str]:
    """``with atomic_dir(path, "artifact", is_artifact) as tmp:`` fill the folder ``tmp``; it
    then replaces ``path`` (an existing ``path`` only where ``replaceable(path)``): at every
    moment ``path`` is the old folder, the new one, or (between two renames) absent."""
    parent = _make_parent(path, what)
    if os.path.exists(path) and not (os.path.isdir(path) and (not os.listdir(path) or replaceable(path))):
        raise FileError(what, path, "exists and is not one; refusing to replace it (choose another name)")
    try:
        tmp = tempfile.mkdtemp(dir=parent, prefix=f".{os.path.basename(path)}.", suffix=".tmp")
    except OSError as e:
        raise FileError(what, path, why(e)) from None
    old = f"{tmp}.old"
    try:
        os.chmod(tmp, 0o777 & ~_umask())
        yield tmp
        if os.path.exists(path):
            os.rename(path, old)
        os.rename(tmp, path)
    except OSError as e:
        if os.path.exists(old) and not os.path.exists(path):
            os.rename(old, path)  # put the old one back
        raise FileError(what, path, why(e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        shutil.rmtree(old, ignore_errors=True)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove(path: str) -> None:
    with contextlib.suppress(OSError):
        os.remove(path)


CACHE = "the compile cache (move it with GRADFUSE_CACHE)"  # what a cache write that fails is called


def rescue_path(name: str) -> str:
    """Where a trained model goes when its destination cannot be written: the system's temporary
    folder (another file system than the destination, most likely)."""
    return os.path.join(tempfile.gettempdir(), f"gradfuse-rescued-{name}-{os.getpid()}.npz")


def read_error(what: str, path: str, e: Exception) -> FileError:
    """A read failure (missing file, not a zip, truncated, not an array) in words."""
    if isinstance(e, FileNotFoundError):
        return FileError(what, path, "no such file")
    if isinstance(e, IsADirectoryError):
        return FileError(what, path, "is a directory, not a file")
    if isinstance(e, OSError):
        return FileError(what, path, why(e))
    if isinstance(e, ValueError) and "pickled" in str(e):  # numpy's guess for bytes it does not recognise
        return FileError(what, path, "not a numpy .npy or .npz file (unrecognised content)")
    if isinstance(e, EOFError) or (isinstance(e, ValueError) and not str(e)):
        return FileError(what, path, "empty or truncated")
    return FileError(what, path, f"cannot read it ({type(e).__name__}: {e})")
