"""Local-disk scratch arrays (features, whitened features) that no other user can reach or plant.

    array = private_memmap(cfg.cluster.memmap_dir, "feats.round3.rank0.f32", (rows, dim))
    array[...] = ...          # an np.memmap; its file is already gone from the folder

Why not a named file in memmap_dir (/tmp by default): a predictable name opened with mode "w+"
follows a symlink another user planted there (and truncates its target), and a file left behind
by a finished or killed run fills the disk. Here the file is created with O_CREAT | O_EXCL in a
fresh folder from tempfile.mkdtemp (mode 0700, random name), mapped, then unlinked together with
the folder before the array is returned: nothing in memmap_dir ever outlives this call. The
mapping keeps the blocks allocated until the last array or tensor viewing it is released (the
kernel frees them then, also after an exception, a preemption or kill -9), so no caller has
anything to clean up. Space in use shows in `df`, not in `du`.

memmap_dir should be a local disk: on NFS an unlinked open file is renamed `.nfsXXXX` until
closed, and the folder then stays (empty, 0700) after the run.
"""
from __future__ import annotations

import contextlib
import tempfile
from pathlib import Path

import numpy as np

PREFIX = "dist_cluster."


def private_memmap(parent: str | Path, name: str, shape: tuple, dtype=np.float32) -> np.ndarray:
    """A zero-filled `shape` array backed by an unlinked file created exclusively under `parent`
    (see the module docstring). Its `filename` attribute, when it has one, is for logs only."""
    nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
    if nbytes == 0:  # mmap cannot map an empty file
        return np.zeros(shape, dtype)
    folder = Path(tempfile.mkdtemp(prefix=PREFIX, dir=parent))  # 0700, a name nobody can predict
    path = folder / name
    try:
        with open(path, "xb+") as f:  # O_CREAT | O_EXCL: fails on anything already there, symlinks included
            try:
                f.truncate(nbytes)  # sparse: blocks are allocated as rows are written
                return np.memmap(f, dtype=dtype, mode="r+", shape=shape)  # the mapping holds its own descriptor
            finally:
                path.unlink()  # only what this call created
    finally:
        with contextlib.suppress(OSError):  # not empty: an NFS .nfsXXXX file (module docstring)
            folder.rmdir()
