"""Plain-float statistics of a mitigation run."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .. import regimes
from ..types import PairBatch
from .config import MitigationRecord
from .precondition import oracle_masks


def _flip(a_w, a_l, b_w, b_l) -> np.ndarray:
    return regimes.classify(np.asarray(a_w), np.asarray(a_l)) != regimes.classify(np.asarray(b_w), np.asarray(b_l))


def summarize(rec: MitigationRecord, batch: PairBatch | None = None) -> dict[str, Any]:
    """Plain-float statistics of one run ([S, B] records): the one run-summary schema
    (`regimes.RUN_SUMMARY`; prediction = lin_*) plus:

    ideal_fraction            realised (step, pair) changes with chosen up and rejected down
    delta_chosen/_rejected    the comparison table's names of mean_delta_chosen/_rejected
    preference_accuracy       fraction of pairs with r_w > r_l at the end (TRL rewards/accuracies;
                              r = l - l_init; reference = initial policy)
    rho_first / rho_last, rho_eff_first / rho_eff_last     mean over pairs of rho (full / effective
                              gradients; R20 changes the effective one)
    pair_pred_ideal_fraction  one-pair SGD theory in the ideal regime (R19: 1.0)
    batch_vs_pair_flip        fraction of (step, pair) whose batch-level predicted regime differs
                              from the one-pair prediction (item 5)
    sgd_vs_precond_flip       fraction whose one-pair regime with P differs from the SGD one (item 4;
                              NaN without an Adam preconditioner)
    sign_agreement_lin / _batch_pred / _pc_batch_pred / _pc_pair_pred   realised vs predicted signs
    diverged                  some log-prob became non-finite or a single step moved one by > 50 nats
    max_step_change           max over (step, pair, response) of |realised one-step change| (finite ones)
    mask_fraction_last        mean final mask over all real tokens
    mask_on_oracle / mask_off_oracle   (with `batch`) mean final mask on the tokens the oracle keeps
                              (contrastive) / drops (shared); a mask is 'sparse like the oracle' when
                              off -> 0 while on stays large
    """
    t = jax.tree.map(np.asarray, rec)
    # the one run-summary schema first (prediction: lin_*, the first order of the actual update)
    out: dict[str, Any] = regimes.run_summary(t.chosen_logps, t.rejected_logps, t.real_chosen, t.real_rejected,
                                              pred=(t.lin_chosen, t.lin_rejected), loss=t.loss)
    steps_abs = np.abs(np.concatenate([t.real_chosen.ravel(), t.real_rejected.ravel()]))
    finite = bool(np.all(np.isfinite(steps_abs)) and np.all(np.isfinite(t.chosen_logps))
                  and np.all(np.isfinite(t.rejected_logps)))
    out["max_step_change"] = float(np.max(steps_abs[np.isfinite(steps_abs)])) if np.any(np.isfinite(steps_abs)) \
        else float("nan")
    out["diverged"] = bool(not finite or out["max_step_change"] > 50.0)
    out["ideal_fraction"] = out["regime_fractions"]["chosen_up_rejected_down"]
    fw = t.chosen_logps[-1] + t.real_chosen[-1]
    fl = t.rejected_logps[-1] + t.real_rejected[-1]
    # the comparison table's names of mean_delta_chosen / mean_delta_rejected (kept: tables and scripts use them)
    out["delta_chosen"], out["delta_rejected"] = out["mean_delta_chosen"], out["mean_delta_rejected"]
    out["preference_accuracy"] = float(np.mean((fw - t.chosen_logps[0]) > (fl - t.rejected_logps[0])))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.maximum(t.G_wl / t.G_ww, t.G_wl / t.G_ll)
        rho_e = np.maximum(t.Ge_wl / t.Ge_ww, t.Ge_wl / t.Ge_ll)
    out["rho_first"], out["rho_last"] = float(np.nanmean(rho[0])), float(np.nanmean(rho[-1]))
    out["rho_eff_first"], out["rho_eff_last"] = float(np.nanmean(rho_e[0])), float(np.nanmean(rho_e[-1]))
    pp = regimes.classify(t.pair_pred_chosen, t.pair_pred_rejected)
    out["pair_pred_ideal_fraction"] = float(np.mean(pp == regimes.CHOSEN_UP_REJECTED_DOWN))
    out["batch_vs_pair_flip"] = float(np.mean(_flip(t.pair_pred_chosen, t.pair_pred_rejected,
                                                     t.batch_pred_chosen, t.batch_pred_rejected)))
    has_pc = bool(np.any(t.pc_pair_pred_chosen != 0))
    out["sgd_vs_precond_flip"] = float(np.mean(_flip(t.pair_pred_chosen, t.pair_pred_rejected, t.pc_pair_pred_chosen,
                                                      t.pc_pair_pred_rejected))) if has_pc else float("nan")
    for name, pw, pl in (("lin", t.lin_chosen, t.lin_rejected), ("batch_pred", t.batch_pred_chosen, t.batch_pred_rejected),
                         ("pair_pred", t.pair_pred_chosen, t.pair_pred_rejected),
                         ("pc_batch_pred", t.pc_batch_pred_chosen, t.pc_batch_pred_rejected),
                         ("pc_pair_pred", t.pc_pair_pred_chosen, t.pc_pair_pred_rejected)):
        if name.startswith("pc_") and not has_pc:
            out["sign_agreement_" + name] = float("nan")
            continue
        if name == "lin":   # the run summary's own prediction: already computed
            out["sign_agreement_lin"] = out["sign_agreement"]
            continue
        out["sign_agreement_" + name] = regimes.sign_agreement(pw, pl, t.real_chosen, t.real_rejected,
                                                               t.chosen_logps, t.rejected_logps)[0]
    if batch is not None:
        real = np.concatenate([np.asarray(batch.chosen_mask).ravel(), np.asarray(batch.rejected_mask).ravel()]) > 0
        om = np.concatenate([np.asarray(x).ravel() for x in oracle_masks(batch)]) > 0
        last = np.concatenate([t.mask_w[-1].ravel(), t.mask_l[-1].ravel()])
        out["mask_fraction_last"] = float(np.mean(last[real]))
        out["mask_on_oracle"] = float(np.mean(last[real & om])) if np.any(real & om) else float("nan")
        out["mask_off_oracle"] = float(np.mean(last[real & ~om])) if np.any(real & ~om) else float("nan")
    else:
        out["mask_fraction_last"] = float(np.mean(np.concatenate([t.mask_w[-1].ravel(), t.mask_l[-1].ravel()])))
    return out
