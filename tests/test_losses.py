"""Losses against independent NumPy references (value and gradient w.r.t. q), the identities between them, and
the generic checks every registered loss must pass (backward works, finite at small τ, identical keys, bf16)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from ctbench.errors import UserError
from pretrain.losses import LOSSES, build_loss, loss_params

HPARAMS = {  # one non-trivial setting per loss with a reference below (another registered loss: its defaults)
    "moco": {"tau": 0.2},
    "jcl": {"tau": 0.2, "lam": 4.0},
    "eqco": {"tau": 0.2, "ref_negatives": 4096.0},
    "co2": {"tau": 0.2, "con_weight": 1.0, "tau_con": 0.05},
}


def _unit(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return F.normalize(torch.randn(*shape, generator=g, dtype=torch.float64), dim=-1)


def _inputs(n=4, m=1, k=7, d=8, per_query=False, seed=0):
    q = _unit(n, d, seed=seed)
    keys = _unit(n, m, d, seed=seed + 1)
    negs = _unit(n, k, d, seed=seed + 2) if per_query else _unit(k, d, seed=seed + 2)
    return q, keys, negs


# ---- independent references: plain loops over the batch, NumPy float64 -------------------------------------------

def _lse(v):
    v = np.asarray(v, dtype=np.float64)
    m = v.max()
    return m + math.log(np.exp(v - m).sum())


def _negs_of(negs, i):
    return negs[i] if negs.ndim == 3 else negs


def ref_moco(q, keys, negs, tau):
    total = 0.0
    for i in range(q.shape[0]):
        pos = q[i] @ keys[i, 0] / tau
        neg = [q[i] @ n / tau for n in _negs_of(negs, i)]
        total += -pos + _lse([pos, *neg])
    return total / q.shape[0]


def ref_jcl(q, keys, negs, tau, lam, tau_power=2):
    total = 0.0
    for i in range(q.shape[0]):
        ks = keys[i]
        mu = ks.mean(axis=0)
        sigma = sum(np.outer(k - mu, k - mu) for k in ks) / len(ks)
        pos = q[i] @ mu / tau
        aug = pos + lam / (2 * tau**tau_power) * (q[i] @ sigma @ q[i])
        neg = [q[i] @ n / tau for n in _negs_of(negs, i)]
        total += -pos + _lse([aug, *neg])
    return total / q.shape[0]


def ref_eqco(q, keys, negs, tau, ref_negatives):
    total = 0.0
    for i in range(q.shape[0]):
        ns = _negs_of(negs, i)
        pos = math.exp(q[i] @ keys[i, 0] / tau)
        neg = sum(math.exp(q[i] @ n / tau) for n in ns)
        total += -math.log(pos / (pos + ref_negatives / len(ns) * neg))
    return total / q.shape[0]


def _softmax(v):
    e = np.exp(np.asarray(v) - np.max(v))
    return e / e.sum()


def ref_co2(q, keys, negs, tau, con_weight, tau_con):
    con = 0.0
    for i in range(q.shape[0]):
        ns = _negs_of(negs, i)
        p = _softmax([keys[i, 0] @ n / tau_con for n in ns])
        qq = _softmax([q[i] @ n / tau_con for n in ns])
        kl_pq = sum(p[j] * math.log(p[j] / qq[j]) for j in range(len(ns)))
        kl_qp = sum(qq[j] * math.log(qq[j] / p[j]) for j in range(len(ns)))
        con += 0.5 * kl_pq + 0.5 * kl_qp
    return ref_moco(q, keys, negs, tau) + con_weight * con / q.shape[0]


REFS = {"moco": ref_moco, "jcl": ref_jcl, "eqco": ref_eqco, "co2": ref_co2}


def _numeric_grad(f, q, h=1e-6):
    g = np.zeros_like(q)
    for idx in np.ndindex(*q.shape):
        qp, qm = q.copy(), q.copy()
        qp[idx] += h
        qm[idx] -= h
        g[idx] = (f(qp) - f(qm)) / (2 * h)
    return g


@pytest.mark.parametrize("per_query", [False, True], ids=["queue", "per_query"])
@pytest.mark.parametrize("name", sorted(REFS))
def test_value_and_grad_match_numpy_reference(name, per_query):
    m = 3 if LOSSES[name].multi_key else 1
    q, keys, negs = _inputs(m=m, per_query=per_query)
    hp = HPARAMS[name]
    q = q.clone().requires_grad_(True)
    out = build_loss(name, **hp)(q, keys, negs)
    out.loss.backward()

    qn, kn, nn_ = q.detach().numpy(), keys.numpy(), negs.numpy()
    want = REFS[name](qn, kn, nn_, **hp)
    want_grad = _numeric_grad(lambda x: REFS[name](x, kn, nn_, **hp), qn)
    assert out.loss.dtype == torch.float64
    assert out.loss.item() == pytest.approx(want, rel=1e-10, abs=1e-10)
    np.testing.assert_allclose(q.grad.numpy(), want_grad, rtol=1e-5, atol=1e-7)


def test_jcl_with_one_key_is_infonce():
    q, keys, negs = _inputs(m=1)
    a = build_loss("jcl", tau=0.1, lam=4.0)(q, keys, negs).loss
    b = build_loss("moco", tau=0.1)(q, keys, negs).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_jcl_with_lambda_zero_uses_the_key_mean_and_identical_keys_reduce_to_infonce():
    q, keys, negs = _inputs(m=4)
    jcl0 = build_loss("jcl", tau=0.2, lam=0.0)(q, keys, negs).loss
    mu = keys.mean(dim=1, keepdim=True)
    assert jcl0.item() == pytest.approx(build_loss("moco", tau=0.2)(q, mu, negs).loss.item(), rel=1e-12)
    same = keys[:, :1].expand(-1, 5, -1)
    jcl_same = build_loss("jcl", tau=0.2, lam=4.0)(q, same, negs).loss
    assert jcl_same.item() == pytest.approx(build_loss("moco", tau=0.2)(q, keys[:, :1], negs).loss.item(), rel=1e-12)


def test_jcl_variance_term_raises_the_loss():
    q, keys, negs = _inputs(m=5)
    lo = build_loss("jcl", tau=0.2, lam=0.0)(q, keys, negs).loss
    hi = build_loss("jcl", tau=0.2, lam=4.0)(q, keys, negs).loss
    assert hi.item() > lo.item()


@pytest.mark.parametrize("per_query", [False, True], ids=["queue", "per_query"])
def test_eqco_with_alpha_equal_to_k_is_infonce(per_query):
    q, keys, negs = _inputs(k=16, per_query=per_query)
    a = build_loss("eqco", tau=0.2, ref_negatives=16.0)(q, keys, negs).loss
    b = build_loss("moco", tau=0.2)(q, keys, negs).loss
    assert a.item() == pytest.approx(b.item(), rel=1e-12)


def test_eqco_larger_alpha_gives_larger_loss():
    q, keys, negs = _inputs(k=16)
    assert build_loss("eqco", tau=0.2, ref_negatives=65536.0)(q, keys, negs).loss.item() > \
        build_loss("eqco", tau=0.2, ref_negatives=16.0)(q, keys, negs).loss.item()


def test_co2_with_alpha_zero_is_infonce():
    q, keys, negs = _inputs()
    a = build_loss("co2", tau=0.2, con_weight=0.0, tau_con=0.05)(q, keys, negs)
    b = build_loss("moco", tau=0.2)(q, keys, negs).loss
    assert a.loss.item() == pytest.approx(b.item(), rel=1e-12)
    assert a.terms["con"].item() > 0


def test_co2_consistency_term_has_gradient_wrt_q():
    q, keys, negs = _inputs()
    grads = []
    for weight in (0.0, 1.0):
        qq = q.clone().requires_grad_(True)
        build_loss("co2", tau=0.2, con_weight=weight, tau_con=0.05)(qq, keys, negs).loss.backward()
        grads.append(qq.grad)
    diff = (grads[1] - grads[0]).abs().max().item()
    assert diff > 1e-3, "the consistency term does not reach q (detached?)"


def test_co2_consistency_is_zero_when_query_equals_key():
    q, keys, negs = _inputs()
    out = build_loss("co2", tau=0.2, con_weight=1.0, tau_con=0.05)(keys[:, 0], keys, negs)
    assert out.terms["con"].item() == pytest.approx(0.0, abs=1e-12)


def test_jcl_ramps_lambda_through_the_per_epoch_hook():
    """The loss owns its schedule: the engine calls set_epoch on every loss, and logs what scheduled() returns."""
    assert loss_params("jcl") == ["tau", "lam", "lam_ramp", "tau_power"]
    jcl = build_loss("jcl", tau=0.2, lam=4.0)
    jcl.set_epoch(0, 4)
    assert jcl.scheduled() == {"lam": 1.0}  # λ_t = λ (epoch + 1) / epochs, the official code's ramp
    jcl.set_epoch(3, 4)
    assert jcl.lam == 4.0
    constant = build_loss("jcl", tau=0.2, lam=4.0, lam_ramp=False)
    constant.set_epoch(0, 4)
    assert constant.lam == 4.0
    moco = build_loss("moco")
    moco.set_epoch(0, 4)
    assert moco.scheduled() == {}


def test_jcl_tau_power_1_is_the_official_codes_positive_logit():
    """moco_unlimit_key_default.py: l_pos = q·(μ + ½ λ Σq), all logits / T, loss = CE + ½ λ qᵀΣq / T."""
    q, keys, negs = _inputs(m=3)
    tau, lam = 0.2, 2.0
    mu = keys.mean(1)
    centred = keys - mu[:, None]
    sigma = torch.einsum("nmd,nme->nde", centred, centred) / keys.shape[1]  # N x D x D
    sq = torch.einsum("nd,nde->ne", q, sigma)  # N x D
    l_pos = (q * (mu + 0.5 * lam * sq)).sum(1, keepdim=True)
    logits = torch.cat([l_pos, q @ negs.t()], 1) / tau
    isda = 0.5 * lam * (q * sq).sum(1).mean() / tau
    official = F.cross_entropy(logits, torch.zeros(q.shape[0], dtype=torch.long)) + isda
    ours = build_loss("jcl", tau=tau, lam=lam, lam_ramp=False, tau_power=1)(q, keys, negs).loss
    assert ours.item() == pytest.approx(official.item(), rel=1e-10)
    assert ours.item() == pytest.approx(ref_jcl(q.numpy(), keys.numpy(), negs.numpy(), tau, lam, 1), rel=1e-10)
    with pytest.raises(UserError, match="tau_power must be 2"):
        build_loss("jcl", tau_power=3)


def test_unknown_loss_and_hyperparameter_are_one_line_errors():
    with pytest.raises(UserError, match=r"^unknown loss 'jlc'; choose from co2, eqco, jcl, moco$"):
        build_loss("jlc")
    with pytest.raises(UserError, match="has no hyper-parameter 'lam'"):
        build_loss("moco", tau=0.2, lam=1.0)
    with pytest.raises(UserError, match="tau must be > 0"):
        build_loss("moco", tau=0.0)


def test_shape_errors_name_the_contract():
    q, keys, negs = _inputs(m=2)
    with pytest.raises(ValueError, match="one positive key"):
        build_loss("moco")(q, keys, negs)
    with pytest.raises(ValueError, match="negatives must be"):
        build_loss("moco")(q, keys[:, :1], negs[:, :3])


# ---- generic: every registered loss (with HPARAMS' setting, else its defaults) ------------------------------------

def _m(name):  # keys per query
    return 3 if LOSSES[name].multi_key else 1


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_backward_finite_and_only_q_gets_gradient(name):
    m = _m(name)
    q, keys, negs = (t.float() for t in _inputs(n=8, m=m, k=32, d=16))
    q.requires_grad_(True)
    keys.requires_grad_(True)
    negs.requires_grad_(True)
    out = build_loss(name, **HPARAMS.get(name, {}))(q, keys, negs)
    assert out.loss.dim() == 0 and out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(q.grad).all() and q.grad.abs().sum() > 0
    assert keys.grad is None and negs.grad is None
    assert all(not t.requires_grad and torch.isfinite(t) for t in out.terms.values())


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_finite_for_identical_keys_at_small_tau(name):
    hp = {**HPARAMS.get(name, {}), "tau": 0.05}
    v = _unit(1, 16).float()
    q = v.repeat(8, 1).requires_grad_(True)
    keys = v[None].repeat(8, 5 if LOSSES[name].multi_key else 1, 1)
    negs = v.repeat(64, 1)
    out = build_loss(name, **hp)(q, keys, negs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_finite_with_far_negatives_at_small_tau(name):
    hp = {**HPARAMS.get(name, {}), "tau": 0.05}
    if "tau_con" in hp:
        hp["tau_con"] = 0.01
    q, keys, negs = (t.float() for t in _inputs(n=8, m=_m(name), k=64, d=16))
    negs = torch.cat([negs, -q.detach()])  # logits down to -1/τ_con = -100
    q.requires_grad_(True)
    out = build_loss(name, **hp)(q, keys, negs)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(q.grad).all()


@pytest.mark.parametrize("name", sorted(LOSSES))
def test_every_loss_under_bf16_autocast(name):
    q32, keys32, negs32 = (t.float() for t in _inputs(n=8, m=_m(name), k=32, d=16))
    want = build_loss(name, **HPARAMS.get(name, {}))(q32, keys32, negs32).loss
    w = torch.eye(16, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        q = q32 @ w  # bf16 activations, as the encoder output under autocast
        assert q.dtype == torch.bfloat16
        out = build_loss(name, **HPARAMS.get(name, {}))(q, keys32.bfloat16(), negs32.bfloat16())
    assert out.loss.dtype == torch.float32
    out.loss.backward()
    assert torch.isfinite(w.grad).all() and w.grad.abs().sum() > 0
    assert out.loss.item() == pytest.approx(want.item(), rel=0.05)
