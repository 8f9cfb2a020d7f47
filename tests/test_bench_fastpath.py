"""The fast-path pieces against their plain versions, on the CPU: the fused (foreach) momentum update vs MoCo's
loop, bf16 autocast + channels_last steps, the reference MoCo v2 step, and the reference augmentation vs ours."""

from __future__ import annotations

import copy

import numpy as np
import torch
from PIL import Image

from benchmarks import fastpath as fp
from benchmarks.reference_moco import ReferenceMoCo, moco_v2_augmentation, reference_optimizer, reference_step
from ctbench.imagefolder import seeded
from pretrain.data import build_augmentation
from pretrain.model import ContrastiveModel


class _Pair(torch.nn.Module):
    """Stands in for ContrastiveModel in its momentum update (small encoders with BN buffers, θ_q != θ_k)."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.momentum = 0.999
        self.encoder_q = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3), torch.nn.BatchNorm2d(8), torch.nn.Flatten(),
                                             torch.nn.Linear(8 * 30 * 30, 16))
        self.encoder_k = copy.deepcopy(self.encoder_q)
        with torch.no_grad():
            for p in self.encoder_q.parameters():
                p.add_(torch.randn_like(p) * 0.01)
            self.encoder_q[1].running_mean.add_(0.1)


def test_foreach_momentum_update_equals_the_loop():
    """``ContrastiveModel.momentum_update`` (torch._foreach_mul_ + _foreach_add_(alpha=1-m)) vs MoCo's
    ``param_k.mul_(m).add_(param_q.mul(1 - m))``: equal up to float32 rounding of the operands (the fused add
    computes k + (1-m) q without rounding (1-m) q first), after 3 updates."""
    a = _Pair()
    b = copy.deepcopy(a)
    for _ in range(3):
        ContrastiveModel.momentum_update(a)
        fp.loop_momentum_update(b)
    worst = 0.0
    for pa, pb, pq in zip(a.encoder_k.parameters(), b.encoder_k.parameters(), b.encoder_q.parameters()):
        ulp = torch.finfo(torch.float32).eps * (pb.abs() + pq.abs()).clamp_min(torch.finfo(torch.float32).tiny)
        worst = max(worst, float(((pa - pb).abs() / ulp).max().detach()))
    assert worst <= 4.0, f"foreach EMA differs from the loop by {worst:.1f} ulp"
    for ba, bb, bq in zip(a.encoder_k.buffers(), b.encoder_k.buffers(), a.encoder_q.buffers()):
        assert torch.equal(ba, bb) and torch.equal(ba, bq)  # buffers copied from the query encoder by both


def test_foreach_formulation_with_rounded_product_is_bit_exact():
    """Written as mul then add (``_foreach_add_(k, _foreach_mul(q, 1 - m))``) the fused update equals the loop
    bit for bit — the change that makes the engine's update exact (see benchmarks/README.md)."""
    g = torch.Generator().manual_seed(0)
    q = [torch.randn(257, 33, generator=g) for _ in range(4)]
    k1 = [torch.randn(257, 33, generator=g) for _ in range(4)]
    k2 = [t.clone() for t in k1]
    m = 0.999
    for _ in range(3):
        for pk, pq in zip(k1, q):
            pk.mul_(m).add_(pq.mul(1.0 - m))
        torch._foreach_mul_(k2, m)
        torch._foreach_add_(k2, torch._foreach_mul(q, 1.0 - m))
    assert all(torch.equal(a, b) for a, b in zip(k1, k2))


def _images(n, views, size, seed=0):
    return torch.randn(n, views, 3, size, size, generator=torch.Generator().manual_seed(seed))


def test_bf16_channels_last_step_runs_with_finite_loss_on_cpu():
    cfg = fp.method_config("moco_v2", batch=4, image_size=32, queue_size=16)
    sw = fp.Switches(bf16=True, channels_last=True, foreach_ema=True, compile=False, no_sync=True)
    step = fp.build_ours(cfg, torch.device("cpu"), sw)
    conv = step.model.encoder_q.conv1.weight
    assert conv.is_contiguous(memory_format=torch.channels_last)
    x = _images(4, 2, 32)
    queue_before = step.model.queue.clone()
    step(x)
    losses = step.drain()
    assert len(losses) == 1 and all(np.isfinite(losses))
    assert int(step.model.queue_ptr) == 4 and not torch.equal(step.model.queue, queue_before)


def test_plain_and_fast_switches_give_the_same_first_loss():
    """fp32 NCHW loop-EMA synced step vs fp32 channels_last foreach no-sync step: same model, same loss."""
    cfg = fp.method_config("moco_v2", batch=4, image_size=32, queue_size=16)
    x = _images(4, 2, 32, seed=1)
    plain = fp.build_ours(cfg, torch.device("cpu"), fp.Switches(bf16=False, channels_last=False, foreach_ema=False,
                                                                  no_sync=False, split_bn=False))
    fast = fp.build_ours(cfg, torch.device("cpu"), fp.Switches(bf16=False, channels_last=True, foreach_ema=True,
                                                                 no_sync=True, split_bn=False))
    plain(x)
    fast(x)
    a, b = plain.drain()[0], fast.drain()[0]
    assert abs(a - b) < 1e-4 * max(1.0, abs(a))


class _TinyEncoder(torch.nn.Module):
    """Stands in for torchvision's ResNet-50 in ReferenceMoCo (same ``num_classes`` / ``fc`` interface)."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.BatchNorm2d(16),
                                        torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.fc = torch.nn.Linear(16, num_classes)

    def forward(self, x):
        return self.fc(self.body(x))


def test_reference_step_follows_moco():
    torch.manual_seed(0)
    model = ReferenceMoCo(base_encoder=_TinyEncoder, K=16)
    assert isinstance(model.encoder_q.fc, torch.nn.Sequential)  # v2's MLP head replaced fc
    opt = reference_optimizer(model)
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    q_before = [p.clone() for p in model.encoder_q.parameters()]
    queue_before = model.queue.clone()
    x = _images(4, 2, 32)
    loss = reference_step(model, opt, [x[:, 0], x[:, 1]], torch.device("cpu"), torch.nn.CrossEntropyLoss())
    assert np.isfinite(loss) and int(model.queue_ptr) == 4
    for pk, kb, qb in zip(model.encoder_k.parameters(), k_before, q_before):  # θ_k = m θ_k + (1-m) θ_q (θ_k = θ_q)
        torch.testing.assert_close(pk, kb.mul(0.999).add(qb.mul(0.001)), rtol=0, atol=0)
    assert not all(torch.equal(p, b) for p, b in zip(model.encoder_q.parameters(), q_before))  # SGD stepped
    assert torch.equal(model.queue[:, 4:], queue_before[:, 4:]) and not torch.equal(model.queue[:, :4],
                                                                                     queue_before[:, :4])
    torch.testing.assert_close(model.queue.norm(dim=0), torch.ones(16))


def test_reference_augmentation_equals_ours_under_the_same_seed():
    """Both follow main_moco.py's aug-plus: the same seed gives the same tensor."""
    rng = np.random.default_rng(0)
    img = Image.fromarray(rng.integers(0, 256, (30, 40, 3), dtype=np.uint8)).resize((80, 60))
    ref, ours = moco_v2_augmentation(32, (0.1, 2.0)), build_augmentation("moco_v2", 32, blur_sigma=(0.1, 2.0))
    for seed in range(5):
        with seeded(seed):
            a = ref(img)
        with seeded(seed):
            b = ours(img)
        assert torch.equal(a, b)


def test_ghost_bn_loop_switch_equals_the_engines_one_pass():
    """The ``ghost_bn=off`` rows (the sub-batches through each encoder one by one, same permutation draw) give the
    engine's one-pass queries and keys: the switch changes the speed, not the result."""
    torch.manual_seed(0)
    model = ContrastiveModel(head="mlp", queue_size=16, shuffle_bn="split", bn_splits=4).train()
    x = _images(4, 2, 64, seed=3)  # N x M x 3 x S x S: 8 key images, 2 per sub-batch (64 px: layer4 is 2 x 2)
    keys = model.encode_keys(x, torch.Generator().manual_seed(5))
    keys_loop = fp.encode_keys_loop(model, x, torch.Generator().manual_seed(5))
    assert float((keys_loop - keys).norm() / keys.norm()) < 1e-3  # float rounding (convolutions at another batch)
    q_x = _images(8, 1, 64, seed=4)[:, 0]
    with torch.no_grad():
        q, q_loop = model.encode_queries(q_x), fp.encode_queries_loop(model, q_x)
    assert float((q_loop - q).norm() / q.norm()) < 1e-3
    for m in model.encoder_k.modules():  # one group = plain BN over the whole key batch: other keys
        if isinstance(m, fp.GhostBatchNorm):
            m.groups = 1
    one_group = model.encode_keys(x, torch.Generator().manual_seed(5))
    assert float((one_group - keys).norm() / keys.norm()) > 1e-2  # the sub-batch statistics matter


def test_reference_split_bn_is_the_engines_ghost_bn():
    """Equal semantics in the benchmark: MoCo's notebook SplitBatchNorm (the reference at bn_splits 8) and the
    engine's GhostBatchNorm give the same outputs and running statistics."""
    from benchmarks.reference_moco import SplitBatchNorm

    torch.manual_seed(0)
    ref = SplitBatchNorm(6, num_splits=4)
    with torch.no_grad():
        ref.weight.uniform_(0.5, 1.5)
        ref.bias.uniform_(-1, 1)
    ghost = fp.GhostBatchNorm(copy.deepcopy(ref), 4)
    x = torch.randn(16, 6, 5, 5)
    torch.testing.assert_close(ghost(x), ref(x))
    torch.testing.assert_close(ghost.running_mean, ref.running_mean)
    torch.testing.assert_close(ghost.running_var, ref.running_var)
    model = ReferenceMoCo(K=16, bn_splits=8)
    assert sum(isinstance(m, SplitBatchNorm) for m in model.encoder_k.modules()) == 53
