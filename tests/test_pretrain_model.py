"""The contrastive model: heads and checkpoint names, strict loading into torchvision, the fused EMA and buffer
policy, shuffle-BN's permutation, in-batch negatives (SiMo) and the circular queue (JCL enqueues the key mean)."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
import torchvision

from pretrain.model import ContrastiveModel, build_encoder, query_backbone_state_dict

D = 16  # embedding dim for the tests


def _model(**kw) -> ContrastiveModel:
    torch.manual_seed(0)
    args = {"head": "mlp", "dim": D, "hidden_dim": 32, "momentum": 0.9, "queue_size": 8, "bn_splits": 2}
    return ContrastiveModel(**{**args, **kw})


@pytest.mark.parametrize("head, keys", [
    ("linear", {"fc.weight", "fc.bias"}),
    ("mlp", {"fc.0.weight", "fc.0.bias", "fc.2.weight", "fc.2.bias"}),
    ("mlp_bn", {"fc.0.weight", "fc.1.weight", "fc.1.bias", "fc.1.running_mean", "fc.1.running_var",
                "fc.1.num_batches_tracked", "fc.3.weight", "fc.4.weight", "fc.4.bias", "fc.4.running_mean",
                "fc.4.running_var", "fc.4.num_batches_tracked"}),
])
def test_heads_live_in_fc_and_the_backbone_loads_strictly_into_torchvision(head, keys):
    enc = build_encoder(head, dim=D, hidden_dim=32)
    sd = enc.state_dict()
    assert {k for k in sd if k.startswith("fc.")} == keys
    assert enc.eval()(torch.randn(2, 3, 32, 32)).shape == (2, D)
    model = _model(head=head)
    backbone = query_backbone_state_dict(model.state_dict())
    ref = torchvision.models.resnet50()
    ref.fc = torch.nn.Identity()
    ref.load_state_dict(backbone, strict=True)  # the saved query encoder minus its head is a torchvision ResNet-50


def test_state_dict_follows_the_moco_checkpoint_contract():
    sd = _model(queue_size=8).state_dict()
    prefixes = {k.split(".")[0] for k in sd}
    assert prefixes == {"encoder_q", "encoder_k", "queue", "queue_ptr"}
    assert sd["queue"].shape == (D, 8) and sd["queue_ptr"].dtype == torch.long
    assert not any(k.startswith("module.") for k in sd)
    assert torch.allclose(sd["queue"].norm(dim=0), torch.ones(8))


def test_momentum_update_is_the_ema_over_parameters_and_copies_buffers():
    model = _model(momentum=0.9)
    with torch.no_grad():
        for p in model.encoder_q.parameters():
            p.add_(torch.randn_like(p))
        for b in model.encoder_q.buffers():
            b.add_(1)
    k_before = [p.clone() for p in model.encoder_k.parameters()]
    model.momentum_update()
    for pk, pk0, pq in zip(model.encoder_k.parameters(), k_before, model.encoder_q.parameters()):
        torch.testing.assert_close(pk, 0.9 * pk0 + 0.1 * pq)
        assert not pk.requires_grad
    for bk, bq in zip(model.encoder_k.buffers(), model.encoder_q.buffers()):
        assert torch.equal(bk, bq)


def test_split_shuffle_bn_returns_keys_in_input_order():
    model = _model(bn_splits=3)
    x = torch.randn(6, 2, 3, 32, 32)  # N x M x 3 x H x W
    model.eval()  # running statistics: every sample is encoded independently of its sub-batch
    k = model.encode_keys(x, torch.Generator().manual_seed(0))
    with torch.no_grad():
        want = F.normalize(model.encoder_k(x.flatten(0, 1)), dim=1).view(6, 2, D)
    torch.testing.assert_close(k, want, rtol=1e-4, atol=1e-5)
    model.train()  # batch statistics of random sub-batches: the keys depend on the permutation
    a = model.encode_keys(x, torch.Generator().manual_seed(0))
    b = model.encode_keys(x, torch.Generator().manual_seed(0))
    c = model.encode_keys(x, torch.Generator().manual_seed(1))
    assert torch.equal(a, b) and not torch.allclose(a, c)


def test_in_batch_negatives_exclude_the_own_key():
    model = _model(queue_size=0)
    keys = F.normalize(torch.randn(5, 1, D), dim=-1)
    negs = model.negatives(keys, torch.Generator().manual_seed(0))
    assert negs.shape == (5, 4, D)
    for i in range(5):
        torch.testing.assert_close(negs[i], torch.cat([keys[:i, 0], keys[i + 1:, 0]]))
    sampled = _model(queue_size=0, batch_negatives=2).negatives(keys, torch.Generator().manual_seed(0))
    assert sampled.shape == (5, 2, D)
    for i in range(5):
        assert not (sampled[i] == keys[i, 0]).all(dim=1).any()
        assert not torch.equal(sampled[i, 0], sampled[i, 1])


def test_queue_negatives_are_the_queue():
    model = _model(queue_size=8)
    negs = model.negatives(torch.zeros(2, 1, D), torch.Generator())
    assert negs.shape == (8, D) and negs.data_ptr() == model.queue.data_ptr()


def test_enqueue_is_circular_and_stores_the_key_mean():
    model = _model(queue_size=8)
    batches = [F.normalize(torch.randn(3, 2, D), dim=-1) for _ in range(3)]  # JCL: M = 2 keys
    for b in batches:
        model.enqueue(b)
    assert model.queue_ptr.item() == 9 % 8
    means = torch.cat([b.mean(dim=1) for b in batches])  # 9 x D, μ not re-normalised
    torch.testing.assert_close(model.queue[:, 0], means[8])
    torch.testing.assert_close(model.queue[:, 1:8].t(), means[1:8])


@pytest.mark.parametrize("head", ["linear", "mlp", "mlp_bn"])
def test_every_query_parameter_gets_a_gradient_and_the_key_encoder_none(head):
    model = _model(head=head)
    x = torch.randn(4, 2, 3, 32, 32)
    gen = torch.Generator().manual_seed(0)
    model.momentum_update()
    q = model.encode_queries(x[:, 0])
    k = model.encode_keys(x[:, 1:], gen)
    loss = -(q * k[:, 0]).sum() + torch.logsumexp(q @ model.negatives(k, gen).t(), dim=1).sum()
    loss.backward()
    missing = [n for n, p in model.encoder_q.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing
    assert all(p.grad is None for p in model.encoder_k.parameters())


def test_zero_init_residual_zeroes_every_bottleneck_last_bn_in_both_encoders():
    default, zero = _model(), _model(zero_init_residual=True)
    for model, want_zero in ((default, False), (zero, True)):
        for enc in (model.encoder_q, model.encoder_k):
            gammas = [m.bn3.weight for m in enc.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
            assert len(gammas) == 16
            assert all(bool((g == 0).all()) == want_zero for g in gammas)
    # with every block the identity at init, two inputs' pooled features keep their input's similarity far better
    x = torch.randn(8, 3, 32, 32)
    x2 = x + 0.3 * torch.randn_like(x)
    sims = []
    for model in (default, zero):
        net = model.encoder_q
        net.fc, fc = torch.nn.Identity(), net.fc
        h, h2 = net.train()(x), net(x2)
        h, h2 = h - h.mean(0), h2 - h2.mean(0)
        sims.append(F.cosine_similarity(h, h2).mean().item())
        net.fc = fc
    assert sims[1] > sims[0] + 0.1, sims


def test_residual_gamma_sets_every_last_bn_and_lets_a_32px_network_see_past_the_top_left_corner():
    model = _model(zero_init_residual=True, residual_gamma=0.2)
    for enc in (model.encoder_q, model.encoder_k):
        gammas = [m.bn3.weight for m in enc.modules() if isinstance(m, torchvision.models.resnet.Bottleneck)]
        assert len(gammas) == 16 and all(bool((g == 0.2).all()) for g in gammas)
    # zero-init at 32 px: the residual branches are off, the stride-2 1x1 shortcuts keep one stem position of 8 x 8,
    # so the pooled feature at step 0 depends only on the top-left 12 x 12 pixels; with γ 0.2 on all of the image
    x = torch.randn(2, 3, 32, 32)
    y = x.clone()
    y[:, :, 12:, :], y[:, :, :12, 12:] = torch.randn(2, 3, 20, 32), torch.randn(2, 3, 12, 20)
    change = {}
    for gamma in (0.0, 0.2):
        torch.manual_seed(0)
        net = build_encoder("mlp", D, 32, residual_gamma=gamma).eval()
        net.fc = torch.nn.Identity()
        with torch.no_grad():
            change[gamma] = (net(x) - net(y)).abs().max().item() / net(x).abs().mean().item()
    assert change[0.0] == 0.0 and change[0.2] > 0.1, change


def test_simo_head_is_linear_without_bias_bn_and_normal_001_init_and_mocos_mlp_keeps_torch_init():
    """V2AI/SelfSup examples/simo simo.py: nn.init.normal_(linear.weight, std=0.01), BN γ = 1; MoCo v2's MLP
    (moco/builder.py) keeps nn.Linear's default init (uniform, std 1/sqrt(3 fan_in) = 0.0128 for 2048)."""
    torch.manual_seed(0)
    simo = build_encoder("mlp_bn").fc
    assert [type(m).__name__ for m in simo] == ["Linear", "BatchNorm1d", "ReLU", "Linear", "BatchNorm1d"]
    for lin in (simo[0], simo[3]):
        w = lin.weight.detach()
        assert lin.bias is None and abs(float(w.std()) - 0.01) < 3e-4 and abs(float(w.mean())) < 3e-4
    assert all(bool((simo[i].weight == 1).all()) and bool((simo[i].bias == 0).all()) for i in (1, 4))
    moco = build_encoder("mlp").fc
    assert abs(float(moco[0].weight.detach().std()) - 2048 ** -0.5 / 3 ** 0.5) < 3e-4
