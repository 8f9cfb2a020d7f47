"""Contrastive losses: InfoNCE (MoCo), JCL, EqCo (and SiMo through it), CO2 — one plain registry.

    from pretrain.losses import build_loss
    loss_fn = build_loss("jcl", tau=0.2, lam=4.0)
    loss_fn.set_epoch(epoch, epochs)         # the loss's own schedule (JCL: λ ramped per epoch), every epoch start
    out = loss_fn(q, keys, negatives)        # out.loss: scalar; out.terms: detached extra values to log
    out.loss.backward()

Every loss takes the same three tensors (the contract in the repository's DESIGN.md):

- ``q``: (N, D) L2-normalised query embeddings (carry gradient);
- ``keys``: (N, M, D) L2-normalised positive keys from the momentum encoder (M = 1 except JCL), no gradient;
- ``negatives``: (K, D) shared by all queries (the queue), or (N, K, D) per query (SiMo's in-batch negatives).

A loss is a :class:`ContrastiveLoss`: its hyper-parameters are its ``Params`` dataclass (the fields are the keys
of the config's ``loss:`` section, ``validate`` checks their ranges, the defaults are the loss's), ``set_epoch`` is
its per-epoch schedule (the engine calls it on every loss) and ``scheduled()`` the values it logs with each metrics
row. Logits are computed in float32 with autocast off (float64 when ``q`` is float64), and every log-sum-exp is
the stable ``torch.logsumexp``, so τ = 0.05 and bf16 activations are safe. Queue and momentum encoder live in the
model (``pretrain.model``), not here.

References: MoCo (He et al. 2020, arXiv:1911.05722), JCL (Cai et al. 2020, arXiv:2009.14776, Eq. 8),
EqCo (Zhu et al. 2020, arXiv:2010.01929), CO2 (Wei et al. 2021, arXiv:2010.02217).

Adding a loss (pretrain/README.md, "Adding a loss"): its class with its ``Params``, one line in :data:`LOSSES`,
one preset; the generic tests (tests/test_losses.py) run on every registered loss.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from ctbench.config import check
from ctbench.errors import UserError, choices_error

__all__ = ["LOSSES", "CO2Loss", "ContrastiveLoss", "EqCoLoss", "JCLLoss", "LossOutput", "LossParams", "MoCoLoss",
           "build_loss", "loss_params"]


@dataclass
class LossOutput:
    """``loss``: the scalar to minimise; ``terms``: detached scalars worth logging (``acc`` = share of queries
    whose positive logit beats every negative)."""

    loss: torch.Tensor
    terms: dict[str, torch.Tensor] = field(default_factory=dict)


@dataclass
class LossParams:
    """The hyper-parameters of a loss with a temperature (every loss here): subclass it with the loss's own fields,
    each with its default and a comment, and extend ``validate`` (one-line errors naming ``loss.<key>``)."""

    tau: float = 0.2  # temperature

    def validate(self) -> None:
        check(self.tau > 0, f"loss.tau must be > 0, got {self.tau}")


class ContrastiveLoss(nn.Module):
    """Base of the registered losses: built from the fields of ``Params`` as keywords (validated), the values in
    ``self.hp``; ``forward(q, keys, negatives) -> LossOutput``. ``multi_key``: takes M > 1 keys per query (else
    ``data.num_keys`` must be 1)."""

    Params: ClassVar[type[LossParams]] = LossParams
    multi_key: ClassVar[bool] = False

    def __init__(self, **hparams: float):
        super().__init__()
        self.hp = self.Params(**hparams)
        self.hp.validate()

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Called by the engine at the start of every epoch (0-based ``epoch`` of ``epochs``): the loss's own
        schedule. None by default."""

    def scheduled(self) -> dict[str, float]:
        """The current values of scheduled hyper-parameters, logged with every metrics row (none by default)."""
        return {}


def _compute_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _prepare(q: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor):
    """Check shapes and cast to the compute dtype (float32, or float64 when given float64)."""
    if q.dim() != 2:
        raise ValueError(f"q must be (N, D), got shape {tuple(q.shape)}")
    if keys.dim() != 3 or keys.shape[0] != q.shape[0] or keys.shape[2] != q.shape[1]:
        raise ValueError(f"keys must be (N, M, D) = ({q.shape[0]}, M, {q.shape[1]}), got {tuple(keys.shape)}")
    if negatives.dim() == 2:
        ok = negatives.shape[1] == q.shape[1]
    elif negatives.dim() == 3:
        ok = negatives.shape[0] == q.shape[0] and negatives.shape[2] == q.shape[1]
    else:
        ok = False
    if not ok:
        raise ValueError(f"negatives must be (K, D) or (N, K, D) with D = {q.shape[1]}, got {tuple(negatives.shape)}")
    dt = _compute_dtype(q)
    return q.to(dt), keys.detach().to(dt), negatives.detach().to(dt)


def negative_logits(x: torch.Tensor, negatives: torch.Tensor, tau: float) -> torch.Tensor:
    """``x·n_j / τ`` for shared (K, D) or per-row (N, K, D) negatives.  Returns N x K."""
    if negatives.dim() == 2:
        return x @ negatives.t() / tau  # N x K
    return torch.einsum("nd,nkd->nk", x, negatives) / tau  # N x K


def _single_key(keys: torch.Tensor, name: str) -> torch.Tensor:
    if keys.shape[1] != 1:
        raise ValueError(f"the {name} loss takes one positive key per query (keys N x 1 x D), got M = "
                         f"{keys.shape[1]}; use the jcl loss for several keys")
    return keys[:, 0]  # N x D


def _accuracy(l_pos: torch.Tensor, l_neg: torch.Tensor) -> torch.Tensor:
    if l_neg.shape[1] == 0:
        return torch.ones((), device=l_pos.device)
    return (l_pos > l_neg.max(dim=1).values).float().mean().detach()


class MoCoLoss(ContrastiveLoss):
    """InfoNCE: ``-log( e^{q·k/τ} / (e^{q·k/τ} + Σ_j e^{q·n_j/τ}) )``, mean over the batch.

    Shape:
        q: (N, D); keys: (N, 1, D); negatives: (K, D) or (N, K, D); output ``loss``: scalar.
    """

    def forward(self, q: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        tau = self.hp.tau
        with torch.autocast(q.device.type, enabled=False):
            q, keys, negatives = _prepare(q, keys, negatives)
            k = _single_key(keys, "moco")
            l_pos = (q * k).sum(dim=1) / tau  # N
            l_neg = negative_logits(q, negatives, tau)  # N x K
            logits = torch.cat([l_pos[:, None], l_neg], dim=1)  # N x (1+K)
            loss = (torch.logsumexp(logits, dim=1) - l_pos).mean()
            return LossOutput(loss, {"acc": _accuracy(l_pos, l_neg), "pos_sim": (l_pos * tau).mean().detach()})


@dataclass
class JCLParams(LossParams):
    lam: float = 4.0  # λ, weight of the variance term
    lam_ramp: bool = True  # λ_t = λ (epoch + 1) / epochs, as the official code; false: the constant λ
    # τ's power in the variance term's λ/(2τ^p): 2 = the paper's Eq. 8 (the Gaussian moment generating function of
    # q·k/τ); 1 = the official code (caiqi/Joint-Contrastive-Learning moco/moco_unlimit_key_default.py adds
    # 0.5·λ_t·Σq to μ in the positive logit and then divides every logit by T once): 1/τ = 5 times weaker at τ 0.2
    tau_power: int = 2

    def validate(self) -> None:
        super().validate()
        check(self.lam >= 0, f"loss.lam must be >= 0, got {self.lam}")
        check(self.tau_power in (1, 2), "loss.tau_power must be 2 (the JCL paper's λ/(2τ²)) or 1 (the official "
              f"code's λ/(2τ)), got {self.tau_power}")


class JCLLoss(ContrastiveLoss):
    """JCL's upper bound (Cai et al. 2020, Eq. 8) on the expected InfoNCE over the M positive keys.

    With μ = mean of the M keys (not re-normalised) and Σ their biased (÷M) covariance, both per sample and
    detached: ``-q·μ/τ + log( exp(q·μ/τ + λ/(2τ²)·qᵀΣq) + Σ_j e^{q·n_j/τ} )``. ``qᵀΣq`` is computed as
    ``mean_m (q·(k_m - μ))²`` without forming the D x D matrix. With M = 1, Σ = 0 and this is InfoNCE.
    ``tau_power=1`` gives the official code's ``λ/(2τ)`` in place of the paper's ``λ/(2τ²)``.
    ``lam`` is λ_t, set per epoch by :meth:`set_epoch` (λ_t = λ (epoch + 1) / epochs, as the official code).

    Shape:
        q: (N, D); keys: (N, M, D); negatives: (K, D) or (N, K, D); output ``loss``: scalar.
    """

    Params = JCLParams
    multi_key = True

    def __init__(self, **hparams: float):
        super().__init__(**hparams)
        self.lam = float(self.hp.lam)

    def set_epoch(self, epoch: int, epochs: int) -> None:
        self.lam = self.hp.lam * (epoch + 1) / epochs if self.hp.lam_ramp else float(self.hp.lam)

    def scheduled(self) -> dict[str, float]:
        return {"lam": self.lam}

    def forward(self, q: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        tau = self.hp.tau
        with torch.autocast(q.device.type, enabled=False):
            q, keys, negatives = _prepare(q, keys, negatives)
            mu = keys.mean(dim=1)  # N x D
            centred = keys - mu[:, None, :]  # N x M x D
            var_q = torch.einsum("nd,nmd->nm", q, centred).pow(2).mean(dim=1)  # N: qᵀΣq
            l_pos = (q * mu).sum(dim=1) / tau  # N
            var_term = self.lam / (2 * tau**self.hp.tau_power) * var_q  # N
            l_aug = l_pos + var_term  # N
            l_neg = negative_logits(q, negatives, tau)  # N x K
            logits = torch.cat([l_aug[:, None], l_neg], dim=1)  # N x (1+K)
            loss = (torch.logsumexp(logits, dim=1) - l_pos).mean()
            return LossOutput(loss, {"acc": _accuracy(l_pos, l_neg), "pos_sim": (l_pos * tau).mean().detach(),
                                     "var_term": var_term.mean().detach()})


@dataclass
class EqCoParams(LossParams):
    # α: the number of negatives the loss is made equivalent to (EqCo: 65536 with a queue of K = 256; SiMo: α = K)
    ref_negatives: float = 65536.0

    def validate(self) -> None:
        super().validate()
        check(self.ref_negatives > 0, "loss.ref_negatives (EqCo's α, the number of negatives the loss is made "
              f"equivalent to) must be > 0, got {self.ref_negatives}")


class EqCoLoss(ContrastiveLoss):
    """EqCo: ``-log( e^{q·k/τ} / (e^{q·k/τ} + (α/K) Σ_j e^{q·n_j/τ}) )``; α = K gives InfoNCE.

    α (``ref_negatives``) is the number of negatives the loss is made equivalent to (EqCo: 65536 with a queue of
    K = 256; SiMo: α = K = 256 with in-batch negatives). K is read from ``negatives``.

    Shape:
        q: (N, D); keys: (N, 1, D); negatives: (K, D) or (N, K, D); output ``loss``: scalar.
    """

    Params = EqCoParams

    def forward(self, q: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        tau = self.hp.tau
        with torch.autocast(q.device.type, enabled=False):
            q, keys, negatives = _prepare(q, keys, negatives)
            k = _single_key(keys, "eqco")
            l_pos = (q * k).sum(dim=1) / tau  # N
            l_neg = negative_logits(q, negatives, tau)  # N x K
            n_neg = l_neg.shape[1]
            shift = math.log(self.hp.ref_negatives / n_neg) if n_neg else 0.0
            logits = torch.cat([l_pos[:, None], l_neg + shift], dim=1)  # N x (1+K)
            loss = (torch.logsumexp(logits, dim=1) - l_pos).mean()
            return LossOutput(loss, {"acc": _accuracy(l_pos, l_neg), "pos_sim": (l_pos * tau).mean().detach()})


@dataclass
class CO2Params(LossParams):
    con_weight: float = 1.0  # α, weight of the consistency term
    tau_con: float = 0.05  # temperature of the consistency term

    def validate(self) -> None:
        super().validate()
        check(self.tau_con > 0, f"loss.tau_con must be > 0, got {self.tau_con}")
        check(self.con_weight >= 0, f"loss.con_weight (CO2's α) must be >= 0, got {self.con_weight}")


class CO2Loss(ContrastiveLoss):
    """CO2: InfoNCE + α·L_con (α = ``con_weight``) with ``L_con = ½ KL(P‖Q) + ½ KL(Q‖P)``.

    ``P(i) = softmax_i(k·n_i/τ_con)`` (positive key vs the K negatives; a pseudo label, no gradient) and
    ``Q(i) = softmax_i(q·n_i/τ_con)`` (query vs the same negatives); the positive is in neither. The gradient of
    L_con reaches ``q`` through Q (lightly's regulariser returned a detached copy, so it never trained).

    Shape:
        q: (N, D); keys: (N, 1, D); negatives: (K, D) or (N, K, D); output ``loss``: scalar.
    """

    Params = CO2Params

    def forward(self, q: torch.Tensor, keys: torch.Tensor, negatives: torch.Tensor) -> LossOutput:
        tau, tau_con = self.hp.tau, self.hp.tau_con
        with torch.autocast(q.device.type, enabled=False):
            q, keys, negatives = _prepare(q, keys, negatives)
            k = _single_key(keys, "co2")
            l_pos = (q * k).sum(dim=1) / tau  # N
            l_neg = negative_logits(q, negatives, tau)  # N x K
            logits = torch.cat([l_pos[:, None], l_neg], dim=1)  # N x (1+K)
            inst = (torch.logsumexp(logits, dim=1) - l_pos).mean()
            log_p = F.log_softmax(negative_logits(k, negatives, tau_con), dim=1)  # N x K, no gradient
            log_q = F.log_softmax(negative_logits(q, negatives, tau_con), dim=1)  # N x K
            kl_pq = (log_p.exp() * (log_p - log_q)).sum(dim=1)  # N
            kl_qp = (log_q.exp() * (log_q - log_p)).sum(dim=1)  # N
            con = (0.5 * kl_pq + 0.5 * kl_qp).mean()
            return LossOutput(inst + self.hp.con_weight * con,
                              {"acc": _accuracy(l_pos, l_neg), "pos_sim": (l_pos * tau).mean().detach(),
                               "inst": inst.detach(), "con": con.detach()})


LOSSES: dict[str, type[ContrastiveLoss]] = {  # name -> loss; a new loss is one more line here
    "moco": MoCoLoss,
    "jcl": JCLLoss,
    "eqco": EqCoLoss,
    "co2": CO2Loss,
}


def loss_params(name: str) -> list[str]:
    """Hyper-parameter names a registered loss takes (the fields of its ``Params``)."""
    if name not in LOSSES:
        raise choices_error("loss", name, LOSSES)
    return [f.name for f in dataclasses.fields(LOSSES[name].Params)]


def build_loss(name: str, **hparams: float) -> ContrastiveLoss:
    """The registered loss ``name`` built with ``hparams`` (its ``Params`` defaults for the others); unknown
    names or hyper-parameters and out-of-range values -> UserError."""
    allowed = loss_params(name)
    unknown = sorted(set(hparams) - set(allowed))
    if unknown:
        raise UserError(f"loss {name!r} has no hyper-parameter {unknown[0]!r}; choose from {', '.join(allowed)}")
    return LOSSES[name](**hparams)
