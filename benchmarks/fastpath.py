"""The two training steps the benchmarks compare: the reference MoCo v2 step and ours, with each fast-path switch.

Ours is the step of ``pretrain.engine`` (same model, losses and call order: momentum update, queries, keys with
shuffle-BN, negatives, loss, backward, SGD step, enqueue), built from the same ``pretrain`` modules and presets;
the switches turn its speed features on or off one at a time. Every switch is in ``make pretrain`` (the config key
in the last column, :data:`ENGINE_KEYS`):

| switch | on | off | ``make pretrain`` |
|---|---|---|---|
| ``bf16`` | autocast bf16 (losses fp32) | fp32 | ``train.precision`` (bf16 on GPU) |
| ``channels_last`` | NHWC weights and inputs | NCHW | ``train.channels_last`` (on GPU) |
| ``foreach_ema`` | ``ContrastiveModel.momentum_update`` (``torch._foreach_*``) | a loop over parameters | always |
| ``compile`` | ``torch.compile`` of both encoders (``nn.Module.compile``, state_dict keys unchanged) | eager |
  ``train.compile`` (off) |
| ``no_sync`` | losses stay on the device (read at log steps) | ``loss.item()`` every step | always |
| ``split_bn`` | one-process emulation of 8 GPUs' BN: queries and keys normalised in 8 sub-batches (the keys' after
  a random permutation) | queries and keys in one batch | ``model.shuffle_bn`` (split on one process) |
| ``ghost_bn`` | split-BN in ONE pass: every BN layer of both encoders normalises each sub-batch with its own
  statistics (:class:`pretrain.model.GhostBatchNorm`) | the sub-batches one by one (8 passes each) | always |
| ``prefetch`` | pinned memory + the next batch copied (and augmented) on a side stream | copy on the step's stream |
  ``data.prefetch`` (on, CUDA only) |
| ``gpu_aug`` | workers decode + crop only; jitter/gray/blur/flip batched on the device | full PIL aug in workers |
  ``data.aug_device`` (gpu on CUDA) |

``prefetch`` and ``gpu_aug`` only matter in the pipeline benchmark (``benchmarks.suite.section_pipeline``).
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from benchmarks.reference_moco import ReferenceMoCo, reference_optimizer, reference_step
from ctbench.config import read_yaml
from pretrain.config import PretrainConfig, preset_path, resolve_config
from pretrain.engine import step_generator
from pretrain.losses import build_loss
from pretrain.model import ContrastiveModel, GhostBatchNorm

COMPUTE_SWITCHES = ("bf16", "channels_last", "foreach_ema", "compile", "no_sync", "split_bn", "ghost_bn")
PIPELINE_SWITCHES = ("prefetch", "gpu_aug")
ENGINE_KEYS = {"bf16": "train.precision", "channels_last": "train.channels_last", "foreach_ema": "always",
               "compile": "train.compile", "no_sync": "always", "split_bn": "model.shuffle_bn", "ghost_bn": "always",
               "prefetch": "data.prefetch", "gpu_aug": "data.aug_device"}


@dataclass(frozen=True)
class Switches:
    bf16: bool = True
    channels_last: bool = True
    foreach_ema: bool = True
    compile: bool = False
    no_sync: bool = True
    split_bn: bool = True
    ghost_bn: bool = True
    prefetch: bool = True
    gpu_aug: bool = True

    @staticmethod
    def defaults(device: torch.device, compile: bool = False) -> Switches:
        """The engine's defaults on this device (bf16 + channels_last + device-side augmentation + prefetch on
        GPU, fp32 NCHW + PIL augmentation on CPU; foreach EMA, no host sync, split-BN in one ghost-BN pass) and, if
        asked, torch.compile (``train.compile``, off by default)."""
        gpu = device.type == "cuda"
        return Switches(bf16=gpu, channels_last=gpu, compile=compile, prefetch=gpu, gpu_aug=gpu)

    def flipped(self, name: str) -> Switches:
        return dataclasses.replace(self, **{name: not getattr(self, name)})

    def describe(self) -> str:
        return ", ".join(f"{k}={'on' if v else 'off'}" for k, v in dataclasses.asdict(self).items())


def method_config(method: str, batch: int, image_size: int, queue_size: int | None = None,
                  num_keys: int | None = None) -> PretrainConfig:
    """The paper preset of ``method`` at this batch/resolution; ``queue_size`` (methods with a queue) and
    ``num_keys`` (JCL's M) can be overridden for small runs."""
    ov = [f"train.batch_size={batch}", f"data.image_size={image_size}"]
    preset = read_yaml(preset_path(method))
    if queue_size is not None and preset.get("model", {}).get("queue_size", 1) > 0:
        ov.append(f"model.queue_size={queue_size}")
    if num_keys is not None and preset.get("loss", {}).get("name") == "jcl":
        ov.append(f"data.num_keys={num_keys}")
    return resolve_config(method, "full", overrides=ov)


@torch.no_grad()
def loop_momentum_update(model: ContrastiveModel) -> None:
    """The ``foreach_ema=off`` update: MoCo's per-parameter loop (plus the buffer copy the engine does)."""
    m = model.momentum
    for pq, pk in zip(model.encoder_q.parameters(), model.encoder_k.parameters()):
        pk.mul_(m).add_(pq.mul(1.0 - m))
    for bq, bk in zip(model.encoder_q.buffers(), model.encoder_k.buffers()):
        bk.copy_(bq)


@contextlib.contextmanager
def _one_group(module: nn.Module) -> Iterator[None]:
    """Ghost-BN layers as plain BN for a while (the sub-batch loop feeds them one sub-batch at a time)."""
    layers = [m for m in module.modules() if isinstance(m, GhostBatchNorm)]
    groups = [m.groups for m in layers]
    for m in layers:
        m.groups = 1
    try:
        yield
    finally:
        for m, g in zip(layers, groups):
            m.groups = g


def _interleave(parts: list[torch.Tensor]) -> torch.Tensor:
    """Sub-batch outputs back in batch order: row ``a G + j`` = row ``a`` of part ``j``."""
    return torch.stack(parts, dim=1).flatten(0, 1)


@torch.no_grad()
def encode_keys_loop(model: ContrastiveModel, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """The ``ghost_bn=off`` keys: the same permutation draw and sub-batches as ``encode_keys`` (permuted rows
    ``j, j + G, ...``), encoded one sub-batch at a time.  x: N x M x 3 x H x W -> N x M x D."""
    n, m = x.shape[:2]
    g = model.bn_splits
    flat = x.flatten(0, 1)  # NM x 3 x H x W
    perm = torch.randperm(flat.shape[0], generator=generator).to(flat.device, non_blocking=True)  # NM
    xp = flat[perm]
    with _one_group(model.encoder_k):
        k_perm = _interleave([model.encoder_k(model._layout(xp[j::g])) for j in range(g)])  # NM x D, permuted
    k = torch.empty_like(k_perm)
    k[perm] = k_perm  # back in input order
    return torch.nn.functional.normalize(k.float(), dim=1).view(n, m, -1)  # N x M x D


def encode_queries_loop(model: ContrastiveModel, x: torch.Tensor) -> torch.Tensor:
    """The ``ghost_bn=off`` queries: the sub-batches of ``encode_queries`` (rows ``j, j + G, ...``) encoded one
    at a time.  x: N x 3 x H x W -> N x D."""
    g = model.bn_splits
    with _one_group(model.encoder_q):
        z = _interleave([model.encoder_q(model._layout(x[j::g])) for j in range(g)])  # N x D
    return torch.nn.functional.normalize(z.float(), dim=1)


@dataclass
class Step:
    """A training step ready to call: ``step(images)``; ``images``: N x (1+M) x 3 x S x S on the device."""

    fn: Callable[[torch.Tensor], None]
    model: nn.Module
    num_views: int
    pending: list = dataclasses.field(default_factory=list)

    def __call__(self, images: torch.Tensor) -> None:
        self.fn(images)

    def drain(self) -> list[float]:
        """Losses kept on the device so far (one host sync)."""
        values = torch.stack(self.pending).cpu().tolist() if self.pending else []
        self.pending.clear()
        return values


def build_ours(cfg: PretrainConfig, device: torch.device, sw: Switches, seed: int = 0) -> Step:
    """Ours, as ``pretrain.engine`` builds and runs it, with the switches applied."""
    torch.manual_seed(seed)
    batch = cfg.train.batch_size
    splits = min(cfg.model.bn_splits, max(batch // 2, 1)) if sw.split_bn else 1  # >= 2 images per BN group
    while batch % splits:  # equal sub-batches
        splits -= 1
    model = ContrastiveModel(cfg.model.head, cfg.model.dim, cfg.model.hidden_dim, cfg.model.momentum,
                             cfg.model.queue_size, cfg.model.batch_negatives, "split" if splits > 1 else "off",
                             splits).to(device)
    loop = splits > 1 and not sw.ghost_bn
    if sw.channels_last:
        model.to(memory_format=torch.channels_last)
    if sw.compile:
        model.encoder_q.compile()
        model.encoder_k.compile()
    loss_fn = build_loss(cfg.loss.name, **cfg.loss.hparams())
    optimizer = torch.optim.SGD(model.encoder_q.parameters(), lr=cfg.optim.lr, momentum=cfg.optim.momentum,
                                weight_decay=cfg.optim.weight_decay)
    update = model.momentum_update if sw.foreach_ema else (lambda: loop_momentum_update(model))
    counter = [0]
    step = Step(fn=lambda x: None, model=model, num_views=1 + cfg.data.num_keys)

    def fn(images: torch.Tensor) -> None:
        gen = step_generator(seed, counter[0])
        counter[0] += 1
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=sw.bf16):
            update()
            x_q = images[:, 0]  # N x 3 x H x W
            if sw.channels_last:
                x_q = x_q.contiguous(memory_format=torch.channels_last)
            q = encode_queries_loop(model, x_q) if loop else model.encode_queries(x_q)  # N x D
            x_k = images[:, 1:]  # N x M x 3 x H x W
            keys = encode_keys_loop(model, x_k, gen) if loop else model.encode_keys(x_k, gen)  # N x M x D
            negatives = model.negatives(keys, gen)  # K x D or N x K x D
            out = loss_fn(q, keys, negatives)
        optimizer.zero_grad(set_to_none=True)
        out.loss.backward()
        optimizer.step()
        model.enqueue(keys)
        if sw.no_sync:
            step.pending.append(out.loss.detach())
        else:
            step.pending.append(torch.tensor(out.loss.item()))

    step.fn = fn
    return step


def build_reference(device: torch.device, queue_size: int = 65536, seed: int = 0, bn_splits: int = 1) -> Step:
    """The reference MoCo v2 step (``benchmarks.reference_moco``); takes the same N x 2 x 3 x S x S images as ours,
    or the reference loader's ``[q, k]`` host tensors (copied to the device inside the step, as the original).
    ``bn_splits > 1``: MoCo's notebook ``SplitBatchNorm`` in both encoders (the engine's one-process semantics)."""
    torch.manual_seed(seed)
    model = ReferenceMoCo(K=queue_size, bn_splits=bn_splits).to(device)
    optimizer = reference_optimizer(model)
    criterion = nn.CrossEntropyLoss().to(device)
    step = Step(fn=lambda x: None, model=model, num_views=2)

    def fn(images: torch.Tensor | list[torch.Tensor]) -> None:
        views = [images[:, 0], images[:, 1]] if isinstance(images, torch.Tensor) else images  # [q, k]
        step.pending.append(torch.tensor(reference_step(model, optimizer, views, device, criterion)))

    step.fn = fn
    return step
