"""Read a ResNet-50 backbone out of any checkpoint the suite accepts, without importing detectron2.

Accepted inputs (``load_backbone``):

- ours: ``torch.save`` dict with ``state_dict`` holding ``encoder_q.<torchvision ResNet-50 names>`` (+ the head in
  ``encoder_q.fc.*``, the key encoder ``encoder_k.*``, ``queue``, ``queue_ptr``) and ``config``;
- the official MoCo / JCL releases: ``state_dict`` with ``module.encoder_q.`` keys;
- a plain torchvision ResNet-50 ``state_dict`` (optionally wrapped in ``{"state_dict": ...}`` or ``{"model": ...}``,
  optionally with a ``module.`` prefix), e.g. the supervised ImageNet weights.

The result is a clean torchvision ``state_dict`` without ``fc``; everything that was not mapped is listed in
``dropped`` so a user sees it (MoCo's own converter dropped head keys silently). Anything that is not a full
ResNet-50 backbone raises :class:`UserError` naming what is wrong.
"""

from __future__ import annotations

import os
import pickle
import zipfile
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ctbench.errors import UserError

_PREFIXES = ("module.encoder_q.", "encoder_q.", "module.backbone.", "backbone.", "module.")

# torchvision's ImageNet-supervised ResNet-50 releases, by the first 8 hex digits of the file's sha256 (torchvision
# names each file after them and checks them on download: torch.hub HASH_REGEX). Only these are called "supervised"
# without the user saying so; any other torchvision-format state_dict (a random init, a converted run) is named
# after its file.
SUPERVISED_RELEASES = {
    "0676ba61": "torchvision ResNet50_Weights.IMAGENET1K_V1 (resnet50-0676ba61.pth)",
    "11ad3fa6": "torchvision ResNet50_Weights.IMAGENET1K_V2 (resnet50-11ad3fa6.pth)",
    "19c8e357": "torchvision's original ImageNet ResNet-50 (resnet50-19c8e357.pth)",
}


def supervised_release(path: str | os.PathLike) -> str | None:
    """The known ImageNet-supervised release ``path`` is, by content (sha256 prefix), or ``None``."""
    import hashlib

    p = Path(path)
    if not p.is_file():
        return None
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return SUPERVISED_RELEASES.get(h.hexdigest()[:8])


@dataclass
class Backbone:
    """A ResNet-50 backbone in torchvision names (no ``fc``) and where it came from."""

    state_dict: dict[str, torch.Tensor]
    source: str  # "ctbench" | "moco" | "torchvision"
    path: str
    dropped: list[str] = field(default_factory=list)
    meta: dict = field(default_factory=dict)  # e.g. the pretraining config and epoch of our checkpoints


def resnet50_reference() -> dict[str, torch.Size]:
    """Names and shapes of torchvision's ResNet-50 backbone (without ``fc``)."""
    import torchvision

    sd = torchvision.models.resnet50().state_dict()
    return {k: v.shape for k, v in sd.items() if not k.startswith("fc.")}


def read_checkpoint(path: str | os.PathLike) -> dict:
    """``torch.load`` on CPU with a one-line error for missing, truncated or foreign files."""
    p = Path(path)
    if not p.is_file():
        raise UserError(f"checkpoint not found: {p}")
    if p.stat().st_size == 0:
        raise UserError(f"{p}: empty file (a truncated or interrupted download/write?)")
    try:
        obj = torch.load(p, map_location="cpu", weights_only=False)
    except (RuntimeError, EOFError, pickle.UnpicklingError, zipfile.BadZipFile, ValueError, OSError,
            AttributeError, ModuleNotFoundError) as e:
        msg = (str(e).splitlines()[0].split(". ")[0] if str(e) else type(e).__name__)
        raise UserError(f"{p}: not a readable PyTorch checkpoint (truncated or corrupt?): {msg}") from e
    if not isinstance(obj, dict):
        raise UserError(f"{p}: expected a dict checkpoint, got {type(obj).__name__}")
    return obj


def load_backbone(path: str | os.PathLike) -> Backbone:
    obj = read_checkpoint(path)
    meta: dict = {}
    if "state_dict" in obj and isinstance(obj["state_dict"], dict):
        sd = obj["state_dict"]
        meta = {k: obj[k] for k in ("epoch", "config", "arch", "ctbench") if k in obj}
    elif "model" in obj and isinstance(obj["model"], dict):
        sd = obj["model"]
    else:
        sd = obj
    tensors = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    if not tensors:
        raise UserError(f"{path}: holds no tensors (keys: {', '.join(list(obj)[:8])})")

    source = "torchvision"
    if any(k.startswith("module.encoder_q.") for k in tensors):
        source = "moco"
    elif any(k.startswith("encoder_q.") for k in tensors):
        source = "ctbench" if "ctbench" in obj or "config" in obj else "moco"

    ref = resnet50_reference()
    mapped: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for k, v in tensors.items():
        name = _strip(k, source)
        if name is not None and name in ref:
            mapped[name] = v
        else:
            dropped.append(k)

    bad = [(k, tuple(v.shape), tuple(ref[k])) for k, v in mapped.items() if v.shape != ref[k]]
    if bad:
        k, got, want = bad[0]
        raise UserError(f"{path}: not a ResNet-50: {k} has shape {got}, ResNet-50 has {want} "
                        f"({len(bad)} mismatched tensors)")
    missing = [k for k in ref if k not in mapped and not k.endswith("num_batches_tracked")]
    if missing:
        if len(missing) == len([k for k in ref if not k.endswith("num_batches_tracked")]):
            sample = ", ".join(sorted(tensors)[:4])
            raise UserError(f"{path}: no ResNet-50 backbone tensors found (first keys: {sample}); "
                            "expected ours, MoCo/JCL (module.encoder_q.*) or torchvision resnet50 names")
        raise UserError(f"{path}: not a complete ResNet-50 backbone: {len(missing)} tensors missing "
                        f"(e.g. {', '.join(missing[:3])})")
    for k in ref:  # checkpoints from older torch may lack BN counters; they carry no information
        if k.endswith("num_batches_tracked") and k not in mapped:
            mapped[k] = torch.tensor(0, dtype=torch.long)
    ordered = {k: mapped[k].detach().clone() for k in ref}
    return Backbone(ordered, source, str(path), sorted(dropped), meta)


def _strip(key: str, source: str) -> str | None:
    if source in ("moco", "ctbench"):
        for p in ("module.encoder_q.", "encoder_q."):
            if key.startswith(p):
                rest = key[len(p):]
                return None if rest.startswith("fc.") else rest
        return None
    for p in _PREFIXES:
        if key.startswith(p):
            key = key[len(p):]
            break
    return None if key.startswith("fc.") else key


def resnet50_from(backbone: Backbone | None, num_classes: int = 1000) -> torch.nn.Module:
    """A torchvision ResNet-50 with ``backbone`` loaded strictly (random init if ``None``) and a fresh ``fc``."""
    import torchvision

    model = torchvision.models.resnet50(num_classes=num_classes)
    if backbone is not None:
        missing, unexpected = model.load_state_dict(backbone.state_dict, strict=False)
        assert not unexpected and set(missing) == {"fc.weight", "fc.bias"}, (missing, unexpected)
    return model


def pooled_features(backbone: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Global-average-pooled trunk features: N x 3 x H x W -> N x C.

    A torchvision ResNet (anything with ``layer4`` and ``avgpool``) is run up to its pooling, skipping ``fc`` (the
    projection head in our checkpoints); any other module is called and its output flattened.
    """
    if hasattr(backbone, "layer4") and hasattr(backbone, "avgpool"):
        m = backbone
        x = m.maxpool(m.relu(m.bn1(m.conv1(x))))
        x = m.layer4(m.layer3(m.layer2(m.layer1(x))))  # N x 2048 x H/32 x W/32
        return torch.flatten(m.avgpool(x), 1)  # N x 2048
    return torch.flatten(backbone(x), 1)


def summarize_dropped(keys: list[str]) -> str:
    """``encoder_k.* (320), encoder_q.fc.* (4), queue, queue_ptr`` — grouped by the prefix that explains them."""
    groups: Counter[str] = Counter()
    for k in keys:
        parts = k.split(".")
        head = next((i for i, p in enumerate(parts) if p in ("fc", "encoder_k", "head", "projector")), None)
        if head is not None and head + 1 < len(parts):
            groups[".".join(parts[: head + 1]) + ".*"] += 1
        elif len(parts) > 2:
            groups[".".join(parts[:1]) + ".*"] += 1
        else:
            groups[k] += 1
    return ", ".join(f"{g} ({n})" if n > 1 else g for g, n in sorted(groups.items()))
