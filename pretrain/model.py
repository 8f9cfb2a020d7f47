"""Query encoder, momentum key encoder, queue, the BN flavours of each recipe and the negatives of each method.

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
- **BN of the MoCo recipes: per-GPU BN + shuffle-BN** (facebookresearch/moco@132aea9 moco/builder.py): each of
  the 8 GPUs normalises its own 32 images, and the keys are shuffled across GPUs first, so that a query and its
  key are not normalised with the same statistics (BN shared by the pair would let the model cheat). Under DDP
  (``ddp``) the key images of all ranks are gathered, permuted with a permutation every rank draws from the same
  per-step generator (MoCo broadcasts rank 0's; ours needs no collective), each rank encodes its slice, and the
  keys are gathered back and un-permuted. On one process (``split``) every BN layer of both encoders is a
  :class:`GhostBatchNorm` over ``bn_splits`` sub-batches, in one pass: the queries' sub-batch ``g`` is the images
  ``i`` with ``i mod G = g`` of the batch, exactly the slice GPU ``g`` gets from ``pretrain.data``'s sampler under
  G processes; the keys' sub-batches are those of a random permutation, as shuffle-BN gives. MoCo's single-GPU
  notebook (facebookresearch/moco colab-notebook branch, colab/moco_cifar10_demo.ipynb ``SplitBatchNorm``,
  ``--bn-splits 8``) splits both encoders' BN the same way. ``off``: BN over the whole local batch.
- **BN of SiMo: global synchronised BN** (V2AI/SelfSup examples/simo config.py ``NORM="SyncBN"`` for the backbone
  and the head, cvpods' ``NaiveSyncBatchNorm``; simo.py: no batch shuffle): every BN layer of both encoders
  (``sync_bn``) is a :class:`GlobalBatchNorm`, whose statistics are those of the global batch under DDP (on one
  process: BN over the whole batch, which is what global BN computes).
- **Negatives**: the queue (MoCo, JCL, EqCo, CO2), or (``queue_size = 0``, SiMo) the other samples' keys of the
  global batch (gathered over ranks; 255 for a global batch of 256), all of them or ``batch_negatives`` drawn per
  query.
- **Queue**: enqueues the mean μ of a sample's M keys (JCL's official code; the key itself when M = 1), from all
  ranks in rank order, circularly; the pointer stays on the device (no host sync).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
import torchvision
from torch import nn

from ctbench import distributed as D

HEADS = ("linear", "mlp", "mlp_bn")
SHUFFLE_BN = ("ddp", "split", "off")


class GhostBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Train-mode BatchNorm over ``groups`` equal sub-batches, each normalised with its own statistics, in one call:
    sub-batch ``g`` is the samples ``i`` with ``i mod groups = g`` (the slice process ``g`` of ``groups`` gets from
    ``pretrain.data``'s sampler). The outputs equal running the sub-batches through a BatchNorm one by one (every
    other layer sees the whole batch). MoCo's notebook ``SplitBatchNorm`` (facebookresearch/moco colab-notebook
    branch, colab/moco_cifar10_demo.ipynb): a contiguous N x C (x H x W) batch is viewed as (N / G) x (G C) (x H x
    W) and normalised by ONE ``batch_norm`` call over G C channels (no copy); other layouts (channels-last) run
    the G strided slices one by one. Running statistics as that notebook: each sub-batch updates a copy, the mean of
    the copies is kept. Eval mode (and ``groups = 1``): plain BatchNorm. State-dict keys are BatchNorm's.

    ``GhostBatchNorm(bn, groups)`` builds the replacement of an existing BatchNorm ``bn`` (its settings, parameters
    and buffers).

    Shape: (N, C) or (N, C, H, W) with N a multiple of ``groups``."""

    def __init__(self, num_features: int | nn.modules.batchnorm._BatchNorm, groups: int = 1, eps: float = 1e-5,
                 momentum: float | None = 0.1, affine: bool = True, track_running_stats: bool = True, device=None,
                 dtype=None):
        bn = num_features if isinstance(num_features, nn.modules.batchnorm._BatchNorm) else None
        if bn is not None:
            num_features, eps, momentum = bn.num_features, bn.eps, bn.momentum
            affine, track_running_stats = bn.affine, bn.track_running_stats
            ref = next(iter(bn.state_dict().values()), None)
            device, dtype = (ref.device, ref.dtype if ref.is_floating_point() else dtype) if ref is not None else (
                device, dtype)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, device=device, dtype=dtype)
        if bn is not None:
            self.load_state_dict(bn.state_dict())
        self.groups = groups

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        g = self.groups
        if not self.training or g == 1:
            return super().forward(x)
        n, c = x.shape[:2]
        if n % g:
            raise ValueError(f"GhostBatchNorm: a batch of {n} does not split into {g} equal sub-batches")
        track = self.track_running_stats and self.running_mean is not None
        factor = 0.0 if self.momentum is None else self.momentum
        if track:
            self.num_batches_tracked.add_(1)
            if self.momentum is None:  # cumulative moving average, as nn.BatchNorm
                factor = 1.0 / float(self.num_batches_tracked)
        mean = self.running_mean.repeat(g) if track else None  # G C: sub-batch j's copy at [j C, (j+1) C)
        var = self.running_var.repeat(g) if track else None
        weight = self.weight.repeat(g) if self.affine else None
        bias = self.bias.repeat(g) if self.affine else None
        if x.is_contiguous():  # (N/G) x (G C) (x H x W): channel j C + c of row a = channel c of sample a G + j
            out = F.batch_norm(x.view(n // g, g * c, *x.shape[2:]), mean, var, weight, bias, True, factor,
                               self.eps).view(x.shape)
        else:  # e.g. channels-last: the strided slices x[j::G] one by one, interleaved back
            parts = [F.batch_norm(x[j::g], None if mean is None else mean[j * c:(j + 1) * c],
                                  None if var is None else var[j * c:(j + 1) * c],
                                  None if weight is None else weight[j * c:(j + 1) * c],
                                  None if bias is None else bias[j * c:(j + 1) * c], True, factor, self.eps)
                     for j in range(g)]
            out = torch.stack(parts, dim=1).flatten(0, 1)  # N x C (x H x W), sample a G + j = part j row a
            if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
                out = out.contiguous(memory_format=torch.channels_last)
        if track:
            with torch.no_grad():
                self.running_mean.copy_(mean.view(g, c).mean(0))
                self.running_var.copy_(var.view(g, c).mean(0))
        return out


class _SumOverRanks(torch.autograd.Function):
    """all_reduce(SUM) with its gradient (the sum of the gradients of every rank), as cvpods' ``AllReduce``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        x = x.clone()
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad


class GlobalBatchNorm(nn.modules.batchnorm._BatchNorm):
    """Train-mode BatchNorm over the global batch of all DDP ranks (cvpods' ``NaiveSyncBatchNorm``, SelfSup's
    ``NORM="SyncBN"``): every rank all-reduces its per-channel mean and mean of squares (one collective of 2C
    numbers, with gradient), so each rank normalises with the statistics of all W x N images. Works on every
    backend (gloo on CPU, nccl on GPU); equal local batch sizes are assumed, as in cvpods. With one process, or in
    eval mode: plain BatchNorm (over the whole batch). Running variance: the unbiased variance of the global batch
    (what BN over the whole batch on one process keeps; cvpods keeps the biased one). State-dict keys are
    BatchNorm's.

    Shape: (N, C) or (N, C, H, W)."""

    def _check_input_dim(self, x: torch.Tensor) -> None:
        if x.dim() not in (2, 4):
            raise ValueError(f"expected 2-D or 4-D input, got {x.dim()}-D")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self._check_input_dim(x)
        world = D.world_size()
        if not self.training or world == 1:
            return super().forward(x)
        c = x.shape[1]
        dims = [0] if x.dim() == 2 else [0, 2, 3]
        xf = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x  # statistics in >= float32
        stats = torch.cat([xf.mean(dims), (xf * xf).mean(dims)])  # 2C: this rank's mean and mean of squares
        mean, meansqr = (_SumOverRanks.apply(stats) / world).split(c)  # C, C: over the global batch
        var = (meansqr - mean * mean).clamp_min(0)  # C, biased
        if self.track_running_stats and self.running_mean is not None:
            with torch.no_grad():
                self.num_batches_tracked.add_(1)
                factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
                n = x.numel() // c * world  # values per channel in the global batch
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), factor)
                self.running_var.lerp_((var.detach() * n / max(n - 1, 1)).to(self.running_var.dtype), factor)
        scale = torch.rsqrt(var + self.eps)  # C
        if self.affine:
            scale = scale * self.weight
        shift = -mean * scale + (self.bias if self.affine else 0.0)  # C
        shape = (1, c) + (1,) * (x.dim() - 2)
        return (xf * scale.view(shape) + shift.view(shape)).to(x.dtype)


def convert_bn(module: nn.Module, kind: type[nn.modules.batchnorm._BatchNorm], **kwargs) -> nn.Module:
    """Replace every BatchNorm1d/2d below ``module`` (in place) by ``kind(num_features, **kwargs)`` carrying the same
    parameters and buffers (state-dict keys unchanged); existing ``kind`` layers get ``kwargs`` set."""
    for name, child in module.named_children():
        if isinstance(child, kind):
            for k, v in kwargs.items():
                setattr(child, k, v)
        elif isinstance(child, (nn.BatchNorm1d, nn.BatchNorm2d)):
            new = kind(child.num_features, eps=child.eps, momentum=child.momentum, affine=child.affine,
                       track_running_stats=child.track_running_stats, **kwargs)
            ref = next(iter(child.state_dict().values()), None)
            if ref is not None and ref.is_floating_point():
                new.to(device=ref.device, dtype=ref.dtype)
            new.load_state_dict(child.state_dict())
            new.train(child.training)
            setattr(module, name, new)
        else:
            convert_bn(child, kind, **kwargs)
    return module


def build_head(kind: str, in_dim: int = 2048, hidden_dim: int = 2048, dim: int = 128) -> nn.Module:
    """``linear``: 2048-128 (MoCo v1); ``mlp``: 2048-2048-128 with ReLU (MoCo v2; torch's default init, as
    moco/builder.py); ``mlp_bn``: SiMo's Linear(no bias)-BN-ReLU-Linear(no bias)-BN with the Linear weights drawn
    from N(0, 0.01) and BN γ = 1 (V2AI/SelfSup examples/simo simo.py)."""
    if kind == "linear":
        return nn.Linear(in_dim, dim)
    if kind == "mlp":
        return nn.Sequential(nn.Linear(in_dim, hidden_dim), nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim))
    if kind == "mlp_bn":
        head = nn.Sequential(nn.Linear(in_dim, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim),
                             nn.ReLU(inplace=True), nn.Linear(hidden_dim, dim, bias=False), nn.BatchNorm1d(dim))
        for linear in (head[0], head[3]):
            nn.init.normal_(linear.weight, mean=0.0, std=0.01)
        return head
    raise ValueError(f"unknown head {kind!r}; choose from {', '.join(HEADS)}")


def build_encoder(head: str = "mlp", dim: int = 128, hidden_dim: int = 2048, zero_init_residual: bool = False,
                  residual_gamma: float | None = None) -> nn.Module:
    """torchvision ResNet-50 with ``fc`` replaced by the projection head.

    ``zero_init_residual``: the last BN of every bottleneck starts at γ = 0 (Goyal et al. 2017; SiMo's
    ``ZERO_INIT_RESIDUAL = True``; MoCo v3, SimSiam and Barlow Twins pretrain this way; MoCo v1/v2 do not), so each
    block starts as the identity. ``residual_gamma`` (when not None) is that γ instead, for every bottleneck: 0 is
    zero-init, 1 torchvision's init, values between scale each residual branch down at step 0."""
    net = resnet50(zero_init_residual, residual_gamma)
    net.fc = build_head(head, net.fc.in_features, hidden_dim, dim)
    return net


def effective_residual_gamma(zero_init_residual: bool, residual_gamma: float | None) -> float:
    """γ of every bottleneck's last BN at step 0: ``residual_gamma`` if given, else 0 (zero-init) or 1 (torchvision)."""
    if residual_gamma is not None:
        return float(residual_gamma)
    return 0.0 if zero_init_residual else 1.0


def resnet50(zero_init_residual: bool = False, residual_gamma: float | None = None,
             num_classes: int = 1000) -> nn.Module:
    """torchvision's ResNet-50 with the residual-branch init of :func:`effective_residual_gamma` (the same random
    draws for every γ: only the bottlenecks' last BN weights differ)."""
    net = torchvision.models.resnet50(num_classes=num_classes, zero_init_residual=zero_init_residual)
    if residual_gamma is not None:
        set_residual_gamma(net, residual_gamma)
    return net


def set_residual_gamma(net: nn.Module, gamma: float) -> None:
    """Set γ of the last BN (``bn3``) of every torchvision bottleneck in ``net`` to ``gamma``."""
    for m in net.modules():
        if isinstance(m, torchvision.models.resnet.Bottleneck):
            nn.init.constant_(m.bn3.weight, gamma)


class ContrastiveModel(nn.Module):
    """MoCo-style query/key encoders plus the negatives queue (see the module docstring)."""

    def __init__(self, head: str = "mlp", dim: int = 128, hidden_dim: int = 2048, momentum: float = 0.999,
                 queue_size: int = 65536, batch_negatives: int = 0, shuffle_bn: str = "split", bn_splits: int = 8,
                 zero_init_residual: bool = False, sync_bn: bool = False, residual_gamma: float | None = None):
        super().__init__()
        if shuffle_bn not in SHUFFLE_BN:
            raise ValueError(f"shuffle_bn must be one of {', '.join(SHUFFLE_BN)}, got {shuffle_bn!r}")
        if sync_bn and shuffle_bn != "off":
            raise ValueError("sync_bn (global BN) needs shuffle_bn='off'")
        self.momentum = momentum
        self.batch_negatives = batch_negatives
        self.shuffle_bn = shuffle_bn
        self.bn_splits = bn_splits if shuffle_bn == "split" else 1  # one-process emulation: sub-batches per BN
        self.sync_bn = sync_bn
        self.encoder_q = build_encoder(head, dim, hidden_dim, zero_init_residual, residual_gamma)
        self.encoder_k = build_encoder(head, dim, hidden_dim, zero_init_residual, residual_gamma)
        for enc in (self.encoder_q, self.encoder_k):
            if sync_bn:
                convert_bn(enc, GlobalBatchNorm)
            elif self.bn_splits > 1:
                convert_bn(enc, GhostBatchNorm, groups=self.bn_splits)
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
        """L2-normalised query embeddings.  x: N x 3 x H x W -> N x D (float32).

        Split mode: sample ``i`` is normalised in sub-batch ``i mod bn_splits`` (the GPU slices it emulates; the
        ghost-BN layers group the samples so, in the same pass)."""
        encoder = encoder or self.encoder_q
        return F.normalize(encoder(self._layout(x)).float(), dim=1)

    @torch.no_grad()
    def encode_keys(self, x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """L2-normalised keys with shuffle-BN.  x: N x M x 3 x H x W -> N x M x D (float32).

        ``generator`` is a CPU generator seeded identically on every rank (the permutation must agree)."""
        n, m = x.shape[:2]
        flat = x.flatten(0, 1)  # NM x 3 x H x W
        if self.shuffle_bn == "ddp" and D.world_size() > 1:
            k = self._keys_shuffled_ddp(flat, generator)
        elif self.bn_splits > 1:  # ghost-BN over the sub-batches of a random permutation, one pass
            perm = torch.randperm(flat.shape[0], generator=generator).to(flat.device, non_blocking=True)  # NM
            k_perm = self.encoder_k(self._layout(flat[perm]))  # NM x D, sub-batch g = permuted rows g, g + G, ...
            k = torch.empty_like(k_perm)
            k[perm] = k_perm  # NM x D, back in input order
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
