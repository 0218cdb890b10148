"""KTOTrainer losses in paired use (KTO, APO-zero unpaired) and TPO's contrastive part."""
from __future__ import annotations

import sympy as sp

from .base import EPS, TRL_SEMANTICS, TRL_TESTED, Hyper, beta_hyper
from .registry import register, registered
from .spec import LossSpec
from .dpo import aot_loss


# ---------------- KTO (paired use, theory §2.2, §10.6) ----------------

# Row convention: TRL's KTOTrainer takes the mean over ROWS and a pair is two rows (chosen row,
# rejected row), so a pair contributes half of the paired-use sum. `reduction="pair_sum"` (default,
# the paired-use loss of the theory) sums the two rows; `reduction="row_mean"` is TRL's value
# (factor 1/2 on the loss and on every incentive and predicted step).
KTO_REDUCTION = Hyper("reduction", "pair_sum", "pair_sum: chosen row + rejected row; row_mean: TRL's mean "
                      "over rows (1/2 of pair_sum)", choices=("pair_sum", "row_mean"))
KTO_H = (beta_hyper(), Hyper("desirable_weight", 1.0, "lambda_D", lo=0.0), Hyper("undesirable_weight", 1.0,
         "lambda_U", lo=0.0), Hyper("kl", 0.0, "detached KL estimate z0 (>= 0; TRL clamps at 0)", lo=0.0),
         KTO_REDUCTION)
_KTO_NOTE = ("TRL's KTO loss is a mean over rows (a pair is two rows): with reduction='pair_sum' (default) "
             "the registry value and incentives are twice TRL's; reduction='row_mean' equals TRL.")


def _kto_scale(reduction, F):
    if reduction != "row_mean":
        return 1
    return sp.Rational(1, 2) if F.name == "sympy" else 0.5


@registered("kto", "KTO (paired use): lambda_D(1 - sigma(beta(r_w - z0))) + lambda_U(1 - sigma(beta(z0 - r_l)))",
      KTO_H, trl="KTOTrainer:kto", reference="KTO paper; TRL KTOTrainer", notes=_KTO_NOTE,
      # Margin form (derived in this project): L = c (lambda_D - z) with z = h_w - h_l below and
      # c = 1 (pair_sum) or 1/2 (row_mean).
      margin=lambda v, F, *, beta, desirable_weight, undesirable_weight, kl, **hp: (
          desirable_weight * F.sigmoid(beta * (v.r_w - kl)) - undesirable_weight * F.sigmoid(beta * (v.r_l - kl))))
def _kto(v, F, *, beta, desirable_weight, undesirable_weight, kl, reduction="pair_sum"):
    return _kto_scale(reduction, F) * (desirable_weight * (1 - F.sigmoid(beta * (v.r_w - kl)))
                                    + undesirable_weight * (1 - F.sigmoid(beta * (kl - v.r_l))))


@registered("apo_zero_unpaired", "APO-zero (unpaired rows, paired use): lambda_D(1 - sigma(beta r_w)) + "
      "lambda_U sigma(beta r_l)", (*KTO_H[:3], KTO_REDUCTION), trl="KTOTrainer:apo_zero_unpaired",
      reference="APO paper; TRL KTOTrainer", notes=_KTO_NOTE)
def _apo_zero_unpaired(v, F, *, beta, desirable_weight, undesirable_weight, reduction="pair_sum"):
    return _kto_scale(reduction, F) * (desirable_weight * (1 - F.sigmoid(beta * v.r_w))
                                    + undesirable_weight * F.sigmoid(beta * v.r_l))


# ---------------- TPO (TRL `trl.experimental.tpo.TPOTrainer`) ----------------
# TPO's loss is a reference-free contrastive term on (chosen, rejected) plus tpo_alpha * the
# token-mean NLL of a THIRD, "gold" response. The contrastive term is expressed below. The gold
# NLL is not a function of l_w or l_l: it adds nothing to d_w, d_l, and its effect on the
# chosen/rejected log-probs goes through the gradient overlap of the gold response with g_w and
# g_l, a third Gram row the two-response theory does not carry. So each entry equals TRL's
# TPOTrainer with tpo_alpha = 0 (value and incentives); for tpo_alpha != 0 the incentives still
# equal TRL's and the value differs by tpo_alpha * NLL(gold).

TPO_NOTE = ("equals TRL TPOTrainer with tpo_alpha=0; TRL's gold-response NLL (tpo_alpha * NLL(gold)) "
            "has no incentive on l_w, l_l and is not modelled (it needs a third response)")
TPO_GAMMA = Hyper("tpo_l_gamma", 0.5, "TPO-L target reward margin gamma", lo=0.0)


def _tpo_family(name, kind, description):
    hypers = [beta_hyper(0.01)]
    if kind in ("sigmoid", "tpo-l"):
        hypers.append(EPS)
    if kind == "tpo-l":
        hypers.append(TPO_GAMMA)
    average = kind in ("ipo", "tpo-l")

    def margin(v, F, *, beta, **hp):
        z = (v.avg_w - v.avg_l) if average else (v.chosen_logps - v.rejected_logps)
        return z if kind == "ipo" else beta * z - hp.get("tpo_l_gamma", 0.0)

    def build(v, F, *, beta, label_smoothing=0.0, **hp):
        z = (v.avg_w - v.avg_l) if average else (v.chosen_logps - v.rejected_logps)
        if kind == "sigmoid":
            return aot_loss(z, F, beta, label_smoothing)
        if kind == "tpo-l":
            return aot_loss(z - hp["tpo_l_gamma"] / beta, F, beta, label_smoothing)
        if kind == "hinge":
            return F.relu(1 - beta * z)
        return (z - 1 / (2 * beta)) ** 2

    register(LossSpec(name=name, description=description, build=build, hypers=tuple(hypers),
                      trl=f"TPOTrainer:{kind} (tpo_alpha=0)", uses_reference=False, margin=margin,
                      reference="TPO paper; TRL experimental TPOTrainer", notes=TPO_NOTE,
                      trl_version=f"{TRL_SEMANTICS} (tested against {TRL_TESTED})"))


_tpo_family("tpo", "sigmoid", "TPO (contrastive part): -log sigma(beta (l_w - l_l)), beta = 0.01")
_tpo_family("tpo_hinge", "hinge", "TPO hinge (contrastive part): max(0, 1 - beta (l_w - l_l))")
_tpo_family("tpo_ipo", "ipo", "TPO-IPO (contrastive part): (lbar_w - lbar_l - 1/(2 beta))^2")
_tpo_family("tpo_l", "tpo-l", "TPO-L (contrastive part): -log sigma(beta (lbar_w - lbar_l) - gamma)")
