"""Pretrain a ResNet-50 with a contrastive method: ``python -m pretrain --loss METHOD [options] [key=value ...]``.

    # 1 CPU / 1 GPU (the toy ImageNet by default; its CTBENCH_TOY.json marker selects the toy scale)
    python -m pretrain --loss moco_v2
    python -m pretrain --loss jcl --data /data/imagenet/train optim.lr=0.06 data.num_keys=5
    # 8 GPUs on one machine
    torchrun --standalone --nproc_per_node 8 -m pretrain --loss moco_v2 --data /data/imagenet/train
    # 2 machines x 8 GPUs (run on each machine, NODE_RANK = 0 and 1)
    torchrun --nnodes 2 --node_rank $NODE_RANK --master_addr $HOST --master_port 29500 --nproc_per_node 8 \\
        -m pretrain --loss moco_v2 --data /data/imagenet/train

METHOD: moco_v1, moco_v2, jcl, jcl_official, eqco, simo, co2 (presets in pretrain/presets/, sources in each file).
Config keys are overridden as ``section.key=value`` (``train.batch_size=512``, ``loss.tau=0.1``); ``--print-config``
shows the resolved config. The output directory (default ``$CTBENCH_OUTPUT/pretrain/<name>``) gets
``checkpoint.pth.tar`` (and ``checkpoint_%04d.pth.tar`` every ``train.keep_every`` epochs), ``record.json`` (with
the run's ``protocol``: the recipe and how this run departs from it), ``metrics.jsonl``, ``tb/``, ``log.txt`` and
``config.yaml``; rerunning the same command resumes from the checkpoint there. See pretrain/README.md (a protocol
card per method).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import yaml

from ctbench.config import to_dict
from ctbench.errors import UserError, cli_main
from ctbench.paths import detect_scale, imagenet_root, outputs_root
from pretrain.config import METHODS, config_keys, resolve_config
from pretrain.engine import train


def check_scale(scale: str, data: Path, force: bool, flag: str = "--force-full") -> None:
    """A full-scale config on the embedded toy data is a one-line error unless forced."""
    if scale == "full" and not force and detect_scale(data) == "toy":
        raise UserError(f"full scale on the embedded toy data ({data}): the published recipe (224 px crops, batch 256, "
                        f"200 epochs) on 1,000 toy images takes many GB and hours on a CPU and reproduces nothing; use "
                        f"the toy scale (drop --scale full / scale: full), give real data (--data), or pass {flag}")


def parser() -> argparse.ArgumentParser:
    keys = "\n".join(f"  {section}: {', '.join(names)}" for section, names in config_keys().items())
    p = argparse.ArgumentParser(
        prog="python -m pretrain", formatter_class=argparse.RawDescriptionHelpFormatter,
        description="Contrastive pretraining of ResNet-50 (MoCo v1/v2, JCL, EqCo, SiMo, CO2). Single process, "
                    "or DDP under torchrun (nccl on GPU, gloo on CPU). Resumes automatically from the checkpoint "
                    "in the output directory.",
        epilog=f"config keys (override as section.key=value):\n{keys}\n\n"
               "examples:\n  python -m pretrain --loss jcl\n"
               "  torchrun --standalone --nproc_per_node 8 -m pretrain --loss moco_v2 --data /data/imagenet/train")
    p.add_argument("--method", "--loss", dest="method", required=True, choices=METHODS, metavar="METHOD",
                   help=f"the method, i.e. its preset (loss, head, negatives, recipe): {', '.join(METHODS)}; "
                        "--loss is the same option (the name `make pretrain LOSS=...` uses)")
    p.add_argument("--preset", type=Path, help="extra YAML applied over the method preset (may use _base_)")
    p.add_argument("--scale", choices=("toy", "full"),
                   help="toy: the small CPU setting (64 px crops, short schedule); default: toy when the data "
                        "carries the toy marker, full otherwise")
    p.add_argument("--force-full", action="store_true",
                   help="allow --scale full on the embedded toy data (refused otherwise: the full recipe on 1,000 "
                        "toy images is a mistake, not a reproduction)")
    p.add_argument("--data", type=Path, help="ImageNet-layout train folder DIR/<class>/<image> "
                                             "(default: $DETECTRON2_DATASETS/imagenet/train, the toy ImageNet)")
    p.add_argument("--out", type=Path, help="run directory (default: $CTBENCH_OUTPUT/pretrain/<name>)")
    p.add_argument("--name", help="run name, used in the record and the default --out (default: METHOD)")
    p.add_argument("--fresh", action="store_true", help="ignore a checkpoint in the run directory and start over")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="config overrides, e.g. optim.lr=0.06")
    return p


@cli_main
def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    data = args.data if args.data is not None else imagenet_root() / "train"
    scale = args.scale or detect_scale(data)
    check_scale(scale, data, args.force_full)
    cfg = resolve_config(args.method, scale, args.preset, args.overrides, data_path=data)
    if args.print_config:
        print(yaml.safe_dump(to_dict(cfg), sort_keys=False), end="")
        return 0
    name = args.name or args.method
    out = args.out if args.out is not None else outputs_root() / "pretrain" / name
    train(cfg, out, name, fresh=args.fresh)
    return 0


if __name__ == "__main__":
    sys.exit(main())
