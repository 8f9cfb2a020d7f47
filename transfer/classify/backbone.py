"""Which backbone ``--ckpt`` means, what the run is called, and the check that a frozen backbone stayed frozen.

- ``--ckpt PATH``: ours, an official MoCo/JCL release or a torchvision ``state_dict``
  (:func:`ctbench.checkpoints.load_backbone`); the run is named after the pretraining record found beside the
  checkpoint (``moco_v2``, a sweep variant ``jcl_m/data.num_keys=3``) or in its conversion record (a
  ``python -m transfer.convert --format torchvision`` output), ``supervised`` for other torchvision weights (the
  supervised baseline: torchvision's ImageNet release, ``resnet50-0676ba61.pth``), else the file name;
- ``--ckpt random``: a random-init ResNet-50 drawn from the run's seed (the baseline row ``random``);
- no ``--ckpt``: the newest pretraining checkpoint under ``$CTBENCH_OUTPUT/pretrain``.

:attr:`BackboneSource.baseline` says which baseline a source is (``random``, ``supervised``, or None for a
pretrained backbone): the semi-supervised presets apply OpenSelfSup's best setting for the baselines by it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ctbench.checkpoints import Backbone, load_backbone, resnet50_from, summarize_dropped, supervised_release
from ctbench.paths import newest_checkpoint
from ctbench.records import RECORD_NAME, find_input, fingerprint, load_input


class BackboneChanged(RuntimeError):
    """The weights or BN statistics of a backbone that must stay frozen changed (MoCo's ``sanity_check``)."""


@dataclass
class BackboneSource:
    backbone: Backbone | None  # None = random init
    name: str  # run name: the pretraining run, "random", "supervised" or the file name
    inputs: list = field(default_factory=list)  # what the run record links to (the checkpoint path)
    baseline: str | None = None  # "random", "supervised" (torchvision weights of no pretraining run), else None

    @property
    def dropped_summary(self) -> str:
        """What the checkpoint held besides the backbone, grouped: ``encoder_k.* (320), encoder_q.fc.* (4), queue``."""
        return summarize_dropped(self.backbone.dropped if self.backbone is not None else [])

    @property
    def identity(self) -> dict:
        """What a finished run must have been trained from to be reused (see ``engine.finished``)."""
        if self.backbone is None:
            return {"backbone": "random"}
        return {"backbone": self.backbone.source, "fingerprint": fingerprint(self.backbone.path)}

    @property
    def description(self) -> str:
        if self.backbone is None:
            return "random init"
        return f"{self.backbone.source} checkpoint {self.backbone.path}"


def resolve_ckpt(arg: str | None) -> BackboneSource:
    """``--ckpt`` -> the backbone, the run name and the record inputs."""
    if arg == "random":
        return BackboneSource(None, "random", baseline="random")
    path = Path(arg) if arg else newest_checkpoint()
    bb = load_backbone(path)
    rec = load_input(path)
    if bb.source == "torchvision" and not path.with_name(path.name + "." + RECORD_NAME).is_file():
        rec = {}  # torchvision weights are named by their own conversion record only, not by a record.json nearby
    pretrain = rec if rec.get("kind") == "pretrain" else find_input(rec, "pretrain")
    if pretrain is not None and pretrain.get("name"):
        return BackboneSource(bb, str(pretrain["name"]), [path])
    if bb.source == "torchvision":
        if supervised_release(path) is not None:
            return BackboneSource(bb, "supervised", [path], baseline="supervised")
        return BackboneSource(bb, path.name.split(".")[0], [path])  # not a known release: named after its file
    name = path.name.split(".")[0] if bb.source == "moco" else path.parent.name
    return BackboneSource(bb, name, [path])


def build_resnet50(source: BackboneSource, num_classes: int, seed: int) -> nn.Module:
    """ResNet-50 with the backbone loaded (or drawn from ``seed``) and ``fc`` = Linear(2048, num_classes) with
    weights N(0, 0.01) and zero bias (MoCo main_lincls / OpenSelfSup ClsHead), drawn from ``seed``."""
    devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        model = resnet50_from(source.backbone, num_classes=num_classes)
        g = torch.Generator().manual_seed(seed + 1)
        with torch.no_grad():
            model.fc.weight.copy_(torch.randn(model.fc.weight.shape, generator=g) * 0.01)
            model.fc.bias.zero_()
    return model


def check_unchanged(model: nn.Module, reference: dict[str, torch.Tensor]) -> None:
    """Raise :class:`BackboneChanged` unless every backbone tensor of ``model`` equals ``reference`` exactly."""
    state = model.state_dict()
    changed = [k for k, v in reference.items() if k not in state or not torch.equal(state[k].detach().cpu(), v)]
    if changed:
        raise BackboneChanged(
            f"the frozen backbone changed during the linear probe: {len(changed)} tensor(s) differ from the loaded "
            f"checkpoint (e.g. {', '.join(changed[:3])}); it must stay in eval mode without gradients, so this "
            "number would not be a linear probe")
