"""Settings, the method x setting comparison (`entangle-sim mitigate`), the R20 mask sweep and its table."""
from __future__ import annotations

from typing import Any

import jax
import numpy as np

from .. import data, results, sentiment
from ..policies import lastlayer, transformer
from .. import train
from ..train import TrainConfig
from ..types import Array, PairBatch, Policy, PyTree
from .config import MitigationConfig, MitigationRecord
from .trainer import train_mitigation, timed_run, calibrate_lr
from .summary import summarize


SETTINGS = ("tabular", "linear", "lastlayer-1t", "lastlayer-short", "lastlayer-long", "transformer-long")
LR_TARGET = 0.05     # calibrate_lr target: mean first-step |Delta log-prob| of the baseline


def build_setting(name: str, key: Array, *, pairs: int = 8, sft_steps: int = 150, with_features: bool = False):
    """(policy, params, batch) of a comparison setting; with_features=True appends `features`
    (params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D]), the hidden state that predicts each response
    token (the h_t of theory §8.2's m_t = sigmoid(v . h_t)), or None where there is none (tabular, linear).

    tabular           softmax bandit, geometry pairs cos = -0.3, |g_l|/|g_w| = 1.5 (R15: always Case 1)
    linear            linear-softmax geometry pairs cos = 0.9, ratio 2 (R7: 'both down' under DPO)
    lastlayer-*       Setting A, K = 8, d = 8, prompt 2: '1t' (R15), shared suffix L = 4 / 16 (R17)
    transformer-long  tiny decoder (1 layer, d_model 32) on the sentiment task, long suffix (16),
                      after `sft_steps` Adam SFT steps on "prompt -> label word + suffix"
    """
    feats = None
    if name == "tabular":
        gp = data.geometry_pairs(key, "softmax", pairs, K=6, target_cos=-0.3, norm_ratio=1.5)
        out = gp.policy(), gp.params, gp.batch
    elif name == "linear":
        gp = data.geometry_pairs(key, "linear", pairs, K=6, target_cos=0.9, norm_ratio=2.0, d=4)
        out = gp.policy(), gp.params, gp.batch
    elif name.startswith("lastlayer-") and name.split("-", 1)[1] in ("1t", "short", "long"):
        k_data, k_init = jax.random.split(key)
        kind = name.split("-", 1)[1]
        if kind == "1t":
            batch = data.one_token(k_data, pairs, K=8, prompt_len=2)
        else:
            batch = data.shared_suffix(k_data, pairs, K=8, prompt_len=2, L=4 if kind == "short" else 16)
        lcfg = lastlayer.LastLayerConfig(K=8, d=8)
        pol = lastlayer.make(lcfg)
        out = pol, pol.init(k_init), batch

        def feats(p, bt):
            fp = lastlayer.features_and_probs(lcfg, p, bt)
            return fp.h_w, fp.h_l
    elif name == "transformer-long":
        *out, feats = _transformer_setting(key, pairs, sft_steps)
        out = tuple(out)
    else:
        raise ValueError(f"unknown setting {name!r}; valid: {', '.join(SETTINGS)}")
    return (*out, feats) if with_features else out


def _transformer_setting(key, pairs, sft_steps, mode="long"):
    scfg = sentiment.SentimentConfig(mode=mode, prompt_len=6, short_len=4, long_len=16, n_pos_words=4,
                                     n_neg_words=4, n_neutral=8, n_suffix_vocab=12)
    tcfg = transformer.TransformerConfig(vocab=scfg.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                         max_len=scfg.prompt_len + scfg.T)
    pol = transformer.make(tcfg)
    k_init, k_sft, k_pairs = jax.random.split(key, 3)
    params = pol.init(k_init)
    sft_step = train.make_sft_step(pol, "adam", 3e-3)   # the trainer with the `sft` loss

    def sft_batch(k):
        d = sentiment.sft_data(scfg, k, 32)
        return train.sft_pairs(d.prompt, d.response, d.response_mask)

    @jax.jit
    def sft(p):
        return train.run(sft_step, p, train.make_optimizer("adam", 3e-3).init(p), jax.random.split(k_sft, sft_steps),
                         sft_batch)[0]

    if sft_steps > 0:
        params = sft(params)

    def feats(p, bt):   # final (layer-normed) hidden state at the positions predicting each response token
        one = lambda x, y, m: transformer.response_hidden_states(tcfg, p, x, y, m)
        return (jax.vmap(one)(bt.prompt, bt.chosen, bt.chosen_mask),
                jax.vmap(one)(bt.prompt, bt.rejected, bt.rejected_mask))

    return pol, params, sentiment.preference_pairs(scfg, k_pairs, pairs), feats


COMPARISON_METHODS = ("baseline", "normalized", "normalized_batch", "oracle_mask", "learned_mask", "feature_mask",
                      "dpop", "nll")


def run_comparison(settings=SETTINGS, methods=COMPARISON_METHODS, *, steps: int = 40, pairs: int = 8,
                   seed: int = 0, optimizer: str = "sgd", lr: dict | float | None = None, loss: str = "sigmoid",
                   loss_params: tuple = (), sft_steps: int = 150, lr_target: float = LR_TARGET,
                   keep_records: bool = False, progress=None, **method_kw) -> dict[str, Any]:
    """Method x setting comparison. Returns {'rows': [...], 'records': {...}}; each row:
    setting, method, optimizer, lr, lr_rule, ideal_fraction, delta_chosen, delta_rejected,
    preference_accuracy, sec_per_step (compiled, recorded step; min of 2 runs), rho/rho_eff,
    batch_vs_pair_flip, sgd_vs_precond_flip, sign agreements, diverged, max_step_change, mask stats.

    lr: None = `calibrate_lr` per (setting, optimizer) on the baseline, shared by every method (the
    documented rule; instability of a method at that lr is reported, not tuned away); a float = that
    lr everywhere; a dict = per setting. method_kw go to every MitigationConfig (e.g. mask_l1).
    'feature_mask' on a setting without hidden states (tabular, linear) gives a row with note 'n/a'.
    """
    rows, recs = [], {}
    key = jax.random.PRNGKey(seed)
    for si, setting in enumerate(settings):
        pol, params, batch, feats = build_setting(setting, jax.random.fold_in(key, si), pairs=pairs,
                                                  sft_steps=sft_steps, with_features=True)
        if lr is None:
            eta, rule = calibrate_lr(pol, params, batch, optimizer=optimizer, target=lr_target, loss=loss,
                                     loss_params=loss_params), f"auto(target={lr_target:g})"
        elif isinstance(lr, (int, float)):
            eta, rule = float(lr), "fixed"
        else:
            eta, rule = float(lr[setting]), "per-setting"
        for method in methods:
            base = {"setting": setting, "method": method, "optimizer": optimizer, "lr": float(eta), "lr_rule": rule}
            if method == "feature_mask" and feats is None:
                rows.append({**base, "note": "n/a (no hidden states)"})
                if progress:
                    progress(rows[-1])
                continue
            cfg = MitigationConfig(method=method, loss=loss, loss_params=loss_params, optimizer=optimizer,
                                   lr=float(eta), steps=steps, **method_kw)
            rec, sec = timed_run(pol, params, batch, cfg, jax.random.fold_in(key, 1000 + si), feats, repeats=2)
            s = summarize(rec, batch)
            row = {**base, "sec_per_step": sec, **{k: v for k, v in s.items() if k != "regime_fractions"}}
            rows.append(row)
            if keep_records:
                recs[(setting, method)] = jax.tree.map(np.asarray, rec)
            if progress:
                progress(row)
    return {"rows": rows, "records": recs}


def mask_sweep(setting: str = "lastlayer-long", methods=("learned_mask", "feature_mask"), *,
               grid=None, steps: int = 40, pairs: int = 8, seed: int = 0, progress=None) -> list[dict]:
    """The R20 mask sweep behind the MitigationConfig defaults: for each method and (mask_l1, step) in
    `grid[method]` one run on `setting` at the calibrated lr (same keys as `run_comparison`), plus the
    baseline and oracle rows. Rows: method, mask_l1, mask_step, mask_on_oracle, mask_off_oracle,
    ideal_fraction, delta_chosen, delta_rejected, preference_accuracy, rho_eff_last."""
    grid = grid or {"learned_mask": [(l1, lr) for l1 in (0.003, 0.01, 0.03, 0.1) for lr in (100.0, 1000.0, 3000.0)],
                    "feature_mask": [(l1, lr) for l1 in (0.001, 0.003, 0.01, 0.03) for lr in (0.3, 1.0, 3.0)]}
    si = SETTINGS.index(setting)
    key = jax.random.PRNGKey(seed)
    pol, params, batch, feats = build_setting(setting, jax.random.fold_in(key, si), pairs=pairs, with_features=True)
    eta = calibrate_lr(pol, params, batch)
    runs = [("baseline", None, None), ("oracle_mask", None, None)]
    runs += [(m, l1, lr) for m in methods for l1, lr in grid[m]]
    rows = []
    for m, l1, lr in runs:
        kw = {} if l1 is None else {"mask_l1": l1, ("feature_lr" if m == "feature_mask" else "mask_lr"): lr}
        rec = train_mitigation(pol, params, batch, MitigationConfig(method=m, lr=eta, steps=steps, **kw),
                               jax.random.fold_in(key, 1000 + si), feats)
        s = summarize(rec, batch)
        row = {"setting": setting, "method": m, "mask_l1": l1, "mask_step": lr, "lr": eta,
               **{k: s[k] for k in ("mask_on_oracle", "mask_off_oracle", "ideal_fraction", "delta_chosen",
                                    "delta_rejected", "preference_accuracy", "rho_eff_last")}}
        rows.append(row)
        if progress:
            progress(row)
    return rows


TABLE_COLUMNS = (("setting", "{}"), ("method", "{}"), ("optimizer", "{}"), ("lr", "{:.3g}"),
                 ("ideal_fraction", "{:.3f}"), ("delta_chosen", "{:+.3f}"), ("delta_rejected", "{:+.3f}"),
                 ("preference_accuracy", "{:.2f}"), ("sec_per_step", "{:.2e}"), ("rho_first", "{:.2f}"),
                 ("rho_eff_first", "{:.2f}"), ("rho_eff_last", "{:.2f}"), ("batch_vs_pair_flip", "{:.3f}"),
                 ("sgd_vs_precond_flip", "{:.3f}"), ("sign_agreement_pc_pair_pred", "{:.3f}"),
                 ("diverged", "{}"), ("max_step_change", "{:.3g}"), ("mask_on_oracle", "{:.2f}"),
                 ("mask_off_oracle", "{:.2f}"), ("note", "{}"))


def format_table(rows, columns=TABLE_COLUMNS) -> str:
    """Markdown table of comparison rows."""
    return results.markdown_table([c for c, _ in columns],
                                  [[f.format(r[c]) if r.get(c) is not None else "" for c, f in columns] for r in rows],
                                  escape=False)


def run_with_mitigation(policy: Policy, params: PyTree, batch: PairBatch, cfg: TrainConfig, mitigation: str,
                        key: Array, **kw) -> tuple[MitigationRecord, dict[str, Any]]:
    """Hook for `entangle-sim simulate --mitigation NAME`: run `cfg` (loss, optimizer, lr, steps,
    batch size) with a mitigation and return (records [S, B], summary dict). mitigation 'none' or
    'baseline' is the plain loss; kw go to MitigationConfig (weight, nll_alpha, mask_l1, ...).
    The summary carries the one run-summary schema (`regimes.RUN_SUMMARY`) as `train.summarize` does,
    so a simulation's summary has the same names with or without a mitigation.

    >>> rec, summary = run_with_mitigation(pol, params, batch, TrainConfig(lr=0.05, steps=50), "normalized", key)  # doctest: +SKIP
    """
    method = "baseline" if mitigation in (None, "none") else mitigation
    mcfg = MitigationConfig.from_train_config(cfg, method, **kw)
    rec = train_mitigation(policy, params, batch, mcfg, key)
    return rec, simulation_summary(rec)


def simulation_summary(rec: MitigationRecord) -> dict[str, Any]:
    """The schema of `entangle-sim simulate` with or without a mitigation: `summarize(rec)` (which
    carries the one run-summary schema, `regimes.RUN_SUMMARY`, as `train.summarize` does) plus the
    one-pair agreement under `train.summarize`'s name."""
    s = summarize(rec)
    s["sign_agreement_one_pair"] = s["sign_agreement_pair_pred"]
    return s
