"""Files and folders written whole or not at all, text files read as UTF-8, and the SHA-256
of a file: the one home of each.

Every write goes to a temporary file in the target's own folder, is flushed and fsync-ed,
then moved over the target with ``os.replace`` (and the folder fsync-ed), so a reader, or a
process killed at any moment, sees the old file or the new one, never half of one. The
temporary name starts with a dot and keeps the target's suffix, so libraries that pick a
format from the suffix (PyAV, safetensors) write the right one; it is created with the
process's umask like any other file.

Every text file mmssl reads (manifests, recipes and saved configs, ``.tsv``/``.wrd`` lists,
``checkpoints/latest``, index files) goes through :func:`read_text` or :func:`text_lines`:
bytes that are not UTF-8 are a ``DataError`` naming the file and line, not a traceback.

A folder written whole (``atomic_dir``) is filled under a hidden temporary name beside it and
renamed into place; the folder it replaces is moved aside first and removed only after.

An output folder (``new_folder``) is filled under a temporary name beside it and swapped in
whole when the command succeeds; a folder that already holds anything is replaced only when
the user said so (``--overwrite``), so no command writes into a folder it did not create (a
benchmark once rewrote a user's k-means labels in place, leaving the folder with two
clusterings), and a failed command leaves no half-filled or empty folder behind.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import secrets
import shutil
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, Any

from mmssl.errors import ConfigError, DataError


def fsync_dir(folder: str | os.PathLike) -> None:
    """Make a rename in ``folder`` durable (a no-op where folders cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # some filesystems do not open folders
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _temporary_name(path: Path) -> Path:
    return path.with_name(f".{path.stem}.{os.getpid()}.{secrets.token_hex(4)}.tmp{path.suffix}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[Path]:
    """A temporary path beside ``path`` for a writer that takes a file name; when the block
    ends without an error the file is fsync-ed and moved to ``path``, otherwise removed."""
    path = Path(path)
    tmp = _temporary_name(path)
    try:
        yield tmp
        fd = os.open(tmp, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[IO[Any]], Any], *, text: bool = False) -> Path:
    """Call ``write(file)`` on a temporary file beside ``path`` (binary, or UTF-8 text with
    ``text``), fsync it, then move it to ``path``. Returns ``path``."""
    path = Path(path)
    tmp = _temporary_name(path)
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") if text else os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    fsync_dir(path.parent)
    return path


def write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    """``data`` into ``path``, atomically."""
    return atomic_write(path, lambda f: f.write(data))


def write_text(path: str | os.PathLike, text: str) -> Path:
    """``text`` into ``path`` as UTF-8, atomically."""
    return atomic_write(path, lambda f: f.write(text), text=True)


def sha256_file(path: str | os.PathLike) -> str:
    """The hex SHA-256 of a file's bytes, read in 16 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 24), b""):
            digest.update(chunk)
    return digest.hexdigest()


def _not_utf8(path: str | os.PathLike) -> DataError:
    """The error for a file that is not UTF-8: its first bad byte's line and column."""
    data = Path(path).read_bytes()
    try:
        data.decode("utf-8")
    except UnicodeDecodeError as err:
        line = data.count(b"\n", 0, err.start) + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        return DataError(
            f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}); "
            "save the file as UTF-8"
        )
    return DataError(f"{path}: not UTF-8 text; save the file as UTF-8")


def read_text(path: str | os.PathLike) -> str:
    """A text file's content, read as UTF-8 (universal newlines, as ``open`` reads text)."""
    try:
        with open(path, encoding="utf-8") as f:
            return f.read()
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def text_lines(path: str | os.PathLike) -> Iterator[str]:
    """The lines of a UTF-8 text file one at a time (with their line ends, as iterating a file
    gives them), for files too long to hold whole."""
    try:
        with open(path, encoding="utf-8") as f:
            yield from f
    except UnicodeDecodeError:
        raise _not_utf8(path) from None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:  # another user's process: alive
        return True
    return True


def stale_folders(path: str | os.PathLike) -> list[Path]:
    """The temporary folders ``atomic_dir`` left beside ``path`` when its process was killed
    (the process named in them is gone)."""
    path = Path(path)
    found = []
    for entry in path.parent.glob(f".{path.name}.*.dir-*"):
        pid = entry.name[len(path.name) + 2 :].split(".", 1)[0]
        if entry.is_dir() and pid.isdigit() and not _alive(int(pid)):
            found.append(entry)
    return sorted(found)


def check_replaceable(path: str | os.PathLike, marker: str, option: str = "--out") -> Path:
    """``path`` for ``atomic_dir``: a new folder, an empty one, or one holding ``marker`` (the
    file the same command writes there); any other is a ``ConfigError``, since the folder is
    replaced whole. Leftovers of a killed writer beside it (``stale_folders``) are removed."""
    path = Path(path)
    if path.exists() and (not path.is_dir() or (any(path.iterdir()) and not (path / marker).is_file())):
        raise ConfigError(
            f"{option} {path}: exists and is not a folder this command wrote (no {marker}); it is "
            "replaced whole: choose a new folder"
        )
    for stale in stale_folders(path):
        if stale.name.endswith("dir-new"):
            print(f"note: removing {stale}, left by an interrupted run", file=sys.stderr)
            shutil.rmtree(stale, ignore_errors=True)
    return path


def _holds_anything(path: Path) -> bool:
    if path.is_dir():
        return any(path.iterdir())
    return path.exists()


def check_new_folder(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse (``ConfigError``, naming ``flag``) an output folder that already holds anything,
    unless ``overwrite``; a file in its place is refused always. Call it before long work."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise ConfigError(f"{path} is a file, not an output folder")
    if _holds_anything(path) and not overwrite:
        raise ConfigError(
            f"{path} already exists and is not empty: pass {flag} to replace it, or pick another"
        )
    return path


def check_new_file(path: str | os.PathLike, overwrite: bool, flag: str = "--overwrite") -> Path:
    """Refuse (``ConfigError``, naming ``flag``) an output file that exists and is not empty,
    unless ``overwrite``: a benchmark's ``--out`` must not wipe a user's results."""
    path = Path(path)
    if path.is_dir():
        raise ConfigError(f"{path} is a folder, not an output file")
    if path.exists() and path.stat().st_size > 0 and not overwrite:
        raise ConfigError(f"{path} already exists: pass {flag} to replace it, or pick another file")
    return path


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[Path]:
    """A new, empty temporary folder beside ``path`` to fill; when the block ends without an
    error its files are fsync-ed and it replaces ``path`` whole: the old folder (if any) is moved
    aside, the new one renamed to ``path``, and only then the old one removed. On an error, or a
    kill, ``path`` is as it was (a killed process leaves its temporary folder: ``stale_folders``)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tag = f"{os.getpid()}.{secrets.token_hex(4)}"
    tmp, old = path.with_name(f".{path.name}.{tag}.dir-new"), path.with_name(f".{path.name}.{tag}.dir-old")
    tmp.mkdir()
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file():
                fd = os.open(file, os.O_RDONLY)
                try:
                    os.fsync(fd)
                finally:
                    os.close(fd)
        if path.exists():
            os.replace(path, old)
        os.replace(tmp, path)
    except BaseException:
        if old.exists() and not path.exists():
            os.replace(old, path)
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
    shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def new_folder(path: str | os.PathLike, overwrite: bool = False, flag: str = "--overwrite") -> Iterator[Path]:
    """A temporary folder beside ``path`` to fill; when the block ends without an error it
    replaces ``path`` whole (an existing non-empty ``path`` only with ``overwrite``; its old
    content is removed), otherwise it is removed and ``path`` is left as it was.

    The swap is two renames (old folder aside, new one in): a process killed between them
    leaves the old folder under ``.<name>.*.old`` and no ``path``, never a mix of the two."""
    path = check_new_folder(path, overwrite, flag)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(4)}.tmp")
    tmp.mkdir()
    try:
        yield tmp
        check_new_folder(path, overwrite, flag)  # another process may have filled it meanwhile
        if _holds_anything(path):
            old = tmp.with_suffix(".old")
            os.replace(path, old)
            os.replace(tmp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, path)  # an empty folder in the way is replaced
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    fsync_dir(path.parent)
