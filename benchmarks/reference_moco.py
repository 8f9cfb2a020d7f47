"""The original MoCo v2 training step, reproduced faithfully as the baseline every speed number is divided by.

Source: facebookresearch/moco, ``moco/builder.py`` (the model), ``moco/loader.py`` (TwoCropsTransform,
GaussianBlur) and ``main_moco.py`` (augmentation ``--aug-plus``, SGD, the ``train`` loop), with the MoCo v2 flags
``--mlp --moco-t 0.2 --aug-plus --cos``. Re-written here (not imported) so the benchmark needs no clone; every
operation of the original step is kept, in the original order:

- fp32, NCHW, ``cudnn.benchmark = True``;
- the key encoder's momentum update as a Python loop over parameters (``param_k.mul_(m).add_(param_q.mul(1 - m))``);
- ``concat_all_gather`` before the shuffle, the un-shuffle and the enqueue; ``torch.randperm`` drawn on the CPU and
  moved to the device; the negatives computed against ``queue.clone().detach()``; ``int(queue_ptr)`` (a host sync)
  in the enqueue; logits divided in place by T; ``nn.CrossEntropyLoss`` against zero labels created every step;
- the training loop's top-1/top-5 accuracy and ``loss.item()`` every step (host syncs), ``zero_grad``,
  ``backward``, ``SGD.step`` over ``model.parameters()`` (lr 0.03, momentum 0.9, wd 1e-4; torch's default SGD
  implementation of the installed version);
- data: ``torchvision.datasets.ImageFolder`` + ``TwoCropsTransform`` of the PIL MoCo v2 augmentation, in DataLoader
  workers with ``pin_memory=True``, ``drop_last=True``, ``shuffle=True``, ``.cuda(non_blocking=True)``.

Differences, all single-process simplifications: no DDP wrapper (the original refuses to run without it; one
process has no gradient all-reduce to pay for), ``concat_all_gather`` over a world of one (an allocate + copy + cat,
what ``all_gather`` costs with one rank, without NCCL), and therefore shuffle-BN over one device: the keys are
still permuted and un-permuted as in the original, but with a single BN group the permutation cannot change the
statistics (MoCo on one GPU has the same property). The progress print every 10 steps is left out.

``ReferenceMoCo(bn_splits=8)``: MoCo's own one-process emulation of the 8 GPUs' BN, from its single-GPU notebook
(facebookresearch/moco colab-notebook branch, colab/moco_cifar10_demo.ipynb: ``SplitBatchNorm`` as the
``norm_layer`` of both encoders, ``--bn-splits 8``; the shuffle of one GPU permutes the keys, so the key
sub-batches are random): every BN of both ResNet-50s normalises 8 interleaved sub-batches in one ``batch_norm`` call
over a (N / 8) x (8 C) view. This is the reference at the engine's one-process semantics (``model.shuffle_bn=split``).

    model = ReferenceMoCo().to(device)
    optimizer = reference_optimizer(model)
    loader = reference_loader("datasets/imagenet/train", image_size=224, batch_size=256, workers=16)
    for images, _ in loader:
        reference_step(model, optimizer, images, device)
"""

from __future__ import annotations

import functools
import random

import torch
import torchvision
from PIL import ImageFilter
from torch import nn
from torch.utils.data import DataLoader
from torchvision import transforms

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]


class TwoCropsTransform:
    """Two independent augmentations of one image: ``[query, key]`` (moco/loader.py)."""

    def __init__(self, base_transform):
        self.base_transform = base_transform

    def __call__(self, x):
        return [self.base_transform(x), self.base_transform(x)]


class GaussianBlur:
    """SimCLR's blur with σ drawn by python ``random`` (moco/loader.py)."""

    def __init__(self, sigma=(0.1, 2.0)):
        self.sigma = sigma

    def __call__(self, x):
        return x.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.sigma[0], self.sigma[1])))


def moco_v2_augmentation(image_size: int = 224, blur_sigma=(0.1, 2.0)) -> transforms.Compose:
    """main_moco.py ``--aug-plus`` (blur σ in pixels; scale it with the crop at toy sizes)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomApply([transforms.ColorJitter(0.4, 0.4, 0.4, 0.1)], p=0.8),
        transforms.RandomGrayscale(p=0.2),
        transforms.RandomApply([GaussianBlur(blur_sigma)], p=0.5),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


def moco_v1_augmentation(image_size: int = 224) -> transforms.Compose:
    """main_moco.py without ``--aug-plus`` (InstDisc's)."""
    return transforms.Compose([
        transforms.RandomResizedCrop(image_size, scale=(0.2, 1.0)),
        transforms.RandomGrayscale(p=0.2),
        transforms.ColorJitter(0.4, 0.4, 0.4, 0.4),
        transforms.RandomHorizontalFlip(),
        transforms.ToTensor(),
        transforms.Normalize(mean=IMAGENET_MEAN, std=IMAGENET_STD),
    ])


@torch.no_grad()
def concat_all_gather(tensor: torch.Tensor) -> torch.Tensor:
    """``all_gather`` + ``cat`` as moco/builder.py; over a world of one when no process group is running."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        gathered = [torch.ones_like(tensor) for _ in range(torch.distributed.get_world_size())]
        torch.distributed.all_gather(gathered, tensor, async_op=False)
    else:
        gathered = [torch.ones_like(tensor)]
        gathered[0].copy_(tensor)
    return torch.cat(gathered, dim=0)


def _rank_and_world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class SplitBatchNorm(nn.BatchNorm2d):
    """The notebook's ``SplitBatchNorm`` (colab/moco_cifar10_demo.ipynb), as written there."""

    def __init__(self, num_features, num_splits, **kw):
        super().__init__(num_features, **kw)
        self.num_splits = num_splits

    def forward(self, input):
        N, C, H, W = input.shape
        if self.training or not self.track_running_stats:
            running_mean_split = self.running_mean.repeat(self.num_splits)
            running_var_split = self.running_var.repeat(self.num_splits)
            outcome = nn.functional.batch_norm(
                input.view(-1, C * self.num_splits, H, W), running_mean_split, running_var_split,
                self.weight.repeat(self.num_splits), self.bias.repeat(self.num_splits),
                True, self.momentum, self.eps).view(N, C, H, W)
            self.running_mean.data.copy_(running_mean_split.view(self.num_splits, C).mean(dim=0))
            self.running_var.data.copy_(running_var_split.view(self.num_splits, C).mean(dim=0))
            return outcome
        return nn.functional.batch_norm(input, self.running_mean, self.running_var, self.weight, self.bias, False,
                                        self.momentum, self.eps)


class ReferenceMoCo(nn.Module):
    """moco/builder.py ``MoCo`` with the v2 head (``mlp=True``): query encoder, key encoder, queue (D x K);
    ``bn_splits > 1``: the notebook's ``SplitBatchNorm`` in both encoders (see the module docstring)."""

    def __init__(self, base_encoder=torchvision.models.resnet50, dim: int = 128, K: int = 65536, m: float = 0.999,
                 T: float = 0.2, mlp: bool = True, bn_splits: int = 1):
        super().__init__()
        self.K = K
        self.m = m
        self.T = T
        if bn_splits > 1:
            base_encoder = functools.partial(base_encoder, norm_layer=functools.partial(SplitBatchNorm,
                                                                                        num_splits=bn_splits))
        self.encoder_q = base_encoder(num_classes=dim)
        self.encoder_k = base_encoder(num_classes=dim)
        if mlp:
            dim_mlp = self.encoder_q.fc.weight.shape[1]
            self.encoder_q.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_q.fc)
            self.encoder_k.fc = nn.Sequential(nn.Linear(dim_mlp, dim_mlp), nn.ReLU(), self.encoder_k.fc)
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.data.copy_(param_q.data)
            param_k.requires_grad = False
        self.register_buffer("queue", torch.randn(dim, K))
        self.queue = nn.functional.normalize(self.queue, dim=0)
        self.register_buffer("queue_ptr", torch.zeros(1, dtype=torch.long))

    @torch.no_grad()
    def _momentum_update_key_encoder(self) -> None:
        for param_q, param_k in zip(self.encoder_q.parameters(), self.encoder_k.parameters()):
            param_k.mul_(self.m).add_(param_q.mul(1.0 - self.m))

    @torch.no_grad()
    def _dequeue_and_enqueue(self, keys: torch.Tensor) -> None:
        keys = concat_all_gather(keys)
        batch_size = keys.shape[0]
        ptr = int(self.queue_ptr)  # host sync, as in the original
        assert self.K % batch_size == 0
        self.queue[:, ptr:ptr + batch_size] = keys.T
        self.queue_ptr[0] = (ptr + batch_size) % self.K

    @torch.no_grad()
    def _batch_shuffle(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        idx_shuffle = torch.randperm(x_gather.shape[0]).to(x.device)  # the original: .cuda()
        if num_gpus > 1:
            torch.distributed.broadcast(idx_shuffle, src=0)
        idx_unshuffle = torch.argsort(idx_shuffle)
        rank, _ = _rank_and_world()
        idx_this = idx_shuffle.view(num_gpus, -1)[rank]
        return x_gather[idx_this], idx_unshuffle

    @torch.no_grad()
    def _batch_unshuffle(self, x: torch.Tensor, idx_unshuffle: torch.Tensor) -> torch.Tensor:
        batch_size_this = x.shape[0]
        x_gather = concat_all_gather(x)
        num_gpus = x_gather.shape[0] // batch_size_this
        rank, _ = _rank_and_world()
        return x_gather[idx_unshuffle.view(num_gpus, -1)[rank]]

    def forward(self, im_q: torch.Tensor, im_k: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q = self.encoder_q(im_q)  # queries: N x C
        q = nn.functional.normalize(q, dim=1)
        with torch.no_grad():
            self._momentum_update_key_encoder()
            im_k, idx_unshuffle = self._batch_shuffle(im_k)
            k = self.encoder_k(im_k)  # keys: N x C
            k = nn.functional.normalize(k, dim=1)
            k = self._batch_unshuffle(k, idx_unshuffle)
        l_pos = torch.einsum("nc,nc->n", [q, k]).unsqueeze(-1)  # positive logits: N x 1
        l_neg = torch.einsum("nc,ck->nk", [q, self.queue.clone().detach()])  # negative logits: N x K
        logits = torch.cat([l_pos, l_neg], dim=1)  # logits: N x (1+K)
        logits /= self.T
        labels = torch.zeros(logits.shape[0], dtype=torch.long).to(logits.device)  # the original: .cuda()
        self._dequeue_and_enqueue(k)
        return logits, labels


def accuracy(output: torch.Tensor, target: torch.Tensor, topk=(1,)) -> list[torch.Tensor]:
    """main_moco.py ``accuracy``: top-k of the (1+K)-way contrastive classification, in percent."""
    with torch.no_grad():
        maxk = max(topk)
        batch_size = target.size(0)
        _, pred = output.topk(maxk, 1, True, True)
        pred = pred.t()
        correct = pred.eq(target.view(1, -1).expand_as(pred))
        return [correct[:k].reshape(-1).float().sum(0, keepdim=True).mul_(100.0 / batch_size) for k in topk]


def reference_optimizer(model: nn.Module, lr: float = 0.03) -> torch.optim.Optimizer:
    return torch.optim.SGD(model.parameters(), lr, momentum=0.9, weight_decay=1e-4)


def reference_step(model: ReferenceMoCo, optimizer: torch.optim.Optimizer, images: list[torch.Tensor],
                   device: torch.device, criterion: nn.Module | None = None) -> float:
    """One iteration of main_moco.py ``train``: copy in, forward, loss, accuracy, ``loss.item()``, SGD step."""
    criterion = criterion or nn.CrossEntropyLoss().to(device)
    im_q = images[0].to(device, non_blocking=True)
    im_k = images[1].to(device, non_blocking=True)
    output, target = model(im_q=im_q, im_k=im_k)
    loss = criterion(output, target)
    acc1, acc5 = accuracy(output, target, topk=(1, 5))
    value = loss.item()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return value


def reference_dataset(root: str, image_size: int = 224, blur_sigma=(0.1, 2.0)) -> torchvision.datasets.ImageFolder:
    return torchvision.datasets.ImageFolder(root, TwoCropsTransform(moco_v2_augmentation(image_size, blur_sigma)))


def reference_loader(root: str, image_size: int = 224, batch_size: int = 256, workers: int = 32,
                     blur_sigma=(0.1, 2.0), **kwargs) -> DataLoader:
    """main_moco.py's loader (single process: ``shuffle=True`` instead of the DistributedSampler; pinned memory
    whenever a GPU is present)."""
    return DataLoader(reference_dataset(root, image_size, blur_sigma), batch_size=batch_size, shuffle=True,
                      num_workers=workers, pin_memory=torch.cuda.is_available(), drop_last=True, **kwargs)
