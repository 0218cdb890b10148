"""Reference-free losses of TRL's CPOTrainer (CPO, SimPO, AlphaPO, hinge, IPO) and ORPOTrainer."""
from __future__ import annotations

import dataclasses

import sympy as sp

from .base import ALPHA_PO, CPO_ALPHA, EPS, TRL_SEMANTICS, TRL_TESTED, Hyper, beta_hyper
from .registry import register, registered
from .spec import LossSpec
from .dpo import aot_loss


# ---------------- CPOTrainer family (reference-free, theory §10.4) ----------------

def _cpo_margin(v, F, *, average, alpha):
    lw, ll = (v.avg_w, v.avg_l) if average else (v.chosen_logps, v.rejected_logps)
    if (isinstance(alpha, (int, float)) and alpha == 0) or (isinstance(alpha, sp.Basic) and alpha.is_zero):
        return lw - ll
    # AlphaPO: u = (1 - p^-alpha)/alpha with p = e^{l}: u = -expm1(-alpha l)/alpha, so
    # u_w - u_l = (expm1(-alpha l_l) - expm1(-alpha l_w))/alpha, overflow-guarded in JAX.
    return F.expm1_diff(-alpha * ll, -alpha * lw) / alpha


def nll_chosen(v):
    return -v.chosen_logps / v.chosen_len


SIMPO_GAMMA = Hyper("simpo_gamma", 0.5, "SimPO target reward margin gamma", lo=0.0)


def _cpo_family(name, kind, *, trl, nll_default, description, aliases=(), alpha_default=0.0):
    # Where the NLL is off by definition (SimPO, AlphaPO), derivations keep cpo_alpha = 0.
    nll_h = CPO_ALPHA if nll_default == 1.0 else dataclasses.replace(
        CPO_ALPHA, default=nll_default, keep_value=True)
    hypers = [beta_hyper(), EPS, nll_h, dataclasses.replace(ALPHA_PO, default=alpha_default)]
    if kind == "simpo":
        hypers.insert(2, SIMPO_GAMMA)
    if kind in ("hinge", "ipo"):
        hypers.remove(EPS)  # TRL ignores label smoothing for these (with a warning)
    average = kind in ("simpo", "ipo")

    def margin(v, F, *, beta, alpha, **hp):
        z = _cpo_margin(v, F, average=average, alpha=alpha)
        if kind == "simpo":
            return beta * z - hp["simpo_gamma"]
        if kind == "ipo":
            return z
        return beta * z

    def build(v, F, *, beta, cpo_alpha, alpha, label_smoothing=0.0, **hp):
        z = _cpo_margin(v, F, average=average, alpha=alpha)
        if kind == "sigmoid":
            loss = aot_loss(z, F, beta, label_smoothing)
        elif kind == "simpo":
            loss = aot_loss(z - hp["simpo_gamma"] / beta, F, beta, label_smoothing)
        elif kind == "hinge":
            loss = F.relu(1 - beta * z)
        else:
            loss = (z - 1 / (2 * beta)) ** 2
        return loss + cpo_alpha * nll_chosen(v)

    register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers), trl=trl,
                      uses_reference=False, margin=margin, nll_weight="cpo_alpha", aliases=aliases,
                      nll=lambda v, F, cpo_alpha, **hp: cpo_alpha * nll_chosen(v),
                      reference="CPO/SimPO/AlphaPO papers; TRL experimental CPOTrainer",
                      trl_version=f"{TRL_SEMANTICS} (tested against {TRL_TESTED})"))


_cpo_family("cpo_sigmoid", "sigmoid", trl="CPOTrainer:sigmoid", nll_default=1.0, aliases=("cpo",),
            description="CPO: -log sigma(beta (l_w - l_l)) + cpo_alpha * NLL(chosen)")
_cpo_family("cpo_simpo", "simpo", trl="CPOTrainer:simpo", nll_default=1.0,
            description="CPO-SimPO: -log sigma(beta (lbar_w - lbar_l) - gamma) + cpo_alpha * NLL")
_cpo_family("simpo", "simpo", trl="CPOTrainer:simpo (cpo_alpha=0)", nll_default=0.0,
            description="SimPO: -log sigma(beta (lbar_w - lbar_l) - gamma), no NLL")
_cpo_family("cpo_hinge", "hinge", trl="CPOTrainer:hinge", nll_default=1.0,
            description="CPO hinge: max(0, 1 - beta (l_w - l_l)) + cpo_alpha * NLL")
_cpo_family("cpo_ipo", "ipo", trl="CPOTrainer:ipo", nll_default=1.0,
            description="CPO-IPO: (lbar_w - lbar_l - 1/(2 beta))^2 + cpo_alpha * NLL")
_cpo_family("alphapo", "simpo", trl="CPOTrainer:alphapo", nll_default=0.0,
            description="AlphaPO: SimPO on u = (1 - p^-alpha)/alpha, p = exp(lbar); set alpha != 0")


# ---------------- ORPO (theory §10.5) ----------------


def _orpo_log_odds(v, F):
    # LO = (lbar_w - lbar_l) - [log(1 - e^lbar_w) - log(1 - e^lbar_l)], log1mexp for stability.
    return (v.avg_w - v.avg_l) - (F.log1mexp(v.avg_w) - F.log1mexp(v.avg_l))


def _orpo_batch(v, F, *, beta):
    # TRL: one token mean over all chosen prompt+completion tokens of the batch (not a mean of means).
    nll = -(v.chosen_logps + v.prompt_logps).sum() / (v.chosen_len + v.prompt_len).sum()
    return nll - beta * F.log_sigmoid(_orpo_log_odds(v, F)).mean()


@registered("orpo", "ORPO: NLL(prompt+chosen) - beta log sigma(log odds ratio)", (beta_hyper(),), trl="ORPOTrainer",
      uses_reference=False, reference="ORPO paper; TRL ORPOTrainer", batch_build=_orpo_batch,
      notes="prompt_logps/prompt_len: the scored prompt tokens of the chosen sequence (TRL's NLL covers "
            "prompt + completion); batch NLL is one token mean over the batch; TRL evaluates the odds "
            "ratio in float32, the registry in the input dtype.",
      nll=lambda v, F, beta: -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len),
      margin=lambda v, F, beta: _orpo_log_odds(v, F))
def _orpo(v, F, *, beta):
    nll = -(v.chosen_logps + v.prompt_logps) / (v.chosen_len + v.prompt_len)
    return nll - beta * F.log_sigmoid(_orpo_log_odds(v, F))
