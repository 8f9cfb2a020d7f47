"""Query encoder, momentum key encoder, queue, shuffle-BN and the negatives of each method.

``encoder_q`` is a torchvision ResNet-50 whose ``fc`` IS the projection head (as in MoCo's code), so checkpoint
keys are ``encoder_q.<torchvision names>`` with the head in ``encoder_q.fc.*``; ``encoder_k`` is its momentum copy;
``queue`` (D x K, as MoCo) and ``queue_ptr`` are registered buffers, so all of it is in ``state_dict()``.

One training step (what ``pretrain.engine`` calls, in this order)::

    model.momentum_update()                              # θ_k <- m θ_k + (1 - m) θ_q; BN buffers copied
    q = model.encode_queries(images[:, 0], encoder_q)    # N x D   (encoder_q may be the DDP wrapper)
    keys = model.encode_keys(images[:, 1:], generator)   # N x M x D, no gradient, shuffle-BN
    negatives = model.negatives(keys, generator)         # K x D (queue) or N x K x D (in-batch, SiMo)
    ...loss, backward, optimizer step...
    model.enqueue(keys)                                  # the key mean μ (= the key when M = 1), all ranks

Policies:

- **Momentum update**: one fused EMA over all parameters (``torch._foreach_mul_`` / ``_foreach_add_``). BN buffers
  (running mean/var, counters) are *copied* from the query encoder rather than averaged: the key encoder runs in
  train mode, so its outputs use batch statistics and its buffers only matter when someone evaluates
  ``encoder_k``; copying keeps them those of a real network and costs nothing. Done at the start of a step, before
  the keys, as MoCo does (the first update is a no-op since θ_k = θ_q at init).
- **Shuffle-BN** (MoCo): BN statistics shared by a query and its own key would let the model cheat. Under DDP
  (``ddp``) the key images of all ranks are gathered, permuted with a permutation every rank draws from the same
  per-step generator (equivalent to MoCo's broadcast from rank 0, without the collective), each rank encodes its
  slice, and the keys are gathered back and un-permuted. On one process (``split``) the key batch is permuted and
  encoded in ``bn_splits`` sub-batches with independent BN statistics, so a key is normalised with statistics of
  a random subset of the batch, as on MoCo's GPUs; queries are encoded as one batch. ``off`` disables it.
- **Negatives**: the queue (MoCo, JCL, EqCo, CO2), or (``queue_size = 0``, SiMo) the other samples' keys of the
  global batch (gathered over ranks), all of them or ``batch_negatives`` drawn per query.
- **Queue**: enqueues the mean μ of a sample's M keys (JCL's official code; the key itself when M = 1), from all
  ranks in rank order, circularly; the pointer stays on the device (no host sync).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
import torchvision
from torch import nn

from pretrain import distributed as D

HEADS = ("linear", "mlp", "mlp_bn")


def build_head(kind: str, in_dim: int = 2048, hidden_dim: int = 2048, dim: int = 128) -> nn.Module:
    """``linear``: 2048-128 (v1); ``mlp``: 2048-2048-128 with ReLU (v2); ``mlp_bn``: Linear-BN-ReLU-Linear-BN (SiMo)."""
    if kind == "linear":
        return nn.Linear(in_dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
    if kind == "mlp_bn":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                             nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim, bias=False), nn.BatchNorm1d(dim))
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


def build_encoder(head: str = "mlp", dim: int = 128, hidden_dim: int = 2048, zero_init_residual: bool = False
                  ) -> nn.Module:
    """torchvision ResNet-50 with ``fc`` replaced by the projection head.

    ``zero_init_residual``: the last BN of every bottleneck starts at γ = 0 (Goyal et al. 2017; MoCo v3, SimSiam
    and Barlow Twins pretrain this way; MoCo v1/v2 do not), so each block starts as the identity."""
    net = torchvision.models.resnet50(zero_init_residual=zero_init_residual)
    net.fc = build_head(head, net.fc.in_features, hidden_dim, dim)
    return net


class ContrastiveModel(nn.Module):
    """MoCo-style query/key encoders plus the negatives queue (see the module docstring)."""

    def __init__(self, head: str = "mlp", dim: int = 128, hidden_dim: int = 2048, momentum: float = 0.999,
                 queue_size: int = 65536, batch_negatives: int = 0, shuffle_bn: str = "split", bn_splits: int = 8,
                 zero_init_residual: bool = False):
        super().__init__()
        if shuffle_bn not in ("ddp", "split", "off"):
            raise ValueError(f"shuffle_bn must be ddp, split or off, got {shuffle_bn!r}")
        self.momentum = momentum
        self.batch_negatives = batch_negatives
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits
        self.encoder_q = build_encoder(head, dim, hidden_dim, zero_init_residual)
        self.encoder_k = build_encoder(head, dim, hidden_dim, zero_init_residual)
        self.encoder_k.load_state_dict(self.encoder_q.state_dict())
        for p in self.encoder_k.parameters():
            p.requires_grad_(False)
        self.register_buffer("queue", F.normalize(torch.randn(dim, queue_size), dim=0))  # D x K
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))
        self.channels_last = False  # set by the engine on GPU; inputs are converted to match

    def _layout(self, x: torch.Tensor) -> torch.Tensor:
        return x.contiguous(memory_format=torch.channels_last) if self.channels_last else x

    @property
    def queue_size(self) -> int:
        return self.queue.shape[1]

    @torch.no_grad()
    def momentum_update(self) -> None:
        """θ_k <- m θ_k + (1 - m) θ_q over all parameters at once; buffers copied (see the module docstring)."""
        pk, pq = list(self.encoder_k.parameters()), list(self.encoder_q.parameters())
        torch._foreach_mul_(pk, self.momentum)
        torch._foreach_add_(pk, pq, alpha=1.0 - self.momentum)
        torch._foreach_copy_(list(self.encoder_k.buffers()), list(self.encoder_q.buffers()))

    def encode_queries(self, x: torch.Tensor, encoder: nn.Module | None = None) -> torch.Tensor:
        """L2-normalised query embeddings.  x: N x 3 x H x W -> N x D (float32)."""
        return F.normalize((encoder or self.encoder_q)(self._layout(x)).float(), dim=1)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L2-normalised keys with shuffle-BN.  x: N x M x 3 x H x W -> N x M x D (float32).

        ``generator`` is a CPU generator seeded identically on every rank (the permutation must agree)."""
        n, m = x.shape[:2]
        flat = x.flatten(0, 1)  # NM x 3 x H x W
        if self.shuffle_bn == "ddp" and D.world_size() > 1:
            k = self._keys_shuffled_ddp(flat, generator)
        elif self.shuffle_bn in ("split", "ddp") and self.bn_splits > 1:
            perm = torch.randperm(flat.shape[0], generator=generator).to(flat.device, non_blocking=True)  # NM
            parts = [self.encoder_k(self._layout(c)) for c in flat[perm].tensor_split(self.bn_splits)]
            k = parts[0].new_empty(flat.shape[0], parts[0].shape[1])  # NM x D
            k[perm] = torch.cat(parts)  # NM x D, back in input order
        else:
            k = self.encoder_k(self._layout(flat))  # NM x D
        return F.normalize(k.float(), dim=1).view(n, m, -1)  # N x M x D

    def _keys_shuffled_ddp(self, flat: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        local = flat.shape[0]
        x_all = D.gather(flat)  # (W NM) x 3 x H x W
        perm = torch.randperm(x_all.shape[0], generator=generator).to(flat.device, non_blocking=True)  # W NM
        mine = perm[D.rank() * local:(D.rank() + 1) * local]  # NM: the images this rank encodes
        k_all = D.gather(self.encoder_k(self._layout(x_all[mine])))  # (W NM) x D, in permuted order
        k = torch.empty_like(k_all)
        k[perm] = k_all  # un-permute
        return k[D.rank() * local:(D.rank() + 1) * local]  # NM x D: this rank's own samples

    @torch.no_grad()
    def negatives(self, keys: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The queue as K x D, or (no queue) each query's in-batch negatives as N x K x D."""
        if self.queue_size > 0:
            return self.queue.t()  # K x D (a view; enqueue only after the backward pass)
        k_local = keys.mean(dim=1)  # N x D
        k_all = D.gather(k_local)  # G x D, G = global batch
        n, g = k_local.shape[0], k_all.shape[0]
        own = D.rank() * n + torch.arange(n, device=keys.device)  # N: global index of each local query
        others = torch.arange(g - 1, device=keys.device).expand(n, -1)  # N x (G-1)
        others = others + (others >= own[:, None]).long()  # skip the query's own key
        if 0 < self.batch_negatives < g - 1:
            scores = torch.rand(n, g - 1, generator=generator).to(keys.device, non_blocking=True)  # N x (G-1)
            pick = scores.argsort(dim=1)[:, : self.batch_negatives]  # N x K
            others = others.gather(1, pick)
        return k_all[others]  # N x K x D

    @torch.no_grad()
    def enqueue(self, keys: torch.Tensor) -> None:
        """Write the key mean of every sample of the global batch into the queue.  keys: N x M x D."""
        if self.queue_size == 0:
            return
        k_all = D.gather(keys.mean(dim=1).to(self.queue.dtype))  # G x D
        idx = (self.queue_ptr + torch.arange(k_all.shape[0], device=self.queue.device)) % self.queue_size  # G
        self.queue.index_copy_(1, idx, k_all.t())
        self.queue_ptr.add_(k_all.shape[0]).remainder_(self.queue_size)


def query_backbone_state_dict(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The query encoder of a checkpoint's ``state_dict`` in torchvision ResNet-50 names, without the head."""
    prefix = "encoder_q."
    return {k[len(prefix):]: v for k, v in state_dict.items()
            if k.startswith(prefix) and not k.startswith(prefix + "fc.")}
