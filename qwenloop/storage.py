"""Durable files: what every writer of checkpoints, adapters and optimizer states shares.

Sits below ``checkpoint``, ``adapter``, ``distributed`` and ``model`` (imports none of them): tensors are
written flushed and fsynced, and read back with ``weights_only=True`` (never arbitrary pickled objects). Text
files that must never be seen half-written are replaced atomically; appended lines are all or nothing. A write
that fails because of the storage (full disk, quota, unwritable directory) is told apart from a bug by
``write_failure``, whatever library raised it.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil

import torch

from . import faults


def save_torch(obj, path: str) -> None:
    """``torch.save`` to ``path``, flushed to disk (fsync) before returning."""
    faults.disk_full(path)
    with writing(path), open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


def load_torch(path: str):
    """``torch.load`` restricted to tensors and plain containers: never arbitrary pickled objects."""
    return torch.load(path, map_location="cpu", weights_only=True)


def write_text(path: str, text: str) -> None:
    """Write ``text`` (UTF-8) and fsync it."""
    faults.disk_full(path)
    with writing(path), open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_bytes(path: str, data: bytes) -> None:
    """Write ``data`` and fsync it. A full disk is an ``OSError`` (ENOSPC) naming ``path``, whatever produced the
    bytes: ``safetensors.torch.save_file`` would report it as a ``SafetensorError`` without the file's name."""
    faults.disk_full(path)
    try:
        with open(path, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as e:
        if e.filename is None:  # a failed write() does not say which file it was writing
            raise OSError(e.errno, e.strerror, path) from e
        raise


def fsync_tree(root: str) -> None:
    """fsync every file and directory under ``root`` (files written by other ranks or libraries too)."""
    for dirpath, _, filenames in os.walk(root):
        for name in filenames:
            fd = os.open(os.path.join(dirpath, name), os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
        fsync_dir(dirpath)


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def strip_wrapper_prefixes(name: str) -> str:
    """Parameter/module name as in the plain model, without FSDP / checkpoint / compile / DDP wrappers (the
    names files are written and read with)."""
    parts = [p for p in name.split(".") if p not in ("_fsdp_wrapped_module", "_checkpoint_wrapped_module", "_orig_mod")]
    if parts and parts[0] == "module":  # DDP
        parts = parts[1:]
    return ".".join(parts)


def write_text_atomic(path: str, text: str) -> None:
    """Replace ``path`` with ``text`` all at once: written beside it, fsynced, renamed over it. A failure (disk
    full) leaves the old file as it was and no temporary file behind."""
    tmp = f"{path}.tmp-{os.getpid()}"
    try:
        write_text(tmp, text)
        os.replace(tmp, path)
    except BaseException:
        _remove_quietly(tmp)
        raise
    fsync_dir(os.path.dirname(os.path.abspath(path)))


def append_line(path: str, line: str) -> None:
    """Append one line (``line`` without its newline) to ``path``, all of it or nothing: a write the disk cannot
    take is cut back off, so the file never ends in half a line that a later reader chokes on."""
    data = (line + "\n").encode("utf-8")
    faults.disk_full(path)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        start = os.fstat(fd).st_size
        try:
            written = 0
            while written < len(data):  # a nearly full disk takes part of a write without an error
                written += os.write(fd, data[written:])
        except OSError:
            os.ftruncate(fd, start)
            raise
    finally:
        os.close(fd)


def sha256_file(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


_DATA_BOOKKEEPING = ("state.json", "dataset_info.json")  # save_to_disk's metadata: not the records


def content_sha256(path: str) -> str:
    """SHA-256 of a data file's bytes, or of a saved dataset directory's data files (names and bytes, in name
    order): the content and the order of the records, whatever their count."""
    if not os.path.isdir(path):
        return sha256_file(path)
    digest = hashlib.sha256()
    for dirpath, dirnames, filenames in os.walk(path):
        dirnames.sort()
        for name in sorted(filenames):
            if name in _DATA_BOOKKEEPING:
                continue
            full = os.path.join(dirpath, name)
            digest.update(os.path.relpath(full, path).encode("utf-8") + b"\0")
            digest.update(sha256_file(full).encode("ascii"))
    return digest.hexdigest()


# What a full, read-only or vanished filesystem looks like in the text of libraries that do not raise OSError:
# safetensors (Rust: "No space left on device (os error 28)"), torch's C++ writer given a path.
_STORAGE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EIO, errno.ENOENT, errno.EACCES,
                   errno.ESTALE)


@contextlib.contextmanager
def writing(path: str):
    """Within: a failure of the storage while ``path`` is written, whichever library reports it and however (an
    ``OSError`` without a file name, torch's ``RuntimeError`` around one, safetensors' ``SafetensorError`` with
    ``os error 28`` in its text), becomes an ``OSError`` naming the file. Anything else passes unchanged."""
    try:
        yield
    except Exception as e:  # noqa: BLE001 - re-raised below, unchanged unless it is the storage's failure
        found = _oserror_in_chain(e)
        if found is not None:
            if found is e and e.filename:
                raise
            raise OSError(found.errno, found.strerror or str(found), found.filename or path) from e
        code = _errno_in_text(str(e))
        if code is not None:
            raise OSError(code, os.strerror(code), path) from e
        raise


def _oserror_in_chain(exc: BaseException) -> OSError | None:
    seen: set[int] = set()
    cause: BaseException | None = exc
    while cause is not None and id(cause) not in seen:
        seen.add(id(cause))
        if isinstance(cause, OSError):
            return cause
        cause = cause.__cause__ or cause.__context__
    return None


def _errno_in_text(text: str) -> int | None:
    for code in _STORAGE_ERRNOS:
        if f"os error {code})" in text or os.strerror(code) in text:
            return code
    return None


def write_failure(exc: BaseException, path: str | None = None) -> str | None:
    """Why a write failed when the storage is at fault (disk full, quota, file-size limit, read-only or unwritable
    directory, I/O error), whichever form the writing library gives it: an ``OSError`` anywhere in the exception's
    chain, an ``os error N`` in its text, or torch's bare "file write failed" (then the free space is said).
    None when ``exc`` is something else: a bug, to be raised with its traceback."""
    found = _oserror_in_chain(exc)
    if found is not None:
        name = found.filename or path
        return f"{found.strerror or found}{': ' + str(name) if name else ''}"
    text = str(exc)
    where = f": {path}" if path else ""
    code = _errno_in_text(text)
    if code is not None:
        return f"{os.strerror(code)}{where}"
    if isinstance(exc, RuntimeError) and any(s in text for s in ("file write failed", "unexpected pos", "iostream error")):
        free = free_bytes(path) if path else None
        room = f"; {free} bytes free there" if free is not None else ""
        return f"the write failed ({text.strip()[:80]}){where}{room}"
    return None


def free_bytes(path: str) -> int | None:
    """Bytes free on the filesystem holding ``path`` (or its nearest existing parent); None if unknown."""
    existing = os.path.abspath(path)
    while not os.path.exists(existing) and os.path.dirname(existing) != existing:
        existing = os.path.dirname(existing)
    try:
        return shutil.disk_usage(existing).free
    except OSError:
        return None


def _remove_quietly(path: str) -> None:
    try:
        os.remove(path)
    except OSError:
        pass
