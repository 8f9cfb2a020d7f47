"""``python -m ctbench.toydata``: generate the embedded toy datasets (see ``ctbench/toydata/__init__.py``)."""

from __future__ import annotations

import argparse
import sys

from ctbench import paths
from ctbench.errors import cli_main
from ctbench.toydata import DATASETS, generate


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m ctbench.toydata",
        description="Generate the seeded toy ImageNet / COCO 2017 / VOC 2007+2012 in their real layouts under ROOT "
                    "(imagenet/, coco/, VOC2007/, VOC2012/). Up-to-date datasets (same CTBENCH_TOY.json spec) are "
                    "kept; a directory without that marker (real data) is never touched.")
    p.add_argument("--root", default=None,
                   help="dataset root (default: $DETECTRON2_DATASETS, else ./datasets)")
    p.add_argument("--scale", type=float, default=1.0,
                   help="multiply the image counts (default 1: ImageNet 10 classes x 100 train + 20 val, COCO 200 "
                        "train + 50 val, VOC07 150 trainval + 50 test, VOC12 150 trainval)")
    p.add_argument("--only", default=None, help=f"comma-separated subset of {','.join(DATASETS)}")
    p.add_argument("--seed", type=int, default=0, help="generator seed (default 0)")
    p.add_argument("--tiny", action="store_true", help="the tiny spec the tests use (a few images per split)")
    p.add_argument("--force", action="store_true", help="regenerate even when the spec is up to date")
    p.add_argument("--if-missing", action="store_true",
                   help="keep any toy dataset already there, whatever its size (what the make targets use)")
    p.add_argument("--workers", type=int, default=None, help="rendering processes (default: CPU count, max 8)")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    root = args.root if args.root else paths.datasets_root()
    generate(root, scale=args.scale, only=args.only, seed=args.seed, force=args.force, tiny=args.tiny,
             workers=args.workers, log=lambda line: print(line, flush=True), if_missing=args.if_missing)
    return 0


if __name__ == "__main__":
    sys.argv[0] = "python -m ctbench.toydata"  # errors read "python -m ctbench.toydata: error: ..."
    sys.exit(main())
