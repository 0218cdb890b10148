"""The paper's tiny-transformer claims as statistics over seeds and settings, with every failure attributed.

The paper (the descriptions of its Figures 3, 4a, 4b) reports, for GPT-2 small after SFT and DPO on a
sentiment task:

    1t-cos          single differing token: the gradient cosine turns and stays negative
    1t-chosen       single differing token: the chosen log-prob rises
    suffix-cos      identical shared suffix: the cosine is positive and grows with the suffix length
    suffix-chosen   identical shared suffix: the chosen log-prob falls, more for the longer suffix
    heat-contrast   token heat map (long suffix): the contrastive token pair has a negative cosine
    heat-shared     token heat map (long suffix): matched shared tokens reach a cosine near 1 (> 0.9)

This module measures the tiny-transformer analogue of each (pipeline of `entangle_sim.diagnose`:
pretraining on `entangle_sim.corpus`, SFT, DPO) for several seeds per setting and reports the
fraction of runs where it holds with a Wilson 95% interval. Settings vary one factor at a time
from the paper-like recipe (`SETTINGS`).

Attribution (derived in this project). For the claims about log-prob changes, every PO step records
on its training batch (batch means, summed over steps; `train.make_step` records):

    one    the one-pair SGD prediction  eta/b (d_w G_ww - d_l G_wl)   (the paper's per-pair theory)
    batch  the batch-level SGD prediction  -lr J grad L               (adds the cross-pair Gram terms)
    lin    the first order of the real update  J dtheta               (adds Adam's preconditioning)
    real   the realised change                                         (adds the second-order remainder)
    eval   the change of the held-out eval set, on which the claim is stated

A failing claim is evaluated on each level in this order; the first level at which it fails names
the term that makes it fail (`TERMS`). The SGD levels are at the SGD scale (lr times the Gram), so
under Adam only their signs are comparable with the realised change. For the geometric claims (cosines),
the levels are the reference model (before PO) and the final model: a claim that holds at the
reference and fails at the end was broken by training, otherwise by the geometry of the model itself.

>>> sw = run_sweep(SweepConfig(base=DiagnoseConfig(d_model=16, n_layers=1), settings=("paper",), seeds=5))  # doctest: +SKIP
>>> sw["table"][0]["fraction"], sw["table"][0]["interval"]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import corpus, geometry, losses, regimes, sentiment, train
from .diagnose import DiagnoseConfig
from .policies import transformer

MODES = sentiment.MODES
LEVELS = ("one", "batch", "lin", "real", "eval")
TERMS = {"one": "one-pair theory", "batch": "cross-pair terms", "lin": "Adam preconditioning",
         "real": "second-order remainder", "eval": "held-out pairs",
         "reference": "model geometry", "final": "training moved the geometry"}


@dataclasses.dataclass(frozen=True)
class Setting:
    """One factor changed from the paper-like recipe: overrides of DiagnoseConfig fields."""

    name: str
    label: str
    overrides: tuple = ()

    def apply(self, base: DiagnoseConfig) -> DiagnoseConfig:
        """base with the overrides; a callable override is a function of base (relative settings, e.g.
        twice the width), so a setting means the same at every model size."""
        return dataclasses.replace(base, **{k: v(base) if callable(v) else v for k, v in self.overrides})


SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("paper", "paper-like: pretrained, SFT without suffix, DPO beta 0.1, Adam, 16 pairs per batch"),
    Setting("from_scratch", "no pretraining (SFT also on the suffix)", (("pretrain_steps", 0),)),
    Setting("sgd", "SGD instead of Adam (lr 0.01: per-step changes within the first-order range)",
            (("optimizer", "sgd"), ("po_lr", 0.01))),
    Setting("one_pair", "1 pair per batch (no cross-pair terms in a step)", (("po_batch", 1),)),
    Setting("beta_0.5", "beta 0.5", (("loss_params", (("beta", 0.5),)),)),
    Setting("lr_x5", "learning rate x5", (("po_lr", lambda c: 5 * c.po_lr),)),
    Setting("wide", "twice the width (d_model)", (("d_model", lambda c: 2 * c.d_model),)),
    Setting("vocab", "larger vocabulary (3x the neutral words, 2x the suffix words)",
            (("n_neutral", lambda c: 3 * c.n_neutral), ("n_suffix_vocab", lambda c: 2 * c.n_suffix_vocab))),
    Setting("long_24", "long suffix twice as long (24 tokens at the default 12)", (("long_len", lambda c: 2 * c.long_len),)),
]}


# ---------------------------------------------------------------------------------------------- claims

def _d(run, level, side="w"):
    return run[f"{level}_{side}"]


CHANGE_CLAIMS = {
    "1t-chosen": lambda r, lv: _d(r["1t"], lv) > 0,
    "suffix-chosen": lambda r, lv: _d(r["short"], lv) < 0 and _d(r["long"], lv) < _d(r["short"], lv),
}
GEOMETRY_CLAIMS = {
    "1t-cos": lambda r, at: r["1t"][f"cos_{at}"] < 0,
    "suffix-cos": lambda r, at: r["long"][f"cos_{at}"] > r["short"][f"cos_{at}"] > 0,
    "heat-contrast": lambda r, at: r["long"][f"tok_contrast_{at}"] < 0,
    "heat-shared": lambda r, at: r["long"][f"tok_shared_max_{at}"] > 0.9,
}
CLAIMS = {  # id -> (paper's statement, this project's operationalisation)
    "1t-cos": ("single token: the gradient cosine turns and stays negative", "final eval-set mean cos('1t') < 0"),
    "1t-chosen": ("single token: the chosen log-prob rises", "eval-set mean chosen log-prob change ('1t') > 0"),
    "suffix-cos": ("shared suffix: the cosine is positive and grows with the suffix length",
                   "final mean cos: cos(long) > cos(short) > 0"),
    "suffix-chosen": ("shared suffix: the chosen log-prob falls, more for the longer suffix",
                      "chosen change: short < 0 and long < short"),
    "heat-contrast": ("heat map: the contrastive token pair has a negative cosine",
                      "token cos of the contrastive pair < 0 (long suffix, final model, eval pair 0)"),
    "heat-shared": ("heat map: matched shared tokens reach a cosine near 1 for some tokens",
                    "max matched shared-token cos > 0.9 (long suffix, final model, eval pair 0)"),
}


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval for a binomial fraction k/n (95% for z = 1.96); (nan, nan) for n = 0.

    >>> [round(x, 3) for x in wilson(5, 5)]
    [0.566, 1.0]
    """
    if n == 0:
        return float("nan"), float("nan")
    p = k / n
    den = 1 + z * z / n
    mid = (p + z * z / (2 * n)) / den
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / den
    return max(0.0, mid - half), min(1.0, mid + half)


def evaluate(run: dict) -> dict[str, dict]:
    """Per claim: {'holds': bool, 'failed_at': level or None, 'term': the term that breaks it or None}
    for one (setting, seed) run; `run` maps each mode to its measurements (see `run_setting`)."""
    out = {}
    for cid, fn in CHANGE_CLAIMS.items():
        holds = bool(fn(run, "eval"))
        at = None if holds else next(lv for lv in LEVELS if not fn(run, lv))
        out[cid] = {"holds": holds, "failed_at": at, "term": TERMS[at] if at else None}
    for cid, fn in GEOMETRY_CLAIMS.items():
        holds = bool(fn(run, "final"))
        at = None if holds else ("final" if fn(run, "reference") else "reference")
        out[cid] = {"holds": holds, "failed_at": at, "term": TERMS[at] if at else None}
    return out


# ---------------------------------------------------------------------------------------------- runs

@dataclasses.dataclass(frozen=True)
class SweepConfig:
    """A sweep: the base recipe (sizes), the settings (names of SETTINGS) and the number of seeds."""

    base: DiagnoseConfig = DiagnoseConfig(d_model=32, po_batch=16, sft_steps=30, po_lr=2e-5, pretrain_steps=300,
                                          po_steps=100, n_eval_pairs=16, long_len=12)
    settings: tuple = tuple(SETTINGS)
    seeds: int = 5
    # float32 by default: the sweep compares signs and sums of changes of 1e-4..1 nats (float32
    # resolves 1e-7 relative) and runs about twice as fast as float64 on CPU; the one-step
    # mathematics is checked in float64 by the tests and the report's R-entries.
    x64: bool = False

    def __post_init__(self):
        for s in self.settings:
            if s not in SETTINGS:
                raise ValueError(f"unknown setting {s!r}; valid: {', '.join(SETTINGS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive int, got {self.seeds!r}")


def _scan(step, carry, keys):
    return jax.lax.scan(lambda c, k: step(c, k), carry, keys)


def _structure(cfg: DiagnoseConfig) -> DiagnoseConfig:
    """cfg with the numbers that enter the programs as traced arguments (rates, loss hyperparameters)
    set to fixed values: settings that differ only in them share one compiled program."""
    return dataclasses.replace(cfg, sft_lr=1.0, po_lr=1.0, pretrain_lr=1.0, loss_params=(), seed=0)


def _numbers(cfg: DiagnoseConfig) -> dict:
    hp = losses.get(cfg.loss).resolve(**dict(cfg.loss_params))
    return {"sft_lr": cfg.sft_lr, "po_lr": cfg.po_lr, "pretrain_lr": cfg.pretrain_lr,
            "hp": {k: v for k, v in hp.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}}


@functools.lru_cache(maxsize=16)
def _programs(structure: DiagnoseConfig, hp_static: tuple):
    """(policy, scfg, stage_a, stage_b, measure): jitted, vmapped programs of one run structure.

    stage_a(keys [R], nums) -> pretrained params [R];  stage_b(params, keys, modes, nums) -> (ref, final,
    sums) [R];  measure(ref, final, modes, keys) -> eval-set measurements [R]. nums: `_numbers(cfg)`
    (traced). hp_static: the non-numeric loss hyperparameters (part of the structure)."""
    cfg = structure
    scfg = dataclasses.replace(cfg.sentiment, mode="long")
    policy = transformer.make(cfg.transformer)
    sft_mode = 2 if cfg.sft_on_suffix else 0

    def stage_a(key, nums):
        k_init, k_pre = jax.random.split(key)
        return corpus.pretrain(policy, policy.init(k_init), scfg, cfg.corpus, k_pre, steps=cfg.pretrain_steps,
                               lr=nums["pretrain_lr"], batch=cfg.pretrain_batch)[0]

    def stage_b(params, key, mode, nums):
        hp = {**dict(hp_static), **nums["hp"]}
        sft = train.make_sft_step(policy, "adam", 1.0)          # the rate is read from the optimizer state
        po = train.make_step(policy, train.TrainConfig(loss=cfg.loss, optimizer=cfg.optimizer, steps=1), hp)
        k_sft, k_po = jax.random.split(key)
        smode = jnp.where(sft_mode == 0, 0, mode)    # the from-scratch recipe shows the run's own suffix
        if cfg.sft_steps:
            state = train.make_optimizer("adam", nums["sft_lr"]).init(params)

            def sbody(c, k):
                p, s = c
                _, d = sentiment.mode_batches(scfg, k, cfg.sft_batch, smode)
                p, s, loss = sft(p, s, train.sft_pairs(d.prompt, d.response, d.response_mask), k)
                return (p, s), loss

            (params, _), _ = _scan(sbody, (params, state), jax.random.split(k_sft, cfg.sft_steps))
        ref = params
        state = train.make_optimizer(cfg.optimizer, nums["po_lr"]).init(params)

        def pbody(c, k):
            p, s = c
            batch, _ = sentiment.mode_batches(scfg, k, cfg.po_batch, mode)
            ref_logps = jax.lax.stop_gradient(policy.logps(ref, batch))
            p, s, rec = po(p, s, batch, ref_logps, k)
            means = {f"{lv}_{side}": getattr(rec, f"{name}_{full}").mean()
                     for lv, name in (("one", "pred"), ("batch", "batch"), ("lin", "lin"), ("real", "real"))
                     for side, full in (("w", "chosen"), ("l", "rejected"))}
            signs = {}   # as `train.summarize`: only changes above the rounding of a log-prob difference
            for lv, name in (("one", "pred"), ("batch", "batch"), ("lin", "lin")):
                signs[f"agree_{lv}"], signs[f"counted_{lv}"] = regimes.sign_agreement_counts(
                    getattr(rec, f"{name}_chosen"), getattr(rec, f"{name}_rejected"), rec.real_chosen,
                    rec.real_rejected, rec.chosen_logps, rec.rejected_logps)
            return (p, s), {**means, **signs}

        (final, _), rec = _scan(pbody, (params, state), jax.random.split(k_po, cfg.po_steps))
        sums = {k: v.sum() for k, v in rec.items() if not k.startswith(("agree", "counted"))}
        for lv in ("one", "batch", "lin"):   # fraction over every counted (step, pair, side)
            n = rec[f"counted_{lv}"].sum()
            sums[f"agree_{lv}"] = jnp.where(n > 0, rec[f"agree_{lv}"].sum() / jnp.maximum(n, 1), jnp.nan)
        return ref, final, sums

    def evaluate_at(params, batch):
        lw, ll = policy.logps(params, batch)
        return lw.mean(), ll.mean(), geometry.pair_gram(policy.logps, params, batch).cos.mean()

    def measure(ref_p, fin_p, mode, key):
        batch, _ = sentiment.mode_batches(scfg, key, cfg.n_eval_pairs, mode)
        w0, l0, c0 = evaluate_at(ref_p, batch)
        w1, l1, c1 = evaluate_at(fin_p, batch)
        ex = jax.tree.map(lambda a: a[0], batch)
        out = {"eval_w": w1 - w0, "eval_l": l1 - l0, "cos_reference": c0, "cos_final": c1,
               "chosen_ref": w0, "rejected_ref": l0}
        n_real = 1 + jnp.array([0, scfg.short_len, scfg.long_len])[mode]
        for at, p in (("reference", ref_p), ("final", fin_p)):
            tg = geometry.token_gram(policy.token_logps, p, ex, method="jacrev").cos
            diag = jnp.where(jnp.arange(tg.shape[0]) < n_real, jnp.diag(tg), -jnp.inf)
            out[f"tok_contrast_{at}"] = tg[0, 0]
            best = jnp.max(diag[1:])
            out[f"tok_shared_max_{at}"] = jnp.where(jnp.isfinite(best), best, jnp.nan)  # '1t': no shared token
        return out

    return (policy, scfg, jax.jit(jax.vmap(stage_a, in_axes=(0, None))),
            jax.jit(jax.vmap(stage_b, in_axes=(0, 0, 0, None))), jax.jit(jax.vmap(measure)))


def _pretrain_key(cfg: DiagnoseConfig, seeds: int) -> tuple:
    """What stage a depends on: settings that agree here share one pretraining."""
    return (cfg.transformer, dataclasses.replace(cfg.sentiment, mode="long"), cfg.corpus, cfg.pretrain_steps,
            cfg.pretrain_lr, cfg.pretrain_batch, cfg.seed, seeds, jax.config.jax_enable_x64)


def run_setting(cfg: DiagnoseConfig, seeds: int, *, progress: Callable[[str], None] | None = None,
                pretrained: dict | None = None) -> list[dict]:
    """`seeds` runs of one setting (each: pretraining, then SFT + DPO on the three datasets), as one
    compiled program per stage, vmapped over seeds (and modes). Returns one dict per seed:
    {mode: {eval_w, eval_l (eval-set mean changes), one_w ... real_l (summed batch-mean predictions
    and realised changes), agree_one / agree_batch / agree_lin (per-step sign agreement with the
    realised change), cos_reference, cos_final, tok_contrast_*, tok_shared_max_* (long/short)}}.
    pretrained: a dict shared between calls; runs whose pretraining is the same reuse it. Settings
    that differ only in rates or numeric loss hyperparameters reuse the compiled programs."""
    hp = losses.get(cfg.loss).resolve(**dict(cfg.loss_params))
    hp_static = tuple(sorted((k, v) for k, v in hp.items() if not isinstance(v, (int, float)) or isinstance(v, bool)))
    policy, scfg, stage_a, stage_b, measure = _programs(_structure(cfg), hp_static)
    nums = jax.tree.map(jnp.asarray, _numbers(cfg))
    keys = jax.vmap(jax.random.key)(cfg.seed + 1000 * jnp.arange(seeds))
    k_a = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k_b = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    k_e = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    pk = _pretrain_key(cfg, seeds)
    if pretrained is not None and pk in pretrained:
        pre = pretrained[pk]
    else:
        pre = jax.block_until_ready(stage_a(k_a, nums))
        if pretrained is not None:
            pretrained[pk] = pre
    if progress:
        progress("pretrained")
    n_modes = len(MODES)
    rep = lambda t: jax.tree.map(lambda a: jnp.repeat(a, n_modes, axis=0), t)  # noqa: E731  [seeds*modes]
    modes = jnp.tile(jnp.arange(n_modes), seeds)
    ref, final, sums = jax.block_until_ready(stage_b(rep(pre), rep(k_b), modes, nums))
    if progress:
        progress("trained")
    meas = jax.block_until_ready(measure(ref, final, modes, rep(k_e)))
    if progress:
        progress("measured")
    allv = {**{k: np.asarray(v) for k, v in sums.items()}, **{k: np.asarray(v) for k, v in meas.items()}}
    runs = []
    for s in range(seeds):
        runs.append({m: {k: float(v[s * n_modes + i]) for k, v in allv.items()} for i, m in enumerate(MODES)})
    return runs


def run_sweep(sc: SweepConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every setting of `sc` for `sc.seeds` seeds; returns {'settings': {name: {'label', 'config', 'runs',
    'claims'}}, 'table': rows claim x setting (k, n, fraction, interval, attribution counts)}."""
    out: dict[str, Any] = {"seeds": sc.seeds, "x64": sc.x64, "settings": {},
                           "claims": {k: {"paper": v[0], "check": v[1]} for k, v in CLAIMS.items()}}
    shared: dict = {}
    with jax.enable_x64(sc.x64):
        for name in sc.settings:
            st = SETTINGS[name]
            cfg = st.apply(sc.base)
            runs = run_setting(cfg, sc.seeds, pretrained=shared,
                               progress=(lambda msg, n=name: progress(f"{n}: {msg}")) if progress else None)
            out["settings"][name] = {"label": st.label, "config": cfg.to_dict(), "runs": runs,
                                     "claims": [evaluate(r) for r in runs], "agreement": agreement(runs)}
    out["table"] = claim_table(out)
    return out


def agreement(runs: list[dict]) -> dict[str, float]:
    """Mean over runs and datasets of the fraction of per-pair changes (above rounding) whose sign each
    first-order account predicts: 'one' (one-pair SGD theory), 'batch' (2B x 2B Gram), 'lin' (the
    real update to first order)."""
    out = {}
    for lv in ("one", "batch", "lin"):
        v = [r[m][f"agree_{lv}"] for r in runs for m in MODES if not math.isnan(r[m][f"agree_{lv}"])]
        out[lv] = float(np.mean(v)) if v else float("nan")
    return out


def claim_table(sweep: dict) -> list[dict]:
    """Rows {claim, setting, k, n, fraction, interval, attribution {term: count}} (claim-major)."""
    rows = []
    for cid in CLAIMS:
        for name, s in sweep["settings"].items():
            ev = [c[cid] for c in s["claims"]]
            k, n = sum(e["holds"] for e in ev), len(ev)
            att: dict[str, int] = {}
            for e in ev:
                if not e["holds"]:
                    att[e["term"]] = att.get(e["term"], 0) + 1
            rows.append({"claim": cid, "setting": name, "k": k, "n": n, "fraction": k / n if n else float("nan"),
                         "interval": list(wilson(k, n)), "attribution": att})
    return rows
