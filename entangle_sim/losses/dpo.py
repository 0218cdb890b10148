"""DPOTrainer losses (TRL 1.10-1.16 `_compute_loss`): sigmoid (DPO), hinge, ipo, exo_pair, nca_pair,
robust, bco_pair, sppo_hard, aot, aot_unpaired, apo_zero, apo_down, discopop, sft, sigmoid_norm."""
from __future__ import annotations

import jax.numpy as jnp

from .base import EPS, FDIV_RKL, Hyper, beta_hyper, scores
from .registry import DPO_F, registered


# ---------------- DPOTrainer (TRL 1.10-1.16 `_compute_loss`) ----------------


@registered("sigmoid", "DPO: -log sigma(beta D)", (beta_hyper(), *DPO_F), trl="DPOTrainer:sigmoid",
      aliases=("dpo",), reference="theory §2.2 DPO, §10.2 sigmoid",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(scores(v, F, hp)))
def _sigmoid(v, F, *, beta, **hp):
    phi_w, phi_l = scores(v, F, hp)
    return -F.log_sigmoid(beta * (phi_w - phi_l))


@registered("hinge", "SLiC/RSO hinge: max(0, 1 - beta D)", (beta_hyper(), *DPO_F), trl="DPOTrainer:hinge",
      reference="theory §10.2 hinge",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(scores(v, F, hp)))
def _hinge(v, F, *, beta, **hp):
    phi_w, phi_l = scores(v, F, hp)
    return F.relu(1 - beta * (phi_w - phi_l))


def _dbar(v, F, hp):
    phi_w, phi_l = scores(v, F, hp)
    return phi_w / v.chosen_len - phi_l / v.rejected_len


@registered("ipo", "IPO (TRL, length-averaged): (Dbar - 1/(2 beta))^2", (beta_hyper(), *DPO_F),
      trl="DPOTrainer:ipo", aliases=("ipo_avg",), reference="theory §2.2 IPO (TRL form), §10.2 ipo",
      margin=lambda v, F, beta, **hp: _dbar(v, F, hp))
def _ipo(v, F, *, beta, **hp):
    return (_dbar(v, F, hp) - 1 / (2 * beta)) ** 2


EXO_EPS = Hyper("label_smoothing", 1e-3, "epsilon > 0 (TRL raises at its default 0; v0.11 used 1e-3)",
                lo=0.0, hi=1.0, lo_open=True, hi_open=True)


@registered("exo_pair", "EXO (pairwise): KL(q || 1-eps label), q = sigma(beta D)", (beta_hyper(), EXO_EPS, *DPO_F),
      trl="DPOTrainer:exo_pair", reference="theory §10.2 exo_pair")
def _exo_pair(v, F, *, beta, label_smoothing, **hp):
    phi_w, phi_l = scores(v, F, hp)
    z = beta * (phi_w - phi_l)
    # Log space: q = e^{log sigma(z)}, 1 - q = e^{log sigma(-z)}. Autodiff then forms
    # dq/dz = q sigma(-z) and d(1-q)/dz = -(1-q) sigma(z), keeping the e^{-|z|} factors that
    # sigma(z)(1 - sigma(z)) rounds to 0 at large |z| (incentives exact to beta*D ~ 700).
    log_q, log_1mq = F.log_sigmoid(z), F.log_sigmoid(-z)
    eps = label_smoothing
    return F.exp(log_q) * (log_q - F.log(1 - eps)) + F.exp(log_1mq) * (log_1mq - F.log(eps))


@registered("nca_pair", "NCA (pairwise): absolute per-response terms on raw log-ratios", (beta_hyper(), FDIV_RKL),
      trl="DPOTrainer:nca_pair", reference="TRL nca_pair (raw log-ratios; TRL 1.9 applied phi)")
def _nca_pair(v, F, *, beta, **hp):
    return (-F.log_sigmoid(beta * v.r_w) - F.log_sigmoid(-beta * v.r_w) / 2
            - F.log_sigmoid(-beta * v.r_l) / 2)


@registered("robust", "Robust DPO: unbiased under label-flip rate eps", (beta_hyper(), EPS, *DPO_F),
      trl="DPOTrainer:robust", reference="theory §10.2 robust",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(scores(v, F, hp)))
def _robust(v, F, *, beta, label_smoothing, **hp):
    phi_w, phi_l = scores(v, F, hp)
    z, eps = beta * (phi_w - phi_l), label_smoothing
    return (-(1 - eps) * F.log_sigmoid(z) + eps * F.log_sigmoid(-z)) / (1 - 2 * eps)


@registered("bco_pair", "BCO (pairwise): -log sigma(beta r_w) - log sigma(-beta r_l)", (beta_hyper(), FDIV_RKL),
      trl="DPOTrainer:bco_pair", reference="TRL bco_pair (raw log-ratios, no running-mean shift)")
def _bco_pair(v, F, *, beta, **hp):
    return -F.log_sigmoid(beta * v.r_w) - F.log_sigmoid(-beta * v.r_l)


@registered("sppo_hard", "SPPO (hard labels): (r_w - 1/(2beta))^2 + (r_l + 1/(2beta))^2",
      (beta_hyper(), FDIV_RKL), trl="DPOTrainer:sppo_hard", reference="TRL sppo_hard (raw log-ratios)")
def _sppo_hard(v, F, *, beta, **hp):
    return (v.r_w - 1 / (2 * beta)) ** 2 + (v.r_l + 1 / (2 * beta)) ** 2


def aot_loss(x, F, beta, eps):
    return -(1 - eps) * F.log_sigmoid(beta * x) - eps * F.log_sigmoid(-beta * x)


def _aot_batch(v, F, *, beta, label_smoothing, **hp):
    # Both sides sorted independently along the batch (raw log-probs; ignores f-divergence).
    x = jnp.sort(v.chosen_logps - v.rejected_logps) - jnp.sort(v.ref_chosen_logps - v.ref_rejected_logps)
    return aot_loss(x, F, beta, label_smoothing).mean()


def _aot_unpaired_batch(v, F, *, beta, label_smoothing, **hp):
    x = jnp.sort(v.r_w) - jnp.sort(v.r_l)
    return aot_loss(x, F, beta, label_smoothing).mean()


@registered("aot", "AOT (paired): sorted margins vs sorted reference margins (batch-coupled)", (beta_hyper(), EPS, FDIV_RKL),
      trl="DPOTrainer:aot", batch_coupled=True, batch_build=_aot_batch, reference="theory §10.2 aot")
def _aot(v, F, *, beta, label_smoothing, **hp):
    # A batch of one pair: the sort is the identity.
    return aot_loss((v.chosen_logps - v.rejected_logps) - (v.ref_chosen_logps - v.ref_rejected_logps),
                     F, beta, label_smoothing)


@registered("aot_unpaired", "AOT (unpaired): sorted r_w vs sorted r_l (batch-coupled)", (beta_hyper(), EPS, FDIV_RKL),
      trl="DPOTrainer:aot_unpaired", batch_coupled=True, batch_build=_aot_unpaired_batch,
      aliases=("aot_pair",), reference="theory §10.2 aot_unpaired")
def _aot_unpaired(v, F, *, beta, label_smoothing, **hp):
    return aot_loss(v.r_w - v.r_l, F, beta, label_smoothing)


@registered("apo_zero", "APO-zero: (1 - sigma(beta r_w)) + sigma(beta r_l)", (beta_hyper(), FDIV_RKL),
      trl="DPOTrainer:apo_zero", reference="TRL apo_zero (raw log-ratios)")
def _apo_zero(v, F, *, beta, **hp):
    return (1 - F.sigmoid(beta * v.r_w)) + F.sigmoid(beta * v.r_l)


@registered("apo_down", "APO-down: sigma(beta r_w) + (1 - sigma(beta (r_w - r_l)))", (beta_hyper(), FDIV_RKL),
      trl="DPOTrainer:apo_down", reference="TRL apo_down (raw log-ratios)")
def _apo_down(v, F, *, beta, **hp):
    return F.sigmoid(beta * v.r_w) + (1 - F.sigmoid(beta * (v.r_w - v.r_l)))


DISCOPOP_TAU = Hyper("discopop_tau", 0.05, "DiscoPOP modulation temperature", lo=0.0, lo_open=True)


@registered("discopop", "DiscoPOP: log-ratio modulated mix of logistic and exponential losses",
      (beta_hyper(), DISCOPOP_TAU, *DPO_F), trl="DPOTrainer:discopop", reference="theory §10.2 discopop",
      margin=lambda v, F, beta, **hp: beta * (lambda s: s[0] - s[1])(scores(v, F, hp)))
def _discopop(v, F, *, beta, discopop_tau, **hp):
    phi_w, phi_l = scores(v, F, hp)
    z = beta * (phi_w - phi_l)
    mu = F.sigmoid(z / discopop_tau)
    # mu * e^{-z} written as exp(log sigma(z/tau) - z): finite for |z| up to 1e4 in float32.
    return (1 - mu) * (-F.log_sigmoid(z)) + F.exp(F.log_sigmoid(z / discopop_tau) - z)


def _sft_batch(v, F, **hp):
    return -v.chosen_logps.sum() / v.chosen_len.sum()


# TRL accepts (and ignores) an f-divergence with sft; so does the registry.
@registered("sft", "SFT: token-mean NLL of all chosen completion tokens of the batch", DPO_F,
      trl="DPOTrainer:sft", uses_reference=False, batch_coupled=True, batch_build=_sft_batch,
      reference="theory §10.2 sft")
def _sft(v, F, **hp):
    return -v.chosen_logps / v.chosen_len


@registered("sigmoid_norm", "length-normalised reference DPO: -log sigma(beta Dbar)", (beta_hyper(), *DPO_F),
      trl="DPOTrainer:sigmoid_norm", reference="theory §10.2 sigmoid_norm",
      margin=lambda v, F, beta, **hp: beta * _dbar(v, F, hp))
def _sigmoid_norm(v, F, *, beta, **hp):
    return -F.log_sigmoid(beta * _dbar(v, F, hp))
