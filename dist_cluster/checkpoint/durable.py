"""Durable checkpoint files: each written once, whole, with its checksum, or not at all.

    digest = write_checked(obj, path)    # path.tmp -> fsync -> rename -> fsync of the folder; then path.sha256
    why_not = verify(path)               # None when path matches path.sha256

Why here and not in checkpoint/store.py: these are the file-level steps, free of any collective, so the
background writer (checkpoint/writer.py) may run them while the training thread goes on; checkpoint/store.py
decides which files make a step and when a step is published.
"""
from __future__ import annotations

import errno
import hashlib
import os
import shutil
from pathlib import Path
from typing import Callable, Optional

import torch

CHUNK = 8 << 20  # bytes read at a time when checking a file


class CheckpointWriteError(RuntimeError):
    """A checkpoint file could not be written; nothing partial was left behind."""


def checksum_file(path: Path) -> Path:
    return path.with_name(path.name + ".sha256")


class _HashingWriter:
    """What torch.save writes to: the file, hashed on the way. torch turns an exception raised in
    write() into an 'unexpected pos' RuntimeError, so the original one is kept here for the message."""

    def __init__(self, f):
        self.f, self.sha, self.nbytes, self.error = f, hashlib.sha256(), 0, None

    def write(self, data) -> int:
        try:
            n = self.f.write(data)
        except BaseException as err:
            self.error = err
            raise
        self.sha.update(data)
        self.nbytes += n
        return n

    def flush(self) -> None:
        self.f.flush()


def fsync_dir(folder: Path) -> None:
    """Make renames and deletions in `folder` durable (POSIX: fsync of the directory itself)."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    except OSError as err:  # some filesystems cannot sync a directory; the rename is atomic anyway
        if err.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


def tensor_bytes(obj) -> int:
    """About what torch.save of obj needs: its tensors (the pickle around them is small)."""
    if isinstance(obj, torch.Tensor):
        return obj.numel() * obj.element_size()
    if isinstance(obj, dict):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def write_error(path: Path, err: BaseException, need: int) -> CheckpointWriteError:
    if isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT):
        free = shutil.disk_usage(path.parent).free
        return CheckpointWriteError(
            f"checkpoint not saved: no space left in {path.parent} for {path.name} (about "
            f"{need / 2**20:.2f} MiB needed, {free / 2**20:.2f} MiB free; {err.strerror}). No partial file "
            "was left and the previous checkpoint is intact: free space (or move run_dir) and run the "
            "same command again to resume.")
    return CheckpointWriteError(f"checkpoint not saved: writing {path} failed: {err!r}. No partial file was left.")


def _replace_durably(path: Path, write: Callable) -> None:
    """write(f) into path.tmp, fsync, rename over path, fsync the folder; on any error remove the tmp."""
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def write_checksum(path: Path, digest: str) -> None:
    line = f"{digest}  {path.name}\n".encode()
    _replace_durably(checksum_file(path), lambda f: f.write(line))


def write_checked(obj, path: Path) -> str:
    """torch.save(obj) to path, then its checksum file; returns the sha256 hex digest."""
    writer = None

    def save_to(f):
        nonlocal writer
        writer = _HashingWriter(f)
        torch.save(obj, writer)

    try:
        if checksum_file(path).exists():  # the same step again: unfinished until its new checksum
            checksum_file(path).unlink()
            fsync_dir(path.parent)
        _replace_durably(path, save_to)
        write_checksum(path, writer.sha.hexdigest())
    except Exception as err:  # noqa: BLE001 - one clear error instead of torch's
        cause = writer.error if writer is not None and writer.error is not None else err
        raise write_error(path, cause, max(tensor_bytes(obj), writer.nbytes if writer else 0)) from None
    return writer.sha.hexdigest()


def link_atomically(target: Path, name: Path, symlink: bool) -> None:
    """name -> target, atomically: a relative symlink (symlink=True) or a hard link, else (a
    filesystem without them) a copy. Either way `name` reads as the target's bytes."""
    tmp = name.with_name(name.name + ".tmp")
    tmp.unlink(missing_ok=True)
    try:
        try:
            os.symlink(target.name, tmp) if symlink else os.link(target, tmp)
        except OSError:
            shutil.copyfile(target, tmp)
        os.replace(tmp, name)
        fsync_dir(name.parent)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def sha256_of(path: Path) -> str:
    sha = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            sha.update(chunk)
    return sha.hexdigest()


def verify(path: Path) -> Optional[str]:
    """None when path matches its checksum file, else why not (for the messages)."""
    if not path.exists():
        return "missing"
    if not checksum_file(path).exists():
        return f"no {checksum_file(path).name} (its save did not finish)"
    size = path.stat().st_size
    if size == 0:
        return "empty (0 bytes)"
    if [sha256_of(path)] != checksum_file(path).read_text().split()[:1]:
        return f"checksum mismatch ({size} bytes: truncated or overwritten)"
    return None
