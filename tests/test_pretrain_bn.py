"""The BN flavours of the recipes (pretrain.model).

- Ghost-BN, the one-process emulation of 8 GPUs' BN: one pass equals the sub-batch loop (outputs, gradients,
  running statistics as MoCo's notebook SplitBatchNorm; sub-batch g = rows g, g + G, ...), in NCHW (one
  batch_norm call) and channels-last; in a split-mode model queries and keys are normalised in the same number and
  size of sub-batches (queries: the GPU slices of the sampler; keys: a random permutation's), JCL's M keys in one
  pass of N M images included.
- Global BN (SiMo, cvpods NaiveSyncBatchNorm): under 2-process gloo it equals BN over the global batch, in outputs,
  input and parameter gradients and running statistics; the model SiMo's config builds has it in the backbone and
  the head of both encoders, no shuffle, zero-init γ, head weights N(0, 0.01); its queries and keys on 2 processes
  equal those of one process over the whole batch.

This file is also the worker torchrun starts: ``python tests/test_pretrain_bn.py OUT`` (see ``_worker``).
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

from pretrain.config import resolve_config
from pretrain.data import EpochBatchSampler
from pretrain.engine import build_model, resolve_bn
from pretrain.model import ContrastiveModel, GhostBatchNorm, GlobalBatchNorm

REPO = Path(__file__).resolve().parent.parent
SIMO_SMALL = ["model.hidden_dim=16", "model.dim=8", "train.batch_size=8"]


def _bn(dim: int, channels: int = 5) -> nn.modules.batchnorm._BatchNorm:
    torch.manual_seed(0)
    bn = (nn.BatchNorm1d if dim == 2 else nn.BatchNorm2d)(channels).double()
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-1, 1)
        bn.running_mean.uniform_(-1, 1)
        bn.running_var.uniform_(0.5, 2)
    return bn


@pytest.mark.parametrize("shape, channels_last", [((12, 5), False), ((12, 5, 3, 3), False), ((12, 5, 3, 3), True)])
def test_ghost_bn_one_pass_equals_the_sub_batch_loop(shape, channels_last):
    ref = _bn(len(shape))
    ghost = GhostBatchNorm(copy.deepcopy(ref), 3)
    loop = [copy.deepcopy(ref) for _ in range(3)]  # each sub-batch through its own copy of the layer
    x = torch.randn(*shape, dtype=torch.float64)
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    coef = torch.randn(*shape, dtype=torch.float64)
    xa, xb = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    ya = ghost(xa)
    yb = torch.stack([bn(xb[j::3]) for j, bn in enumerate(loop)], dim=1).flatten(0, 1)  # sample i in group i mod 3
    torch.testing.assert_close(ya, yb)
    if channels_last:
        assert ya.is_contiguous(memory_format=torch.channels_last)  # the layout the next convolution expects
    (ya * coef).sum().backward()
    (yb * coef).sum().backward()
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ghost.weight.grad, sum(bn.weight.grad for bn in loop))
    torch.testing.assert_close(ghost.bias.grad, sum(bn.bias.grad for bn in loop))
    # running statistics: the mean of what each sub-batch's update gives (MoCo notebook's SplitBatchNorm)
    torch.testing.assert_close(ghost.running_mean, torch.stack([bn.running_mean for bn in loop]).mean(0))
    torch.testing.assert_close(ghost.running_var, torch.stack([bn.running_var for bn in loop]).mean(0))
    assert int(ghost.num_batches_tracked) == 1
    plain = ref(x)  # one BN over the whole batch: other statistics, so the sub-batches matter
    assert not torch.allclose(ya, plain, atol=1e-3)
    ref_eval = copy.deepcopy(ref).eval()
    ref_eval.load_state_dict(ghost.state_dict())
    torch.testing.assert_close(ghost.eval()(x), ref_eval(x))  # eval mode: plain BN with the running statistics
    assert set(ghost.state_dict()) == set(ref.state_dict())
    with pytest.raises(ValueError, match="does not split into 3 equal sub-batches"):
        ghost.train()(x[:10])


def test_split_queries_are_the_gpu_slices_of_the_sampler():
    """Sub-batch g of a one-process batch (sample i -> i mod G) holds exactly the images GPU g of G processes gets
    for the same step from pretrain.data's sampler."""
    g, batch = 4, 16
    one = [i for i, _ in next(iter(EpochBatchSampler(64, batch, 1, 0, seed=3)))]
    for rank in range(g):
        slice_ = [i for i, _ in next(iter(EpochBatchSampler(64, batch // g, g, rank, seed=3)))]
        assert one[rank::g] == slice_  # GhostBatchNorm's sub-batch `rank`


def _one_group(module: nn.Module) -> None:
    for m in module.modules():
        if isinstance(m, GhostBatchNorm):
            m.groups = 1


def test_split_mode_normalises_queries_and_keys_in_the_same_sub_batches():
    """One-process split mode: every BN of both encoders (backbone and head) is a 4-group ghost-BN; the one-pass
    queries and keys (and the query gradients) equal encoding each sub-batch alone: queries i -> i mod 4, keys
    the rows j, j + 4 of the step's random permutation, 2 images per sub-batch in both."""
    torch.manual_seed(0)
    model = ContrastiveModel(head="mlp_bn", dim=8, hidden_dim=16, queue_size=0, shuffle_bn="split", bn_splits=4)
    model = model.double().train()
    for enc in (model.encoder_q, model.encoder_k):
        bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == 53 + 2 and all(isinstance(m, GhostBatchNorm) and m.groups == 4 for m in bns)
    x = torch.randn(8, 2, 3, 32, 32, dtype=torch.float64)  # N x (1 + M) x 3 x H x W
    loop = copy.deepcopy(model)
    _one_group(loop)

    q = model.encode_queries(x[:, 0])  # N x D, one pass
    q_loop = torch.empty_like(q)
    for g in range(4):
        idx = torch.arange(g, 8, 4)  # the sub-batch of GPU g
        q_loop[idx] = nn.functional.normalize(loop.encoder_q(x[idx, 0]), dim=1).float()
    torch.testing.assert_close(q, q_loop)
    coef = torch.randn_like(q)
    (q * coef).sum().backward()
    (q_loop * coef).sum().backward()
    for (name, p), p_loop in zip(model.encoder_q.named_parameters(), loop.encoder_q.parameters()):
        assert (p.grad - p_loop.grad).norm() <= 1e-6 * p_loop.grad.norm(), name  # float32 embeddings' rounding

    k = model.encode_keys(x[:, 1:], torch.Generator().manual_seed(5))  # N x 1 x D, one pass
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(5))  # the permutation encode_keys draws
    k_loop = torch.empty_like(k[:, 0])
    with torch.no_grad():
        for g in range(4):
            idx = perm[g::4]
            k_loop[idx] = nn.functional.normalize(loop.encoder_k(x[idx, 1]), dim=1).float()
    torch.testing.assert_close(k[:, 0], k_loop)

    whole = copy.deepcopy(loop)  # one BN group over the whole batch: different queries and keys
    assert not torch.allclose(whole.encode_queries(x[:, 0]), q, atol=1e-3)
    assert not torch.allclose(whole.encode_keys(x[:, 1:], torch.Generator().manual_seed(5)), k, atol=1e-3)


def test_jcl_keys_are_one_pass_of_n_m_images():
    """JCL's M keys go through the key encoder as ONE batch of N M images: in eval mode (running statistics) the
    keys equal encoding each view alone; in split mode (ghost-BN) they equal encoding each sub-batch of the step's
    permutation of the N M images alone (the per-view loop under ghost-BN semantics)."""
    torch.manual_seed(0)
    model = ContrastiveModel(head="mlp", dim=8, hidden_dim=16, queue_size=0, shuffle_bn="split", bn_splits=4).double()
    n, m = 4, 3
    x = torch.randn(n, m, 3, 32, 32, dtype=torch.float64)  # N x M x 3 x H x W
    calls = []
    hook = model.encoder_k.register_forward_hook(lambda mod, inp, out: calls.append(inp[0].shape[0]))
    model.eval()
    k = model.encode_keys(x, torch.Generator().manual_seed(1))  # N x M x D
    assert calls == [n * m]  # one forward of N M images
    hook.remove()
    with torch.no_grad():
        per_view = torch.stack([nn.functional.normalize(model.encoder_k(x[:, v]), dim=1) for v in range(m)], 1)
    torch.testing.assert_close(k, per_view.float())

    model.train()
    loop = copy.deepcopy(model)
    _one_group(loop)
    k = model.encode_keys(x, torch.Generator().manual_seed(7))
    perm = torch.randperm(n * m, generator=torch.Generator().manual_seed(7))
    flat = x.flatten(0, 1)
    k_loop = torch.empty(n * m, 8)
    with torch.no_grad():
        for g in range(4):
            idx = perm[g::4]  # 3 images per sub-batch, from any view
            k_loop[idx] = nn.functional.normalize(loop.encoder_k(flat[idx]), dim=1).float()
    torch.testing.assert_close(k, k_loop.view(n, m, 8))


def test_global_bn_on_one_process_is_bn_over_the_whole_batch():
    ref = _bn(4)
    gbn = GlobalBatchNorm(5).double()
    gbn.load_state_dict(ref.state_dict())
    x = torch.randn(8, 5, 3, 3, dtype=torch.float64)
    torch.testing.assert_close(gbn(x), ref(x))
    torch.testing.assert_close(gbn.running_var, ref.running_var)


@pytest.mark.parametrize("world", [1, 2])
def test_simo_builds_global_bn_in_backbone_and_heads_of_both_encoders_without_shuffle(world):
    """The resolved SiMo config builds (as the engine does, for 1 process and for 2 DDP ranks): GlobalBatchNorm
    for every BN of the backbone and the head of both encoders, no shuffle-BN and no split, zero-init γ in every
    bottleneck's last BN, head Linear(no bias) weights N(0, 0.01) and BN γ 1."""
    cfg = resolve_config("simo", overrides=SIMO_SMALL)
    assert resolve_bn(cfg, world) == ("off", 1)
    torch.manual_seed(0)
    model = build_model(cfg, world)
    assert model.shuffle_bn == "off" and model.bn_splits == 1 and model.sync_bn
    for enc in (model.encoder_q, model.encoder_k):
        bns = [m for m in enc.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert len(bns) == 53 + 2 and all(type(m) is GlobalBatchNorm for m in bns)
        assert isinstance(enc.fc[1], GlobalBatchNorm) and isinstance(enc.fc[4], GlobalBatchNorm)  # the head's
        gammas = [b.bn3.weight for b in enc.modules() if isinstance(b, torchvision.models.resnet.Bottleneck)]
        assert len(gammas) == 16 and all(bool((g == 0).all()) for g in gammas)
        assert enc.fc[0].bias is None and enc.fc[3].bias is None
        assert all(bool((enc.fc[i].weight == 1).all()) for i in (1, 4))
    keys = nn.functional.normalize(torch.randn(256, 1, 8), dim=-1)  # a global batch of 256 keys
    negatives = model.negatives(keys, torch.Generator().manual_seed(0))
    assert negatives.shape == (256, 255, 8)  # each query: the other 255 keys (simo.py NT_Xent with K 256)
    full = build_model(resolve_config("simo"), world).encoder_q.fc  # the 2048-2048-128 head: std measurable
    for linear in (full[0], full[3]):
        w = linear.weight.detach()
        assert abs(float(w.std()) - 0.01) < 3e-4 and abs(float(w.mean())) < 3e-4


def _worker(out: Path) -> None:
    """Each of 2 gloo ranks: a GlobalBatchNorm layer and SiMo's model on its half of one global batch."""
    from ctbench import distributed as D

    env = D.setup("cpu")
    rank = env.rank
    g = torch.Generator().manual_seed(0)
    x_all, coef = (torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    gbn = GlobalBatchNorm(5).double()
    gbn.load_state_dict(_bn(4).state_dict())
    x = x_all[rank * 4:(rank + 1) * 4].clone().requires_grad_(True)
    y = gbn(x)
    (y * coef[rank * 4:(rank + 1) * 4]).sum().backward()
    layer = {"y": y.detach(), "x_grad": x.grad, "w_grad": gbn.weight.grad, "b_grad": gbn.bias.grad,
             "running_mean": gbn.running_mean, "running_var": gbn.running_var}

    torch.manual_seed(0)
    model = build_model(resolve_config("simo", overrides=SIMO_SMALL), env.world_size).double().train()
    images = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    mine = images[rank * 4:(rank + 1) * 4]
    q = model.encode_queries(mine[:, 0])
    k = model.encode_keys(mine[:, 1:], torch.Generator().manual_seed(2))
    torch.save({"layer": layer, "q": q.detach(), "k": k, "kinds": sorted({type(m).__name__ for m in model.modules()
                                                                          if "Norm" in type(m).__name__})},
               out / f"rank{rank}.pt")
    D.teardown(env)


@pytest.mark.ddp
def test_global_bn_under_two_process_gloo_equals_bn_over_the_global_batch(tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(Path(__file__).resolve()), str(tmp_path)]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    r = [torch.load(tmp_path / f"rank{i}.pt", weights_only=False) for i in range(2)]

    g = torch.Generator().manual_seed(0)
    x_all, coef = (torch.randn(8, 5, 3, 3, generator=g, dtype=torch.float64) for _ in range(2))
    ref = _bn(4)
    x = x_all.clone().requires_grad_(True)
    y = ref(x)
    (y * coef).sum().backward()
    a, b = r[0]["layer"], r[1]["layer"]
    torch.testing.assert_close(torch.cat([a["y"], b["y"]]), y.detach())
    torch.testing.assert_close(torch.cat([a["x_grad"], b["x_grad"]]), x.grad)  # through the other rank's stats too
    torch.testing.assert_close(a["w_grad"] + b["w_grad"], ref.weight.grad)  # DDP sums (averages) these
    torch.testing.assert_close(a["b_grad"] + b["b_grad"], ref.bias.grad)
    for side in (a, b):
        torch.testing.assert_close(side["running_mean"], ref.running_mean)
        torch.testing.assert_close(side["running_var"], ref.running_var)

    # SiMo's model on 2 ranks = one process over the whole batch (global BN), queries and keys
    assert r[0]["kinds"] == r[1]["kinds"] == ["GlobalBatchNorm"]
    torch.manual_seed(0)
    model = build_model(resolve_config("simo", overrides=SIMO_SMALL), 1).double().train()
    images = torch.randn(8, 2, 3, 32, 32, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    q = model.encode_queries(images[:, 0])
    k = model.encode_keys(images[:, 1:], torch.Generator().manual_seed(2))
    torch.testing.assert_close(torch.cat([r[0]["q"], r[1]["q"]]), q.detach())
    torch.testing.assert_close(torch.cat([r[0]["k"], r[1]["k"]]), k)
    halves = torch.cat([model.encode_queries(images[:4, 0]), model.encode_queries(images[4:, 0])])
    assert not torch.allclose(halves, q, atol=1e-3)  # per-rank BN would give other queries


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
