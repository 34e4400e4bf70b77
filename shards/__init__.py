"""Shard builders: image sources -> WebDataset tars + manifest.json (see shards/build.py)."""
from .images import ImageSettings, SkipSample, prepare_image
from .pipeline import BuildReport, build
from .sources import (FMNIST_CLASSES, BuildError, FmnistSource, FolderSource, Record, Source,
                      path_to_key, read_idx, unique_keys)
from .writer import count_tar_samples, shard_file_name, write_shard
from .yfcc import YfccColumns, YfccSource, urllib_fetch, zip_location

__all__ = ["ImageSettings", "SkipSample", "prepare_image", "BuildReport", "build", "FMNIST_CLASSES",
           "BuildError", "FmnistSource", "FolderSource", "Record", "Source", "path_to_key", "read_idx",
           "unique_keys", "count_tar_samples", "shard_file_name", "write_shard", "YfccColumns",
           "YfccSource", "urllib_fetch", "zip_location"]
