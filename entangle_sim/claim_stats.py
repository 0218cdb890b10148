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

Scale (`run_scale`, `entangle-sim claims --preset scale`): the same sweep at growing model sizes,
per claim and size the fraction holding with its interval and attribution; for the single-token
claims the support of every account per size (`support`) and where the claim and its dominant
failure term turn (`turns`); the SGD control 'sgd_scaled' at a rate in units of the reference Gram
(SGD_KAPPA), with the second-order remainder of every run (`first_order`).

Size: settings, claims, the vmapped programs and the scale sweep read the same run records; split,
each part would re-export the others' names.

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

from . import corpus, diagnose, geometry, losses, regimes, sentiment, train
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


# The SGD control's rate in units of the reference model's Gram (setting 'sgd_scaled'): the step is
# lr = SGD_KAPPA / Gbar, Gbar = mean over a long-suffix batch of (|grad l_w|^2 + |grad l_l|^2) / 2 at the
# reference (SFT) model. The one-pair first-order change is eta/b (d_w G_ww - d_l G_wl) and the
# cross-pair terms are also rate x Gram entries: fixing lr x Gbar fixes the size of the predicted
# per-step change (in nats) at every model size, while Gbar itself grows with the model (more
# parameters contribute to |grad l|^2). Calibration (measured, L2-d32-V32, the quick recipe, 5 seeds,
# float32): Gbar = GBAR_REF; there the absolute rate 0.01 (kappa = 12.6) left the first-order range
# in one of 15 runs (remainder |real - lin| / |lin| = 0.47; median 0.006), kappa = 1 kept every run
# below 0.003. The remainder/first-order ratio grows about linearly with the rate, so kappa = 4 (rate
# 0.0032 at the reference) keeps a margin of ~10x below FIRST_ORDER_TOL; the sweep records the rate,
# Gbar and the remainder of every run (`first_order`) to check it at every size.
GBAR_REF = 1262.0
SGD_KAPPA = 4.0
FIRST_ORDER_TOL = 0.1   # a run is first order when the remainder is below 10% of the first-order change

SETTINGS: dict[str, Setting] = {s.name: s for s in [
    Setting("paper", "paper-like: pretrained, SFT without suffix, DPO beta 0.1, Adam, 16 pairs per batch"),
    Setting("from_scratch", "no pretraining (SFT also on the suffix)", (("pretrain_steps", 0),)),
    Setting("sgd", "SGD instead of Adam (lr 0.01: per-step changes within the first-order range)",
            (("optimizer", "sgd"), ("po_lr", 0.01))),
    Setting("sgd_scaled", "SGD at the rate SGD_KAPPA / (mean Gram diagonal of the reference model): the same "
            "first-order step at every model size (0.0032 at the width-32 reference)",
            (("optimizer", "sgd"), ("po_lr_unit", "per_gram"), ("po_lr", lambda c: SGD_KAPPA))),
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
    # memory for the recorded Jacobians of one PO call (`runs_per_call`); None: every run at once
    budget_gb: float | None = None

    def __post_init__(self):
        for s in self.settings:
            if s not in SETTINGS:
                raise ValueError(f"unknown setting {s!r}; valid: {', '.join(SETTINGS)}")
        if not isinstance(self.seeds, int) or self.seeds < 1:
            raise ValueError(f"seeds must be a positive int, got {self.seeds!r}")


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
    """(policy, scfg, stage_a, stage_b, measure, measure_tokens): jitted, vmapped programs of one run structure.

    stage_a(keys [R], nums) -> (pretrained params [R], {pretrain_loss, suffix_logp} [R]);
    stage_b(params, keys, modes, nums) -> (ref, final, sums) [R] (`diagnose.compose`: SFT then PO);
    measure(ref, final, modes, keys) -> eval-set measurements [R]; measure_tokens(ref, final, keys) ->
    token-level cosines of eval pair 0 of the long-suffix set (the only dataset the heat-map claims
    read). nums: `_numbers(cfg)` (traced). hp_static: the non-numeric loss hyperparameters."""
    cfg = structure
    scfg = dataclasses.replace(cfg.sentiment, mode="long")
    policy = transformer.make(cfg.transformer)
    sft_mode = 2 if cfg.sft_on_suffix else 0
    n_tail = min(10, cfg.pretrain_steps)

    def stage_a(key, nums):
        k_init, k_pre = jax.random.split(key)
        params, losses_ = corpus.pretrain(policy, policy.init(k_init), scfg, cfg.corpus, k_pre,
                                          steps=cfg.pretrain_steps, lr=nums["pretrain_lr"], batch=cfg.pretrain_batch)
        # what pretraining is for: the shared suffix is probable (per-token log-prob of suffix tokens
        # 2.., the first one carries the choice among carrier phrases), comparable across sizes
        pairs = sentiment.preference_pairs(scfg, jax.random.fold_in(k_pre, 1), 64)
        tok_w, _ = policy.token_logps(params, pairs)
        stats = {"pretrain_loss": losses_[-n_tail:].mean() if n_tail else jnp.nan,
                 "suffix_logp": tok_w[:, 2:].mean()}
        return params, stats

    def observe(rec, batch, ref_logps, p0, p1):
        means = {f"{lv}_{side}": getattr(rec, f"{name}_{full}").mean()
                 for lv, name in (("one", "pred"), ("batch", "batch"), ("lin", "lin"), ("real", "real"))
                 for side, full in (("w", "chosen"), ("l", "rejected"))}
        signs = {}   # as `train.summarize`: only changes above the rounding of a log-prob difference
        for lv, name in (("one", "pred"), ("batch", "batch"), ("lin", "lin")):
            signs[f"agree_{lv}"], signs[f"counted_{lv}"] = regimes.sign_agreement_counts(
                getattr(rec, f"{name}_chosen"), getattr(rec, f"{name}_rejected"), rec.real_chosen,
                rec.real_rejected, rec.chosen_logps, rec.rejected_logps)
        # first-order check: the second-order remainder real - lin against the first-order change lin
        lin = jnp.concatenate([rec.lin_chosen, rec.lin_rejected])
        real = jnp.concatenate([rec.real_chosen, rec.real_rejected])
        fo = {"fo_lin": jnp.abs(lin).mean(), "fo_rem": jnp.abs(real - lin).mean()}
        return {**means, **signs, **fo}

    def stage_b(params, key, mode, nums):
        hp = {**dict(hp_static), **nums["hp"]}
        k_sft, k_po = jax.random.split(key)
        smode = jnp.where(sft_mode == 0, 0, mode)    # the from-scratch recipe shows the run's own suffix
        res = diagnose.compose(
            policy, cfg, hp, params, rates=nums, record=True,
            sft_keys=jax.random.split(k_sft, cfg.sft_steps), po_keys=jax.random.split(k_po, cfg.po_steps),
            sft_data=lambda k: train.sft_pairs(*sentiment.mode_batches(scfg, k, cfg.sft_batch, smode)[1][:3]),
            po_data=lambda k: sentiment.mode_batches(scfg, k, cfg.po_batch, mode)[0],
            observe=observe, gram_key=jax.random.fold_in(key, 7) if cfg.po_lr_unit == "per_gram" else None)
        rec = res["po"]
        sums = {k: v.sum() for k, v in rec.items() if not k.startswith(("agree", "counted"))}
        for lv in ("one", "batch", "lin"):   # fraction over every counted (step, pair, side)
            n = rec[f"counted_{lv}"].sum()
            sums[f"agree_{lv}"] = jnp.where(n > 0, rec[f"agree_{lv}"].sum() / jnp.maximum(n, 1), jnp.nan)
        sums["po_lr"], sums["gram_diag_ref"] = res["po_lr"], res["gram_diag"]
        return res["ref"], res["params"], sums

    def evaluate_at(params, batch):
        lw, ll = policy.logps(params, batch)
        return lw.mean(), ll.mean(), geometry.pair_gram(policy.logps, params, batch).cos.mean()

    def measure(ref_p, fin_p, mode, key):
        batch, _ = sentiment.mode_batches(scfg, key, cfg.n_eval_pairs, mode)
        w0, l0, c0 = evaluate_at(ref_p, batch)
        w1, l1, c1 = evaluate_at(fin_p, batch)
        return {"eval_w": w1 - w0, "eval_l": l1 - l0, "cos_reference": c0, "cos_final": c1,
                "chosen_ref": w0, "rejected_ref": l0}

    def measure_tokens(ref_p, fin_p, key):
        batch, _ = sentiment.mode_batches(scfg, key, cfg.n_eval_pairs, MODES.index("long"))
        ex = jax.tree.map(lambda a: a[0], batch)
        out = {}
        for at, p in (("reference", ref_p), ("final", fin_p)):
            tg = geometry.token_gram(policy.token_logps, p, ex, method="jacrev").cos
            out[f"tok_contrast_{at}"] = tg[0, 0]
            out[f"tok_shared_max_{at}"] = jnp.max(jnp.diag(tg)[1:])
        return out

    return (policy, scfg, jax.jit(jax.vmap(stage_a, in_axes=(0, None))),
            jax.jit(jax.vmap(stage_b, in_axes=(0, 0, 0, None))), jax.jit(jax.vmap(measure)),
            jax.jit(jax.vmap(measure_tokens)))


def _pretrain_key(cfg: DiagnoseConfig, seeds: int) -> tuple:
    """What stage a depends on: settings that agree here share one pretraining."""
    return (cfg.transformer, dataclasses.replace(cfg.sentiment, mode="long"), cfg.corpus, cfg.pretrain_steps,
            cfg.pretrain_lr, cfg.pretrain_batch, cfg.seed, seeds, jax.config.jax_enable_x64)


def n_params(cfg: DiagnoseConfig) -> int:
    """Parameter count of the transformer of cfg."""
    shapes = jax.eval_shape(transformer.make(cfg.transformer).init, jax.random.key(0))
    return int(sum(np.prod(a.shape) for a in jax.tree.leaves(shapes)))


def runs_per_call(cfg: DiagnoseConfig, runs: int, budget_gb: float | None) -> int:
    """How many runs (seed x dataset) one call of the PO program holds: the recorded per-response
    Jacobians [2 po_batch, P] of its runs, with the copies the vmapped Jacobian makes (about 3), must
    fit in budget_gb (None: all runs). The largest divisor of `runs` that fits (one compiled shape)."""
    if budget_gb is None:
        return runs
    per_run = 3 * 2 * cfg.po_batch * n_params(cfg) * (8 if jax.config.jax_enable_x64 else 4)
    fit = max(1, int(budget_gb * 2**30 // per_run))
    return max(d for d in range(1, runs + 1) if runs % d == 0 and d <= fit)


def run_setting(cfg: DiagnoseConfig, seeds: int, *, progress: Callable[[str], None] | None = None,
                pretrained: dict | None = None, budget_gb: float | None = None) -> list[dict]:
    """`seeds` runs of one setting (each: pretraining, then SFT + DPO on the three datasets), as one
    compiled program per stage, vmapped over seeds (and modes). Returns one dict per seed:
    {mode: {eval_w, eval_l (eval-set mean changes), one_w ... real_l (summed batch-mean predictions
    and realised changes), agree_one / agree_batch / agree_lin (per-step sign agreement with the
    realised change), fo_lin / fo_rem (summed mean |lin| and |real - lin|: the first-order check),
    po_lr (the rate used), gram_diag_ref (Gbar of the reference), pretrain_loss, suffix_logp (after
    pretraining), cos_reference, cos_final, and for 'long' tok_contrast_*, tok_shared_max_*}}.
    pretrained: a dict shared between calls; runs whose pretraining is the same reuse it. Settings
    that differ only in rates or numeric loss hyperparameters reuse the compiled programs.
    budget_gb: memory for the recorded Jacobians of one PO call (`runs_per_call`; None: all runs)."""
    hp = losses.get(cfg.loss).resolve(**dict(cfg.loss_params))
    hp_static = tuple(sorted((k, v) for k, v in hp.items() if not isinstance(v, (int, float)) or isinstance(v, bool)))
    policy, scfg, stage_a, stage_b, measure, measure_tokens = _programs(_structure(cfg), hp_static)
    nums = jax.tree.map(jnp.asarray, _numbers(cfg))
    keys = jax.vmap(jax.random.key)(cfg.seed + 1000 * jnp.arange(seeds))
    k_a = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    k_b = jax.vmap(lambda k: jax.random.fold_in(k, 1))(keys)
    k_e = jax.vmap(lambda k: jax.random.fold_in(k, 2))(keys)
    pk = _pretrain_key(cfg, seeds)
    if pretrained is not None and pk in pretrained:
        pre, pre_stats = pretrained[pk]
    else:
        pre, pre_stats = jax.block_until_ready(stage_a(k_a, nums))
        if pretrained is not None:
            pretrained[pk] = (pre, pre_stats)
    if progress:
        progress("pretrained")
    n_modes, long = len(MODES), MODES.index("long")
    rep = lambda t: jax.tree.map(lambda a: jnp.repeat(a, n_modes, axis=0), t)  # noqa: E731  [seeds*modes]
    n_runs = seeds * n_modes
    chunk = runs_per_call(cfg, n_runs, budget_gb)
    modes_all = np.tile(np.arange(n_modes), seeds)
    pre_r, kb_r, ke_r = rep(pre), rep(k_b), rep(k_e)
    parts, toks = [], []
    for c0 in range(0, n_runs, chunk):
        sl = lambda t: jax.tree.map(lambda a: a[c0:c0 + chunk], t)  # noqa: E731
        modes = jnp.asarray(modes_all[c0:c0 + chunk])
        ref, final, sums = jax.block_until_ready(stage_b(sl(pre_r), sl(kb_r), modes, nums))
        meas = measure(ref, final, modes, sl(ke_r))
        parts.append({k: np.asarray(v) for k, v in {**sums, **meas}.items()})
        idx = np.flatnonzero(modes_all[c0:c0 + chunk] == long)       # the long-suffix runs of this call
        if len(idx):
            pick = lambda t: jax.tree.map(lambda a: a[idx], t)  # noqa: E731
            toks.append({k: np.asarray(v) for k, v in measure_tokens(pick(ref), pick(final), pick(sl(ke_r))).items()})
    if progress:
        progress("trained")
    allv = {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}
    tok = {k: np.concatenate([p[k] for p in toks]) for k in toks[0]}
    pst = {k: np.asarray(v) for k, v in pre_stats.items()}
    runs = []
    for s in range(seeds):
        run = {m: {k: float(v[s * n_modes + i]) for k, v in allv.items()} for i, m in enumerate(MODES)}
        run["long"].update({k: float(v[s]) for k, v in tok.items()})
        for m in MODES:
            run[m].update({k: float(v[s]) for k, v in pst.items()})
        runs.append(run)
    if progress:
        progress("measured")
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
            runs = run_setting(cfg, sc.seeds, pretrained=shared, budget_gb=sc.budget_gb,
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


# ---------------------------------------------------------------------------------------------- scale

SINGLE_TOKEN = ("1t-cos", "1t-chosen", "heat-contrast")
# the levels whose support of a claim is tracked along the scale: the accounts of the attribution
SUPPORT_LEVELS = {"1t-chosen": LEVELS, "1t-cos": ("reference", "final"), "heat-contrast": ("reference", "final")}


@dataclasses.dataclass(frozen=True)
class ScaleConfig:
    """A scale sweep: model sizes (name, DiagnoseConfig overrides on `base`), each run as a `SweepConfig`
    with these settings and seeds. Sizes may change width, depth, heads, vocabulary (n_neutral,
    n_suffix_vocab, ...) and the pretraining steps/rate."""

    base: DiagnoseConfig = SweepConfig().base
    sizes: tuple = (("L2-d32-V32", ()),)
    settings: tuple = ("paper", "sgd_scaled")
    seeds: int = 5
    x64: bool = False
    budget_gb: float | None = 2.0

    def size_configs(self) -> list[tuple[str, DiagnoseConfig]]:
        return [(name, dataclasses.replace(self.base, **dict(ov))) for name, ov in self.sizes]

    def __post_init__(self):
        SweepConfig(base=self.base, settings=self.settings, seeds=self.seeds)   # validates settings, seeds
        if not self.sizes:
            raise ValueError("a scale sweep needs at least one size")


def support(runs: list[dict], cid: str) -> dict[str, float]:
    """Fraction of seeds in which each level (account) of `cid` satisfies the claim: for 1t-chosen the
    one-pair / batch / first-order / realised / held-out changes, for the geometric claims the
    reference and final models. How much each account supports the claim at one size."""
    fn = CHANGE_CLAIMS.get(cid) or GEOMETRY_CLAIMS[cid]
    return {lv: float(np.mean([bool(fn(r, lv)) for r in runs])) for lv in SUPPORT_LEVELS[cid]}


def first_order(runs: list[dict]) -> dict[str, float]:
    """The first-order check of a setting: per run and dataset the second-order remainder
    sum |real - lin| / sum |lin| (PO steps, pairs, sides); its median and max, whether every run is
    below FIRST_ORDER_TOL, the summed chosen change predicted (lin) vs realised on the 1t dataset
    (mean over seeds), the rate used and the reference Gram diagonal (means over seeds)."""
    ratio = [r[m]["fo_rem"] / r[m]["fo_lin"] for r in runs for m in MODES if r[m]["fo_lin"] > 0]
    return {"remainder_median": float(np.median(ratio)), "remainder_max": float(np.max(ratio)),
            "first_order": bool(np.max(ratio) < FIRST_ORDER_TOL),
            "lin_1t_chosen": float(np.mean([r["1t"]["lin_w"] for r in runs])),
            "real_1t_chosen": float(np.mean([r["1t"]["real_w"] for r in runs])),
            "po_lr": float(np.mean([r["long"]["po_lr"] for r in runs])),
            "gram_diag_ref": float(np.nanmean([r["long"]["gram_diag_ref"] for r in runs]))
            if any(not math.isnan(r["long"]["gram_diag_ref"]) for r in runs) else float("nan")}


def run_scale(sc: ScaleConfig, *, progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Every size of `sc` (`run_sweep` with sc's settings and seeds). Returns {'sizes': {name: {'n_params',
    'config', 'settings' (as run_sweep), 'pretrain' {loss, suffix_logp}, 'support', 'first_order',
    'seconds'}}, 'table': rows claim x size x setting, 'turns': `turns(...)`}."""
    import time

    out: dict[str, Any] = {"seeds": sc.seeds, "x64": sc.x64, "settings": list(sc.settings), "sizes": {},
                           "claims": {k: {"paper": v[0], "check": v[1]} for k, v in CLAIMS.items()}}
    for name, cfg in sc.size_configs():
        t0 = time.perf_counter()
        sw = run_sweep(SweepConfig(base=cfg, settings=sc.settings, seeds=sc.seeds, x64=sc.x64, budget_gb=sc.budget_gb),
                       progress=(lambda msg, n=name: progress(f"{n} {msg}")) if progress else None)
        first = sw["settings"][sc.settings[0]]["runs"]
        out["sizes"][name] = {
            "n_params": n_params(cfg), "vocab": cfg.sentiment.vocab_size, "d_model": cfg.d_model,
            "n_layers": cfg.n_layers, "config": cfg.to_dict(), "settings": sw["settings"],
            "pretrain": {"loss": float(np.mean([r["long"]["pretrain_loss"] for r in first])),
                         "suffix_logp": float(np.mean([r["long"]["suffix_logp"] for r in first]))},
            "support": {s: {cid: support(v["runs"], cid) for cid in SINGLE_TOKEN}
                        for s, v in sw["settings"].items()},
            "first_order": {s: first_order(v["runs"]) for s, v in sw["settings"].items()},
            "seconds": time.perf_counter() - t0}
    out["table"] = scale_table(out)
    out["turns"] = turns(out)
    return out


def merge_scale(*results: dict) -> dict[str, Any]:
    """One scale result from several (e.g. the CPU sweep and the GPU run): sizes in order of their
    parameter count, the table and the turns recomputed."""
    out = {**results[0], "sizes": {}}
    for r in results:
        out["sizes"].update(r["sizes"])
    out["sizes"] = dict(sorted(out["sizes"].items(), key=lambda kv: kv[1]["n_params"]))
    out["settings"] = list(dict.fromkeys(s for r in results for s in r["settings"]))
    out["table"] = scale_table(out)
    out["turns"] = turns(out)
    return out


def scale_table(scale: dict) -> list[dict]:
    """Rows {claim, size, n_params, setting, k, n, fraction, interval, attribution} (claim-major)."""
    rows = []
    for name, sz in scale["sizes"].items():
        for r in claim_table(sz):
            rows.append({**r, "size": name, "n_params": sz["n_params"]})
    order = list(CLAIMS)
    return sorted(rows, key=lambda r: (order.index(r["claim"]), r["setting"], r["n_params"]))


def turns(scale: dict, setting: str = "paper") -> dict[str, dict]:
    """Where it turns, per single-token claim (setting `setting`): per size the fraction holding, the
    dominant failure term (most failing runs) and the support of every account; 'holds_from': the
    first size from which the Wilson lower bound stays above 1/2 (None: nowhere); 'term_changes':
    [(size, from term, to term)] where the dominant term changes; 'gains' / 'losses': accounts whose
    support grows / shrinks by at least 0.4 from the smallest to the largest size."""
    out = {}
    for cid in SINGLE_TOKEN:
        rows = [r for r in scale["table"] if r["claim"] == cid and r["setting"] == setting]
        if not rows:
            continue
        names = [r["size"] for r in rows]
        dom = [max(r["attribution"], key=r["attribution"].get) if r["attribution"] else None for r in rows]
        sup = [scale["sizes"][n]["support"][setting][cid] for n in names]
        holds_from = None
        for i in range(len(rows)):
            if all(r["interval"][0] > 0.5 for r in rows[i:]):
                holds_from = names[i]
                break
        changes = [(names[i], dom[i - 1], dom[i]) for i in range(1, len(rows)) if dom[i] != dom[i - 1]]
        delta = {lv: sup[-1][lv] - sup[0][lv] for lv in sup[0]}
        out[cid] = {"sizes": names, "fraction": [r["fraction"] for r in rows], "dominant_term": dom,
                    "support": sup, "holds_from": holds_from, "term_changes": changes,
                    "gains": [lv for lv, d in delta.items() if d >= 0.4],
                    "losses": [lv for lv, d in delta.items() if d <= -0.4]}
    return out
