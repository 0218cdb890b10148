"""Losses of official code bases (DPOP, R-DPO, RRHF, SPPO, SLiC-HF, IPO summed), DPO-Shift, and the
modifiers acting on token log-probs (LD-DPO, WPO)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from .base import CPO_ALPHA, Hyper, beta_hyper
from .registry import registered
from .cpo import nll_chosen


# ---------------- Official code (theory §7.1, §10.7) and §2.2 extras ----------------


@registered("dpop", "DPOP (Smaug): DPO with a penalty lambda * max(0, l_ref_w - l_w) inside the margin",
      (beta_hyper(), Hyper("dpop_lambda", 50.0, "DPOP penalty weight lambda_p (official code: 50)", lo=0.0)),
      trl=None, aliases=("pdpo",), reference="theory §2.2 DPOP, §10.7 pdpo",
      margin=lambda v, F, beta, dpop_lambda: beta * (v.r_w - v.r_l - dpop_lambda * F.relu(-v.r_w)))
def _dpop(v, F, *, beta, dpop_lambda):
    return -F.log_sigmoid(beta * (v.r_w - v.r_l - dpop_lambda * F.relu(v.ref_chosen_logps - v.chosen_logps)))


@registered("rdpo", "R-DPO: -log sigma(beta D + alpha (n_w - n_l))",
      (beta_hyper(), Hyper("rdpo_alpha", 0.2, "length coefficient (official code: 0.2)")),
      trl=None, reference="theory §2.2 R-DPO, §10.7 rdpo",
      margin=lambda v, F, beta, rdpo_alpha: beta * (v.r_w - v.r_l) + rdpo_alpha * (v.chosen_len - v.rejected_len))
def _rdpo(v, F, *, beta, rdpo_alpha):
    return -F.log_sigmoid(beta * (v.r_w - v.r_l) + rdpo_alpha * (v.chosen_len - v.rejected_len))


@registered("rrhf", "RRHF (pairwise): max(0, -lbar_w + lbar_l) + cpo_alpha * NLL(chosen)", (CPO_ALPHA,),
      trl=None, uses_reference=False, nll_weight="cpo_alpha", reference="theory §2.2 RRHF, §10.7 rrhf",
      nll=lambda v, F, cpo_alpha: cpo_alpha * nll_chosen(v),
      margin=lambda v, F, cpo_alpha: v.avg_w - v.avg_l)
def _rrhf(v, F, *, cpo_alpha):
    return F.relu(-v.avg_w + v.avg_l) + cpo_alpha * nll_chosen(v)


@registered("sppo", "SPPO (official code): ((r_w - 0.5/beta)^2 + (r_l + 0.5/beta)^2) / 2", (beta_hyper(),),
      trl=None, reference="theory §10.7 sppo")
def _sppo(v, F, *, beta):
    return ((v.r_w - 1 / (2 * beta)) ** 2 + (v.r_l + 1 / (2 * beta)) ** 2) / 2


@registered("slic", "SLiC-HF: max(0, delta - (l_w - l_l)) - lambda_nll * l_w (summed NLL)",
      (Hyper("delta", 1.0, "calibration margin delta", lo=0.0, lo_open=True),
       Hyper("lambda_nll", 0.1, "weight of the summed NLL on the chosen response", lo=0.0)),
      trl=None, uses_reference=False, reference="theory §2.2 SLiC-HF",
      nll=lambda v, F, delta, lambda_nll: -lambda_nll * v.chosen_logps,
      margin=lambda v, F, **hp: v.chosen_logps - v.rejected_logps)
def _slic(v, F, *, delta, lambda_nll):
    return F.relu(delta - (v.chosen_logps - v.rejected_logps)) - lambda_nll * v.chosen_logps


@registered("ipo_sum", "IPO (original, summed log-ratios): (D - 1/(2 beta))^2", (beta_hyper(),), trl=None,
      reference="theory §2.2 IPO (original form)",
      margin=lambda v, F, beta: v.r_w - v.r_l)
def _ipo_sum(v, F, *, beta):
    return (v.r_w - v.r_l - 1 / (2 * beta)) ** 2


# --------------------------------------------------------------------------------------------
# Modifiers acting on token log-probs (theory §10.1)


def ld_logps(token_logps, mask, other_mask, *, ld_alpha):
    """LD-DPO log-prob: sum over the first min(n_w, n_l) tokens + ld_alpha * the rest.

    token_logps, mask: [..., T] of this response; other_mask: [..., T'] of the other response.
    Apply to policy and reference alike (TRL v1.x). Returns [...].
    """
    n_common = jnp.minimum(mask.sum(-1), other_mask.sum(-1))[..., None]
    position = jnp.cumsum(mask, -1)  # 1-based index among real tokens
    weight = jnp.where(position <= n_common, 1.0, ld_alpha) * mask
    return (token_logps * weight).sum(-1)


def wpo_weight(token_logps, token_logsumsq, mask):
    """WPO weight omega = exp(mean_t [log pi(y_t) - log sum_v pi(v)^2]), detached.

    token_logsumsq: [..., T] log sum_v pi(v|ctx)^2 per position. The per-pair loss is multiplied
    by omega_w * omega_l (a constant weight: `stop_gradient`).
    """
    n = jnp.maximum(mask.sum(-1), 1.0)
    return jax.lax.stop_gradient(jnp.exp(((token_logps - token_logsumsq) * mask).sum(-1) / n))


# ---------------- Losses that set the chosen/rejected incentive ratio ----------------

SHIFT_LAMBDA = Hyper("shift_lambda", 0.9, "DPO-Shift factor f(lambda) on the rejected log-ratio (<= 1)",
                     lo=0.0, hi=1.0, lo_open=True)


@registered("dpo_shift", "DPO-Shift: -log sigma(beta r_w - lambda beta r_l), lambda <= 1", (beta_hyper(), SHIFT_LAMBDA),
      trl=None, reference="DPO-Shift (Yang et al. 2025, arXiv:2502.07599), constant f(lambda) = lambda",
      margin=lambda v, F, beta, shift_lambda: beta * (v.r_w - shift_lambda * v.r_l))
def _dpo_shift(v, F, *, beta, shift_lambda):
    """DPO-Shift (Yang, Jiang, Zhang, Zhao, Li 2025, "DPO-Shift: Shifting the Distribution of Direct
    Preference Optimization", arXiv:2502.07599): the rejected log-ratio scaled by f(lambda) <= 1,
    here a constant lambda (the paper also schedules it). Incentives d_w = beta s, d_l = lambda beta s
    with s = sigma(-z), so t_w = 1/lambda and t_l = lambda (derived in this project)."""
    return -F.log_sigmoid(beta * (v.r_w - shift_lambda * v.r_l))
