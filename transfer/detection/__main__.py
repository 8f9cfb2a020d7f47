"""``python -m transfer.detection``: see the package docstring (``python -m transfer.detection --help``)."""

from __future__ import annotations

import argparse
import logging
import os
import sys
from pathlib import Path

import torch
from detectron2.engine import default_argument_parser, launch

from ctbench.errors import UserError, cli_main
from ctbench.paths import datasets_root, outputs_root
from ctbench.records import RECORD_NAME, TOY_MARKER
from transfer import tasks
from transfer.detection import WORKER_WARNINGS, data
from transfer.detection import config as C
from transfer.detection.evaluation import COCO_IMPLS
from transfer.detection.train import RunSpec, previous_trials, run
from transfer.detection.weights import convert_into, resolve

# How a UserError raised in a worker started by detectron2's launch reaches the launcher: torch.multiprocessing
# passes the worker's traceback as text, ending "ctbench.errors.UserError: <message>".
_WORKER_USER_ERROR = "ctbench.errors.UserError: "

TOY_EVAL_IMAGES = 16

EPILOG = """
examples:
  python -m transfer.detection --task voc_det --weights outputs/pretrain/moco_v2/checkpoint.pth.tar --trials 5
  python -m transfer.detection --task coco_mask --weights model_d2.pkl --num-gpus 8
  python -m transfer.detection --task coco_kp --weights random SOLVER.MAX_ITER 1000
  python -m transfer.detection --task coco_mask --eval-only --weights outputs/transfer/coco_mask/moco_v2/model_final.pth
  python -m transfer.detection --task voc_seg --weights model_d2.pkl --trials 5     # VOC semantic segmentation, mIoU

Trailing KEY VALUE pairs override the detectron2 config (MODEL.WEIGHTS X is the same as --weights X).
One process keeps MoCo's batch of 16 (BN over the 16 images); --linear-scaling scales batch/lr/iterations from MoCo's
8 workers instead (batch 2 on one process). Records: $CTBENCH_OUTPUT/transfer/<task>/<run>/record.json, with the
run's protocol (recipe and deviations).
"""


def build_parser() -> argparse.ArgumentParser:
    ap = default_argument_parser(epilog=EPILOG)
    ap.prog = "python -m transfer.detection"
    ap.description = ("Fine-tune and evaluate a pretrained ResNet-50 on a detectron2 detection or semantic "
                      "segmentation task (MoCo's transfer protocol) and write a run record with every AP / IoU "
                      "metric.")
    ap.add_argument("--task", metavar="TASK",  # checked in prepare(): one line for a wrong name, not argparse's two
                    help=f"one of {', '.join(tasks.TASKS)} (transfer/configs/<task>.yaml); "
                         "or give --config-file instead")
    ap.add_argument("--weights", default=None,
                    help="a detectron2 .pkl (or a Caffe2 ImageNet .pkl such as MSRA R-50.pkl), a pretraining "
                         "checkpoint (ours, MoCo/JCL, torchvision: converted), a detectron2 model_final.pth, a "
                         "detectron2:// URL, or 'random' (default: the task config's MODEL.WEIGHTS if it sets one, "
                         "else the newest pretraining checkpoint)")
    ap.add_argument("--trials", type=int, default=1, help="run seeds SEED..SEED+T-1 and record mean and std")
    ap.add_argument("--seed", type=int, default=0, help="seed of the first trial (default 0)")
    scale = ap.add_mutually_exclusive_group()
    scale.add_argument("--toy", action="store_true", help="apply transfer/configs/toy.yaml (toy_seg.yaml for "
                                                          "segmentation; default on toy data)")
    scale.add_argument("--full", action="store_true", help="never apply the toy override")
    ap.add_argument("--out", default=None, help="output directory (default $CTBENCH_OUTPUT/transfer/<task>/<run>)")
    ap.add_argument("--name", default=None, help="run name (default: the pretraining run's, 'random', 'supervised')")
    ap.add_argument("--data-root", default=None, help="datasets root (default $DETECTRON2_DATASETS or ./datasets)")
    ap.add_argument("--eval-images", type=int, default=None,
                    help=f"evaluate on the first N test images only (default: {TOY_EVAL_IMAGES} on toy runs, "
                         "else all)")
    ap.add_argument("--coco-eval", choices=COCO_IMPLS, default="faster",
                    help="COCO AP implementation: faster-coco-eval (default; same numbers, faster) or pycocotools")
    ap.add_argument("--save-model", action=argparse.BooleanOptionalAction, default=None,
                    help="write model_final.pth (default: yes, except on toy runs)")
    ap.add_argument("--fresh", action="store_true",
                    help="replace the results of an earlier run in the output directory (default: keep its trials "
                         "when the config is the same, refuse otherwise)")
    ap.add_argument("--linear-scaling", action="store_true",
                    help="keep MoCo's 2 images per process and scale batch, lr, iterations, steps and warm-up "
                         "linearly from its 8 GPUs (one process: batch 16 -> 2, lr 0.02 -> 0.0025, VOC 24k -> 192k; "
                         "BN over 2 images). Default: MoCo's batch of 16, lr and schedule on any number of processes")
    return ap


def _is_toy(names: list[str], root: Path) -> bool:
    dirs = [data.dataset_dir(n, root) for n in names]
    return bool(dirs) and all((d / TOY_MARKER).is_file() for d in dirs)


def prepare(argv: list[str] | None = None) -> tuple[RunSpec, argparse.Namespace]:
    """Parse, check and resolve everything (weights, conversion, config) before any process starts."""
    args = build_parser().parse_args(argv)
    if args.trials < 1:
        raise UserError(f"--trials must be >= 1, got {args.trials}")
    if args.eval_only and args.trials != 1:
        raise UserError("--eval-only evaluates given weights once; drop --trials")
    world = args.num_gpus * args.num_machines
    if args.num_gpus < 1:
        raise UserError(f"--num-gpus must be >= 1, got {args.num_gpus}")
    if torch.cuda.is_available() and args.num_gpus > torch.cuda.device_count():
        raise UserError(f"--num-gpus {args.num_gpus} but this machine has {torch.cuda.device_count()} GPUs")
    if args.config_file:
        config, task = Path(args.config_file), args.task or Path(args.config_file).stem
        if not config.is_file():
            raise UserError(f"config file not found: {config}")
    elif args.task:
        config, task = C.config_file(args.task), args.task
    else:
        raise UserError(f"give --task ({', '.join(tasks.TASKS)}) or --config-file")

    pairs = C.split_opts(args.opts or [])
    user_keys = {k for k, _ in pairs}
    spec_weights = args.weights
    if "MODEL.WEIGHTS" in user_keys:
        given = dict(pairs)["MODEL.WEIGHTS"]
        if spec_weights is not None and spec_weights != given:
            raise UserError("give the weights once: --weights or MODEL.WEIGHTS, not both")
        spec_weights = given or "random"
        pairs = [(k, v) for k, v in pairs if k != "MODEL.WEIGHTS"]
    opts = [x for kv in pairs for x in kv]

    data_root = Path(args.data_root).expanduser() if args.data_root else datasets_root()
    probe = C.load_config(config, toy=False, opts=opts)
    names = list(probe.DATASETS.TRAIN) + list(probe.DATASETS.TEST)
    toy = args.toy or (not args.full and _is_toy(names, data_root))
    written = C.load_config(config, toy=toy, opts=[])  # what the overrides override
    cfg = C.load_config(config, toy=toy, opts=opts)
    data.register(names, data_root)  # checks the files now, with a one-line error
    notes = [f"task {task}: {config}" + (" + toy.yaml (embedded toy data)" if toy else "")]
    overridden = C.override_deviations(written, cfg, [k for k, _ in pairs])  # before adapt() changes cfg
    offer_scaling = not args.linear_scaling and C.can_scale_linearly(cfg, world, user_keys)
    adapted = C.adapt(cfg, world, user_keys, linear_scaling=args.linear_scaling)
    notes += adapted.notes
    eval_images = args.eval_images if args.eval_images is not None else (TOY_EVAL_IMAGES if toy else 0)
    deviations = ((["toy scale"] if toy else []) + overridden + adapted.deviations  # in the order they apply
                  + ([f"eval on the first {eval_images} test images"] if eval_images else [])
                  + (["eval only"] if args.eval_only else []))
    if task in tasks.TASK_INFO and config.resolve() == C.config_file(task).resolve():
        recipe, schedule = tasks.TASK_INFO[task].recipe, tasks.TASK_INFO[task].schedule
    else:
        recipe, schedule = f"custom detectron2 config {config.name}", f"{C.iters(written.SOLVER.MAX_ITER)} iters"

    if spec_weights is None and probe.MODEL.WEIGHTS:
        spec_weights = probe.MODEL.WEIGHTS  # the task's own default (voc_det_supervised_msra: MSRA R-50.pkl)
    weights = resolve(spec_weights, log=print)
    _check_input_format(weights.kind, cfg.INPUT.FORMAT, task)
    if args.name:
        weights.name = args.name
    out = Path(args.out) if args.out else outputs_root() / "transfer" / task / (
        weights.name + ("-eval" if args.eval_only else ""))
    weights = convert_into(weights, out, log=print)
    if args.eval_only and weights.kind == "random":
        raise UserError("--eval-only needs trained weights (--weights .../model_final.pth)")
    cfg.MODEL.WEIGHTS = weights.path
    notes.append(f"weights: {weights.path or 'random init'} (run name {weights.name})")
    cfg.freeze()
    save_model = args.save_model if args.save_model is not None else not toy
    spec = RunSpec(task=task, cfg=cfg, weights=weights, out=out, data_root=data_root, toy=toy, trials=args.trials,
                   seed=args.seed, eval_only=args.eval_only, resume=args.resume, eval_images=eval_images,
                   coco_impl=args.coco_eval, save_model=save_model, notes=notes, recipe=recipe, schedule=schedule,
                   deviations=deviations, oom_message=C.oom_message(cfg, world, offer_scaling))
    spec.done = previous_trials(spec, fresh=args.fresh)
    return spec, args


def _check_input_format(kind: str, fmt: str, task: str) -> None:
    """Caffe2 (MSRA) weights need the BGR/caffe config, converted torchvision-layout weights the RGB one."""
    if kind == "caffe2" and fmt != "BGR":
        raise UserError(f"Caffe2 ImageNet weights (such as MSRA R-50.pkl) expect BGR input with the caffe mean/std, "
                        f"but task {task} is configured for {fmt}: use --task voc_det_supervised_msra")
    if kind == "converted" and fmt != "RGB":
        raise UserError(f"weights converted from a torchvision-layout checkpoint expect RGB input with the ImageNet "
                        f"mean/std, but task {task} is configured for {fmt} (MSRA/caffe): use a MoCo-protocol task "
                        "such as voc_det")


@cli_main
def main(argv: list[str] | None = None) -> int:
    spec, args = prepare(argv)
    if spec.done and set(range(spec.trials)) <= set(spec.done) and (spec.out / RECORD_NAME).is_file():
        print(f"{spec.out}: already finished with this config ({len(spec.done)} trial(s)); nothing to do "
              "(--trials N to add trials, --fresh to redo)", flush=True)
        return 0
    if args.num_gpus * args.num_machines > 1:
        given = os.environ.get("PYTHONWARNINGS")
        os.environ["PYTHONWARNINGS"] = ",".join(([given] if given else []) + list(WORKER_WARNINGS))
        # its "Terminating process N via signal SIGTERM" when a worker died: the one-line error below says so
        logging.getLogger("torch.multiprocessing.spawn").setLevel(logging.ERROR)
    try:
        launch(run, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
               dist_url=args.dist_url, args=(spec,))
    except torch.multiprocessing.ProcessRaisedException as e:
        raise worker_user_error(e) or e from None
    except torch.multiprocessing.ProcessExitedException as e:  # a worker killed (OOM-kill, kill -9, a lost node)
        raise UserError(killed_rank_message(e, spec)) from None
    return 0


def killed_rank_message(e: BaseException, spec: RunSpec) -> str:
    """One line for a worker that died without raising: detectron2's launcher has no elastic agent, it stops the
    other workers (SIGTERM, no checkpoint) and the run ends; ``--resume`` continues from the last periodic one."""
    period = spec.cfg.SOLVER.CHECKPOINT_PERIOD
    where = (f"rerun the same command with --resume to continue each unfinished trial from its last checkpoint "
             f"(<trial dir>/last_checkpoint, written every SOLVER.CHECKPOINT_PERIOD = {period} iterations)")
    if not spec.save_model:
        where = "this run writes no checkpoints (pass --save-model to have --resume continue a killed run); rerun it"
    return f"{e} and detectron2's launcher stopped the other workers; {where}"


def worker_user_error(e: BaseException) -> UserError | None:
    """The UserError a worker process raised (its one line), if that is what ended it."""
    text = str(e)
    if _WORKER_USER_ERROR not in text:
        return None
    return UserError(text.rsplit(_WORKER_USER_ERROR, 1)[1].strip().splitlines()[0])


if __name__ == "__main__":
    sys.exit(main())
