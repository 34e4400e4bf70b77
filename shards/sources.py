"""Where samples come from: a Source lists Records (cheap, in the main process) and reads their
bytes inside the shard-writing worker.

    source = FmnistSource("train", limit=100)
    for record in source.records(): ...             # Record(key, ref, label, meta)
    with source.open_reader() as reader:            # once per shard: open archives etc. here
        pixels_or_bytes = reader.read(record)       # raises SkipSample(reason) for a bad sample

Sources are picklable (paths and options only) so worker processes rebuild their readers.
Record-stage skips (videos, malformed metadata lines) are counted in `source.skipped`.
"""
from __future__ import annotations

import contextlib
import gzip
import hashlib
import os
import re
import struct
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional, Union

import numpy as np
from PIL import Image

from .images import SkipSample


class BuildError(Exception):
    """Input that cannot be built; the message says what to do."""


@dataclass
class Record:
    key: str  # unique in the output directory; no dots, no '/'
    ref: Any  # what the reader needs: a path, an array, (line, url), ...
    label: Optional[int] = None
    meta: dict = field(default_factory=dict)  # goes into <key>.json


class Source:
    """Base class: the attributes the pipeline and the manifest read."""
    kind = "source"
    default_name = "shards"
    default_shard_size = 1000
    image_ext = "jpg"
    has_labels = False

    def __init__(self, limit: Optional[int] = None):
        if limit is not None and limit < 1:
            raise BuildError(f"--limit must be >= 1, got {limit}")
        self.limit = limit
        self.classes: list[str] = []
        self.skipped: Counter = Counter()

    def records(self) -> Iterator[Record]:
        raise NotImplementedError

    @contextlib.contextmanager
    def open_reader(self):
        yield self  # stateless sources read directly

    def read(self, record: Record) -> Union[bytes, Image.Image]:
        raise NotImplementedError

    def describe(self) -> dict:
        """JSON-native description (stored in the manifest and in each shard's build record)."""
        return {"type": self.kind}


def read_file_bytes(path: Union[str, Path]) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except FileNotFoundError:
        raise SkipSample("missing", str(path)) from None
    except OSError as err:
        raise SkipSample("unreadable", f"{path}: {err}") from None


# ----------------------------------------------------------------------------------------- fmnist
FMNIST_DIR = "/usr/share/datasets/fashion-mnist"
FMNIST_FILES = {"train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
                "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz")}
FMNIST_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                  "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot"]
IDX_UBYTE = 0x08


def read_idx(path: Union[str, Path], ndim: int, limit: Optional[int] = None) -> np.ndarray:
    """A gzipped IDX array of unsigned bytes (the MNIST format); only the first `limit` items are read."""
    with gzip.open(path, "rb") as f:
        zero, dtype, dims = struct.unpack(">HBB", f.read(4))
        if zero != 0 or dtype != IDX_UBYTE or dims != ndim:
            raise BuildError(f"{path}: not a {ndim}-d unsigned-byte IDX file "
                             f"(header {zero:#x} {dtype:#x} {dims})")
        shape = list(struct.unpack(f">{ndim}I", f.read(4 * ndim)))
        if limit is not None:
            shape[0] = min(shape[0], limit)
        count = int(np.prod(shape))
        data = f.read(count)
    if len(data) != count:
        raise BuildError(f"{path}: truncated, {len(data)} of {count} bytes")
    return np.frombuffer(data, dtype=np.uint8).reshape(shape)


class FmnistSource(Source):
    """Fashion-MNIST from the Debian package's gz IDX files; stored as lossless grayscale PNG."""
    kind = "fmnist"
    image_ext = "png"
    has_labels = True

    def __init__(self, split: str, root: Optional[str] = None, limit: Optional[int] = None,
                 keep_classes: Optional[list[int]] = None):
        """keep_classes: only the images of these classes (ids 0-9), labelled 0..len-1 in that order
        (a transfer protocol: pre-train on some classes, evaluate on the others)."""
        super().__init__(limit)
        if split not in FMNIST_FILES:
            raise BuildError(f"split must be one of {sorted(FMNIST_FILES)}, got {split!r}")
        keep = list(range(len(FMNIST_CLASSES))) if keep_classes is None else list(keep_classes)
        if not keep or len(set(keep)) != len(keep) or not all(0 <= c < len(FMNIST_CLASSES) for c in keep):
            raise BuildError(f"--classes: distinct class ids in 0-{len(FMNIST_CLASSES) - 1}, got {keep_classes}")
        self.split, self.root, self.keep = split, str(root or FMNIST_DIR), keep
        suffix = "" if keep_classes is None else "-c" + "".join(map(str, keep))
        self.default_name = f"fmnist-{split}{suffix}"
        self.classes = [FMNIST_CLASSES[c] for c in keep]
        self._check_files()

    def _paths(self) -> tuple[Path, Path]:
        images, labels = FMNIST_FILES[self.split]
        return Path(self.root) / images, Path(self.root) / labels

    def _check_files(self) -> None:
        missing = [str(p) for p in self._paths() if not p.exists()]
        if missing:
            raise BuildError(f"Fashion-MNIST not found: missing {', '.join(missing)}. Install it with "
                             f"`apt-get install dataset-fashion-mnist` (files go to {FMNIST_DIR}), "
                             f"or pass --fmnist-dir DIR holding the gz IDX files.")

    def records(self) -> Iterator[Record]:
        image_path, label_path = self._paths()
        images = read_idx(image_path, 3, self.limit)
        labels = read_idx(label_path, 1, self.limit)
        if len(images) != len(labels):
            raise BuildError(f"{image_path} has {len(images)} images but {label_path} {len(labels)} labels")
        new_label = {c: i for i, c in enumerate(self.keep)}
        for index, (pixels, label) in enumerate(zip(images, labels)):
            if int(label) in new_label:
                key = f"fmnist-{self.split}-{index:08d}"
                yield Record(key, pixels, new_label[int(label)], {"source": f"{image_path.name}#{index}"})

    def read(self, record: Record) -> Image.Image:
        return Image.fromarray(record.ref, mode="L")

    def describe(self) -> dict:
        return {"type": self.kind, "split": self.split, "root": self.root, "classes": self.keep}


# ----------------------------------------------------------------------------------------- folder
FOLDER_IMAGE_EXTS = {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
_UNSAFE_KEY_CHARS = re.compile(r"[^A-Za-z0-9_-]")


def path_to_key(relative_path: str) -> str:
    """`cats/img.001.jpg` -> `cats__img_001`: no '/', no '.', (webdataset cuts the key at the first
    dot of the basename), readable, stable across runs. Collisions are resolved by `unique_keys`."""
    parts = Path(relative_path).parts
    stem = parts[-1].rsplit(".", 1)[0] if "." in parts[-1] else parts[-1]
    return "__".join(_UNSAFE_KEY_CHARS.sub("_", p) for p in (*parts[:-1], stem))


def unique_keys(relative_paths: list[str]) -> list[str]:
    """path_to_key, plus a short hash of the path for every key that several paths map to."""
    keys = [path_to_key(p) for p in relative_paths]
    counts = Counter(keys)
    keys = [k if counts[k] == 1 else f"{k}-{hashlib.sha1(p.encode()).hexdigest()[:10]}"
            for k, p in zip(keys, relative_paths)]
    if len(set(keys)) != len(keys):
        raise BuildError("could not derive unique keys from the file names")
    return keys


def list_images(root: Path) -> list[str]:
    """Relative paths of image files under root, sorted; hidden files and folders are ignored."""
    found = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        for name in sorted(files):
            if not name.startswith(".") and Path(name).suffix.lower() in FOLDER_IMAGE_EXTS:
                found.append(os.path.relpath(os.path.join(folder, name), root))
    return found


class FolderSource(Source):
    """An image tree; with labels, the class is the first folder level (sorted names -> ids)."""
    kind = "folder"

    def __init__(self, root: str, labels: bool = False, limit: Optional[int] = None):
        super().__init__(limit)
        self.root, self.labels = str(Path(root).resolve()), labels
        if not Path(self.root).is_dir():
            raise BuildError(f"{root} is not a directory")
        self.has_labels = labels
        self.default_name = _UNSAFE_KEY_CHARS.sub("_", Path(self.root).name) or "folder"
        self.paths = list_images(Path(self.root))  # listed once: classes and image_ext depend on it
        if not self.paths:
            raise BuildError(f"no image files ({', '.join(sorted(FOLDER_IMAGE_EXTS))}) under {root}")
        if labels:
            self.classes = sorted({Path(p).parts[0] for p in self.paths if len(Path(p).parts) > 1})
        suffixes = Counter(Path(p).suffix.lower() for p in self.paths)
        # keep the majority format byte for byte; a PNG tree stays lossless
        self.image_ext = "png" if suffixes[".png"] > len(self.paths) / 2 else "jpg"

    def records(self) -> Iterator[Record]:
        keys = unique_keys(self.paths)  # from every path, so --limit does not change the keys
        pairs = list(zip(self.paths, keys))[:self.limit]
        class_ids = {name: i for i, name in enumerate(self.classes)}
        for relative, key in pairs:
            label = None
            if self.labels:
                parts = Path(relative).parts
                if len(parts) < 2:
                    self.skipped["no_label"] += 1  # a file beside the class folders
                    continue
                label = class_ids[parts[0]]
            yield Record(key, relative, label, {"source": relative})

    def read(self, record: Record) -> bytes:
        return read_file_bytes(Path(self.root) / record.ref)

    def describe(self) -> dict:
        return {"type": self.kind, "root": self.root, "labels": self.labels}

    def __getstate__(self):
        state = dict(self.__dict__)
        state["paths"] = []  # workers get their paths through the records
        return state
