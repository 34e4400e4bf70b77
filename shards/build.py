"""Build WebDataset shards + DIR/manifest.json from Fashion-MNIST, an image tree, or YFCC100M.

    python shards/build.py fmnist --split train --out data/fmnist/train
    python shards/build.py fmnist --split test --out data/fmnist/test --limit 500
    python shards/build.py fmnist --split train --classes 0,2,4,6,8 --out data/fmnist-c02468/train
    python shards/build.py folder /data/imagenet/train --labels --out data/inet --workers 8 --max-side 256
    python shards/build.py yfcc yfcc100m_dataset.bz2 --images /data/yfcc --layout zip --out data/yfcc --workers 32
    python shards/build.py yfcc meta.tsv --layout url --out data/yfcc_url --fetcher mypkg.fetch:get

Writes DIR/<name>-000000.tar ... (members <key>.jpg|png, <key>.cls when labelled, <key>.json) and
DIR/manifest.json. Re-running the same command reuses complete shards. Ends with one line:
`written N, skipped {...}, shards S, T s`.
"""
from __future__ import annotations

import argparse
import importlib
import functools
import sys
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make the repository root importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shards.images import IMAGE_EXTS, ImageSettings  # noqa: E402
from shards.pipeline import build  # noqa: E402
from shards.sources import BuildError, FmnistSource, FolderSource  # noqa: E402
from shards.fetch import DEFAULT_MAX_BYTES  # noqa: E402
from shards.yfcc import LAYOUTS, YfccColumns, YfccSource, urllib_fetch  # noqa: E402


def _common_options() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--out", required=True, help="output directory (created)")
    common.add_argument("--name", help="shard name prefix (default per source, e.g. fmnist-train)")
    common.add_argument("--shard-size", type=int, help="samples per shard (default 1000; yfcc 10000)")
    common.add_argument("--max-side", type=int, help="shrink so the longest side is at most this (aspect kept)")
    common.add_argument("--min-side", type=int, help="skip images whose shorter side is below this (too_small)")
    common.add_argument("--reencode", choices=IMAGE_EXTS,
                        help="store every image re-encoded in this format (default: keep bytes when possible)")
    common.add_argument("--jpeg-quality", type=int, default=90)
    common.add_argument("--workers", type=int, default=1, help="writer processes, each writing whole shards")
    common.add_argument("--limit", type=int, help="only the first N samples (metadata lines for yfcc)")
    return common


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="source", required=True)
    common = _common_options()

    fmnist = sub.add_parser("fmnist", parents=[common], help="Fashion-MNIST (apt-get install dataset-fashion-mnist)")
    fmnist.add_argument("--split", choices=("train", "test"), required=True)
    fmnist.add_argument("--fmnist-dir", help="folder of the gz IDX files (default /usr/share/datasets/fashion-mnist)")
    fmnist.add_argument("--classes", type=lambda text: [int(c) for c in text.split(",")],
                        help="only these class ids (e.g. 0,1,2,3,4), relabelled 0..n-1 in that order")

    folder = sub.add_parser("folder", parents=[common], help="an image tree")
    folder.add_argument("src", help="root folder")
    folder.add_argument("--labels", action="store_true", help="class = first folder level")

    yfcc = sub.add_parser("yfcc", parents=[common], help="YFCC100M metadata + images")
    yfcc.add_argument("metadata", help="yfcc100m_dataset file (tab-separated; .bz2/.gz read directly)")
    yfcc.add_argument("--images", help="image root for --layout tree|zip")
    yfcc.add_argument("--layout", choices=LAYOUTS, default="tree")
    defaults = YfccColumns()
    for column in ("line", "photo_id", "url", "marker"):
        yfcc.add_argument(f"--col-{column.replace('_', '-')}", type=int, default=getattr(defaults, column),
                          help=f"0-based metadata column of the {column} (default %(default)s)")
    yfcc.add_argument("--fetcher", help="module:function called as fetch(url) -> bytes (layout url), instead of "
                                        "the built-in one (then --fetch-timeout/--max-bytes/--fetch-retries are "
                                        "its own business); only ever read from this command line")
    yfcc.add_argument("--fetch-timeout", type=float, default=10.0,
                      help="seconds per URL in all: connection, redirects, body, retries (default %(default)s)")
    yfcc.add_argument("--fetch-retries", type=int, default=3)
    yfcc.add_argument("--max-bytes", type=int, default=DEFAULT_MAX_BYTES,
                      help="larger responses are aborted, counted as fetch_error (default %(default)s)")
    yfcc.add_argument("--fetch-workers", type=int, default=8,
                      help="URLs fetched at once by each --workers process (default %(default)s)")
    return parser.parse_args(argv)


def load_fetcher(spec: str):
    module_name, _, attribute = spec.partition(":")
    if not attribute:
        raise BuildError(f"--fetcher must be module:function, got {spec!r}")
    try:
        return getattr(importlib.import_module(module_name), attribute)
    except (ImportError, AttributeError) as err:
        raise BuildError(f"--fetcher {spec}: {err}") from None


def url_fetcher(args: argparse.Namespace, fetcher: str | None):
    """The fetch function of a url build: `fetcher` (module:function, from a command line) or the
    built-in urllib_fetch with the command's limits. Options saved before --max-bytes get its default."""
    if fetcher:
        return load_fetcher(fetcher)
    return functools.partial(urllib_fetch, timeout=args.fetch_timeout, retries=args.fetch_retries,
                             max_bytes=getattr(args, "max_bytes", DEFAULT_MAX_BYTES))


def make_source(args: argparse.Namespace):
    if args.source == "fmnist":
        return FmnistSource(args.split, root=args.fmnist_dir, limit=args.limit, keep_classes=args.classes)
    if args.source == "folder":
        return FolderSource(args.src, labels=args.labels, limit=args.limit)
    columns = YfccColumns(args.col_line, args.col_photo_id, args.col_url, args.col_marker)
    return YfccSource(args.metadata, images=args.images, layout=args.layout, columns=columns,
                      fetch=url_fetcher(args, args.fetcher), limit=args.limit, fetch_workers=args.fetch_workers)


def main(argv=None) -> int:
    args = parse_args(argv)
    try:
        source = make_source(args)
        settings = ImageSettings(image_ext=args.reencode or source.image_ext, reencode=bool(args.reencode),
                                 max_side=args.max_side, min_side=args.min_side, jpeg_quality=args.jpeg_quality)
        report = build(source, args.out, name=args.name, shard_size=args.shard_size, settings=settings,
                       workers=args.workers)
    except (BuildError, ValueError) as err:
        sys.exit(f"error: {err}")
    if report.stale:
        print(f"warning: {len(report.stale)} shard files in {args.out} are not in the manifest "
              f"(left by an earlier build with other settings): {report.stale[:3]} ...", file=sys.stderr)
    if report.empty:
        print(f"note: {report.empty} shards had every sample skipped and are left out of the manifest",
              file=sys.stderr)
    print(report.summary())
    if report.manifest.num_samples == 0:
        sys.exit("error: no sample was written")
    return 0


if __name__ == "__main__":
    main()
