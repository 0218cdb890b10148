"""Figure data for `entangle-sim reproduce` (the experiment layer): builders and their cache.

Every figure that has a CPU toy analogue has one builder here, `build(preset, seed) -> data dict`
(symbolic engine, trainer, geometry, diagnose, mitigations); `BUILDERS[name]` says which preset
fields it reads. `load_or_run` caches each figure's data as one npz file named by the hash of
(figure, preset fields it reads, seed, package version, code fingerprint), through the results
layer, so a second run reuses it and an interrupted run resumes. Drawing lives above this layer
(`entangle_sim.figures`: FIGURES, render, save_figure); presets below it (`entangle_sim.presets`).

Example:
    >>> from entangle_sim import reproduce
    >>> data = reproduce.load_or_run("table1_regions", "tiny", cache_dir=None)   # no cache
"""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import __version__, claim_stats, data, diagnose, geometry, losses, mitigations, regimes, results, simulate, train
from .policies import lastlayer
from .presets import ALGO_LABELS, ALGORITHMS, MAP_STATE, PRESETS, SEED, Preset, enable_x64, preset  # noqa: F401
from .results import code_fingerprint, load_data, save_data  # noqa: F401  (re-exported)
from .symbolic import derive
from .symbolic.present import table_rows
from .train import TrainConfig


def _numeric_hp(spec) -> dict[str, Any]:
    return {k: v for k, v in spec.resolve().items() if not isinstance(v, str)}


def derivation(name: str):
    """(spec, Derivation at its structural defaults, numeric default hyperparameters)."""
    spec = losses.get(name)
    structural = {h.name: h.default for h in spec.hypers if h.structural or h.keep_value}
    return spec, derive(spec, **structural), _numeric_hp(spec)


def build_table1(p, seed) -> dict[str, Any]:
    """Table 1 region map over (rho_w, rho_l): DPO's first-order regime from the symbolic engine.

    At each (rho_w, rho_l) with equal signs and rho_w rho_l = cos^2 <= 1 the Gram is G_wl = s,
    G_ww = s/rho_w, G_ll = s/rho_l (s = sign); elsewhere no Gram matrix exists (code -1)."""
    _, der, hp = derivation("sigmoid")
    n = p["grid"] * 2
    ax = np.linspace(-1.5, 3.0, n)
    rw, rl = np.meshgrid(ax, ax, indexing="xy")   # x = rho_w, y = rho_l
    feasible = (rw * rl > 0) & (rw * rl <= 1.0)
    s = np.sign(rw)
    with np.errstate(divide="ignore", invalid="ignore"):
        G_ww = np.where(feasible, s / rw, 1.0)
        G_ll = np.where(feasible, s / rl, 1.0)
    G_wl = np.where(feasible, s, 0.0)
    vals = dict(MAP_STATE, **hp, G_ww=G_ww, G_wl=G_wl, G_ll=G_ll, eta=1.0)
    ev = der.evaluate(**vals)
    code = np.where(feasible, np.asarray(ev["regime_code"]), -1)
    return {"rho_w": ax, "rho_l": ax, "code": code.astype(int), "regimes": list(regimes.REGIMES)}


def regime_grid(name: str, state: dict, n: int, *, cos_range=(-1.0, 1.0), ratio_range=(0.1, 10.0), hp=None):
    """Regime codes of loss `name` on the plane (cos, r = |g_l|/|g_w|) at a pair state.

    G_ww = 1, G_ll = r^2, G_wl = cos r; first-order changes from the symbolic engine's
    delta_chosen / delta_rejected (eta = 1, default hyperparameters). Returns dict with cos [n],
    ratio [n] (log-spaced), code [n, n] (rows = ratio), delta_chosen, delta_rejected [n, n]."""
    spec, der, hp0 = derivation(name)
    hp = {**hp0, **{k: float(v) for k, v in (hp or {}).items()}}
    cos = np.linspace(*cos_range, n)
    ratio = np.geomspace(*ratio_range, n)
    C, R = np.meshgrid(cos, ratio, indexing="xy")
    vals = dict(state, **hp, G_ww=np.ones_like(C), G_wl=C * R, G_ll=R * R, eta=1.0)
    dcw = np.broadcast_to(np.asarray(der.delta_chosen(**vals), dtype=float), C.shape)
    dcl = np.broadcast_to(np.asarray(der.delta_rejected(**vals), dtype=float), C.shape)
    tol = 1e-12 * (np.abs(dcw) + np.abs(dcl)).max()
    return {"cos": cos, "ratio": ratio, "code": np.asarray(regimes.classify(dcw, dcl, tol=tol)).astype(int),
            "delta_chosen": dcw, "delta_rejected": dcl,
            "chosen_threshold": der.compact.text("t_w"), "rejected_threshold": der.compact.text("t_l"),
            "chosen_threshold_latex": der.compact.latex("t_w"), "rejected_threshold_latex": der.compact.latex("t_l"),
            "d_w": float(np.asarray(der.d_w(**vals)).ravel()[0]), "d_l": float(np.asarray(der.d_l(**vals)).ravel()[0])}


def explore(loss: str, *, beta: float | None = None, chosen_len: float = 10.0, rejected_len: float = 15.0,
            cos: float = 0.9, ratio: float = 2.0, n: int = 61, state: dict | None = None):
    """Conditions explorer: (regime-map data of one loss at the given beta and lengths, the
    first-order prediction at the point (cos, |g_l|/|g_w|) with G_ww = 1, eta = 1)."""
    spec, der, hp0 = derivation(loss)
    hp = dict(hp0)
    if beta is not None and "beta" in hp:
        hp["beta"] = float(beta)
    st = dict(state or MAP_STATE, chosen_len=float(chosen_len), rejected_len=float(rejected_len))
    grid = regime_grid(loss, st, n, hp=hp)
    maps = {"losses": [loss], "cos": grid["cos"], "ratio": grid["ratio"], "code": grid["code"][None],
            "chosen_threshold": [grid["chosen_threshold"]], "rejected_threshold": [grid["rejected_threshold"]],
            "chosen_threshold_latex": [grid["chosen_threshold_latex"]],
            "rejected_threshold_latex": [grid["rejected_threshold_latex"]],
            "d_w": [grid["d_w"]], "d_l": [grid["d_l"]], "state": st}
    ev = der.evaluate(**st, **hp, G_ww=1.0, G_wl=cos * ratio, G_ll=ratio ** 2, eta=1.0)
    pred = {k: float(ev[k]) for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin")}
    pred["regime"] = regimes.REGIMES[int(ev["regime_code"])]
    pred["hyperparameters"] = hp
    return maps, pred


def _build_maps(names, p, state=None):
    state = dict(state or MAP_STATE)
    grids = [regime_grid(n, state, p["grid"]) for n in names]
    return {"losses": [getattr(n, "name", n) for n in names], "cos": grids[0]["cos"], "ratio": grids[0]["ratio"],
            "code": np.stack([g["code"] for g in grids]),
            "chosen_threshold": [g["chosen_threshold"] for g in grids],
            "rejected_threshold": [g["rejected_threshold"] for g in grids],
            "chosen_threshold_latex": [g["chosen_threshold_latex"] for g in grids],
            "rejected_threshold_latex": [g["rejected_threshold_latex"] for g in grids],
            "d_w": [g["d_w"] for g in grids], "d_l": [g["d_l"] for g in grids],
            "state": state}


def regime_maps(losses_, *, n: int = 41, state: dict | None = None) -> dict[str, Any]:
    """Data of `plotting.theory.plot_regime_maps` for any losses (names or LossSpecs, user-defined
    ones included): first-order regime on the (cos, |g_l|/|g_w|) plane at `state` (default MAP_STATE)."""
    return _build_maps(list(losses_), {"grid": n}, state)


def build_regime_maps(p, seed):
    return _build_maps(ALGORITHMS, p)


def build_regime_maps_all(p, seed):
    return _build_maps(losses.names(), p)


def condition_rows(losses_=None) -> list[dict[str, Any]]:
    """The loss-specific condition table (Table 2 analogue) from the symbolic engine: every
    registered loss, or the given names / LossSpecs (user-defined ones included), in the compact
    named-symbol forms of `entangle_sim.symbolic.compact` (text and inline LaTeX).

    chosen rises <=> G_wl <= t_w G_ww (where d_l > 0); rejected falls <=> G_wl <= t_l G_ll (where d_w > 0)."""
    rows = []
    for r in table_rows(None if losses_ is None else list(losses_)):
        rows.append({"loss": r["loss"], "trl": r["trl"], "chosen_threshold": r["t_w"],
                     "rejected_threshold": r["t_l"], "chosen_threshold_latex": r["t_w_latex"],
                     "rejected_threshold_latex": r["t_l_latex"], "d_w_sign": r["d_w_sign"],
                     "d_l_sign": r["d_l_sign"], "fourth_regime_possible": r["fourth_regime_possible"]})
    return rows


def build_condition_table(p, seed):
    return {"rows": condition_rows()}


def _sim(loss, cos, ratio, pairs, steps, lr, seed, K=8, d=8):
    cfg = simulate.SimConfig(policy="linear", task="geometry", pairs=pairs, K=K, d=d, cos=cos, norm_ratio=ratio,
                             train=TrainConfig(loss=loss, optimizer="sgd", lr=lr, steps=steps, record=True))
    tr = simulate.run(cfg, jax.random.PRNGKey(seed))
    s = train.summarize(tr)
    t = jax.tree.map(np.asarray, tr)
    lw = np.concatenate([t.chosen_logps, t.chosen_logps[-1:] + t.real_chosen[-1:]]).mean(1)
    ll = np.concatenate([t.rejected_logps, t.rejected_logps[-1:] + t.real_rejected[-1:]]).mean(1)
    return {"chosen": lw, "rejected": ll, "step": np.arange(steps + 1),
            "pred_regime_first": regimes.fractions(t.regime_pred[0]),
            "predicted_regime_fractions": s["predicted_regime_fractions"],
            "regime_fractions": s["regime_fractions"], "mean_delta_chosen": s["mean_delta_chosen"],
            "mean_delta_rejected": s["mean_delta_rejected"], "mean_delta_margin": s["mean_delta_margin"],
            "cos0": s["mean_cos_first_step"], "config": cfg.as_dict(),
            "margin_monotone": bool(np.all(np.diff(lw - ll) >= -1e-12))}


def build_fig1(p, seed):
    """Fig. 1 analogue: DPO on the linear toy policy from R7 initial conditions (cos 0.95):
    rejected norm dominant (|g_l|/|g_w| = 2) -> both fall; chosen dominant (0.5) -> both rise."""
    runs = {}
    for key, ratio in (("rejected_dominant", 2.0), ("chosen_dominant", 0.5)):
        runs[key] = _sim("sigmoid", 0.95, ratio, p["fig1_pairs"], p["fig1_steps"], p["lr"], seed)
    return {"runs": runs, "order": ["rejected_dominant", "chosen_dominant"], "cos": 0.95,
            "ratios": {"rejected_dominant": 2.0, "chosen_dominant": 0.5}}


def build_algorithms(p, seed):
    """Algorithm comparison analogue: the six losses on one toy setting (linear policy, cos 0.9,
    |g_l|/|g_w| = 1.5, SGD), showing the regimes predicted by theory §4.3."""
    runs = {n: _sim(n, 0.9, 1.5, p["algo_pairs"], p["algo_steps"], p["lr"], seed) for n in ALGORITHMS}
    return {"runs": runs, "order": list(ALGORITHMS), "labels": dict(ALGO_LABELS), "cos": 0.9, "ratio": 1.5}


def _lastlayer(K=8, d=8, seed=1, decay=0.5):
    cfg = lastlayer.LastLayerConfig(K=K, d=d, decay=decay)
    pol = lastlayer.make(cfg)
    return cfg, pol, pol.init(jax.random.PRNGKey(seed))


def suffix_cos_table(Ls, pairs: int, seed: int = SEED, K: int = 8, d: int = 8) -> dict[str, Any]:
    """R17 on Setting A: per-pair Gram for suffix lengths L (one batch of the longest suffix,
    shorter ones masked out -- exact by causality). Means over pairs of cos, G_ww, G_ll, |g_w - g_l|^2."""
    Ls = [int(x) for x in Ls]
    _, pol, params = _lastlayer(K, d, seed + 1)
    Lmax = max(Ls)
    b = data.shared_suffix(jax.random.PRNGKey(seed + 2), pairs, K, prompt_len=2, L=Lmax)
    f = jax.jit(lambda m: geometry.pair_gram(pol.logps, params, b._replace(chosen_mask=m, rejected_mask=m)))
    out = {k: [] for k in ("cos", "cos_min", "cos_max", "G_ww", "G_ll", "G_wl", "diff")}
    for L in Ls:
        m = jnp.broadcast_to((jnp.arange(Lmax + 1) <= L).astype(float), (pairs, Lmax + 1))
        g = jax.tree.map(np.asarray, f(m))
        out["cos"].append(float(g.cos.mean()))
        out["cos_min"].append(float(g.cos.min()))
        out["cos_max"].append(float(g.cos.max()))
        out["G_ww"].append(float(g.G_ww.mean()))
        out["G_ll"].append(float(g.G_ll.mean()))
        out["G_wl"].append(float(g.G_wl.mean()))
        out["diff"].append(float((g.G_ww + g.G_ll - 2 * g.G_wl).mean()))
    return {"L": np.asarray(Ls), **{k: np.asarray(v) for k, v in out.items()}, "pairs": pairs, "K": K, "d": d}


def build_suffix_cos(p, seed):
    return suffix_cos_table(p["suffix_Ls"], p["suffix_pairs"], seed)


def build_suffix_dynamics(p, seed):
    """Fig. 3 toy analogue on the last-layer model: SFT warm start on the chosen responses, then DPO
    (reference = SFT policy, SGD) on '1t' (L = 0), short and long shared suffixes; mean chosen /
    rejected log-prob changes over steps."""
    Ls = p["suffix_Ls"]
    chosen_L = [0, Ls[len(Ls) // 2], Ls[-1]]
    runs = {}
    for L in chosen_L:
        cfg = simulate.SimConfig(policy="lastlayer", task="suffix", pairs=p["suffix_pairs"], K=8, d=8, L=int(L),
                                 sft_steps=p["sft_steps"],
                                 train=TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.5,
                                                   steps=p["suffix_steps"], record=False))
        tr = jax.tree.map(np.asarray, simulate.run(cfg, jax.random.PRNGKey(seed)))
        lw = np.concatenate([tr.chosen_logps, tr.chosen_logps[-1:] + tr.real_chosen[-1:]])
        ll = np.concatenate([tr.rejected_logps, tr.rejected_logps[-1:] + tr.real_rejected[-1:]])
        runs[f"L={int(L)}"] = {"chosen": (lw - lw[0]).mean(1), "rejected": (ll - ll[0]).mean(1),
                               "step": np.arange(lw.shape[0]), "L": int(L),
                               "mean_delta_chosen": float((lw[-1] - lw[0]).mean()),
                               "mean_delta_rejected": float((ll[-1] - ll[0]).mean())}
    return {"runs": runs, "order": list(runs), "sft_steps": p["sft_steps"]}


def build_token_heatmap(p, seed):
    """Token x token gradient cosines (Fig. 4b toy analogue): Setting A after an SFT warm start on
    the chosen responses, one shared-suffix pair."""
    L = p["heat_L"]
    cfg = simulate.SimConfig(policy="lastlayer", task="suffix", pairs=4, K=8, d=8, L=L, sft_steps=p["sft_steps"])
    pol, params, b = simulate.build(cfg, jax.random.fold_in(jax.random.PRNGKey(seed), 0))
    ex = jax.tree.map(lambda a: a[0], b)
    tg = jax.tree.map(np.asarray, geometry.token_gram(pol.token_logps, params, ex))
    diag = np.diag(tg.cos)[1:]
    return {"cos": tg.cos, "inner": tg.inner, "chosen_tokens": np.asarray(ex.chosen),
            "rejected_tokens": np.asarray(ex.rejected), "L": L, "sft_steps": p["sft_steps"],
            "contrastive_cos": float(tg.cos[0, 0]), "shared_diag_mean": float(np.mean(diag)),
            "shared_diag_max": float(np.max(diag))}


# ---------------------------------------------------------------- transformer (diagnose), optional

DIAG_KEYS = ("steps", "chosen_logp", "rejected_logp", "geometry", "interval_regimes", "token_cos",
             "chosen_tokens", "rejected_tokens")


def build_transformer(p, seed):
    """Figs. 3 / 4a / 4b toy analogues: `diagnose.run_diagnose` for suffix 1t / short / long."""
    out = {"suffixes": list(diagnose.SUFFIXES), "runs": {}}
    for suffix in diagnose.SUFFIXES:
        cfg = diagnose.DiagnoseConfig(suffix=suffix, seed=seed, **p["diag"])
        res = diagnose.run_diagnose(cfg)
        run = {k: res[k] for k in DIAG_KEYS}
        run["geometry"] = {k: np.asarray(v) for k, v in res["geometry"].items()}
        run["config"] = res["config"]
        run["summary"] = res["summary"]
        out["runs"][suffix] = run
    return out


def claims_sweep_config(p, seed) -> claim_stats.SweepConfig:
    """The claim sweep of a preset: SweepConfig's base recipe with the preset's overrides."""
    c = dict(p["claims"])
    base = dataclasses.replace(claim_stats.SweepConfig().base, seed=seed, **c.get("base", {}))
    return claim_stats.SweepConfig(base=base, settings=tuple(c["settings"]), seeds=int(c["seeds"]))


def build_transformer_claims(p, seed, progress=None):
    """The paper's transformer claims as statistics: `claim_stats.run_sweep` over the preset's settings
    and seeds (fraction holding, Wilson interval, attribution of every failure)."""
    return claim_stats.run_sweep(claims_sweep_config(p, seed), progress=progress)


def build_transformer_claims_scale(p, seed, progress=None):
    """The claims as the model grows: `claim_stats.run_scale` over the preset's sizes (claims_scale)."""
    c = dict(p["claims_scale"])
    base = dataclasses.replace(claim_stats.SweepConfig().base, seed=seed, **c.get("base", {}))
    sc = claim_stats.ScaleConfig(base=base, sizes=tuple((n, tuple(sorted(o.items()))) for n, o in c["sizes"]),
                                 settings=tuple(c["settings"]), seeds=int(c["seeds"]), budget_gb=c.get("budget_gb"))
    return claim_stats.run_scale(sc, progress=progress)


def build_mitigations(p, seed):
    """Mitigation comparison (theory §8, R19/R20): `mitigations.run_comparison` rows, SGD, DPO."""
    kw = dict(p["mitig"])
    res = mitigations.run_comparison(settings=tuple(kw.pop("settings")), methods=tuple(kw.pop("methods")),
                                     seed=seed, **kw)
    rows = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()} for r in res["rows"]]
    return {"rows": rows}


def build_group_lld(p, seed):
    """Group entanglement (theory §13): the lazy-likelihood-displacement toy with and without the
    shared-token mitigation (fixed size: 4 rollouts, 30 SGD steps; the toy's own seed 0)."""
    from .group import toys

    return toys.lld_data(0)


# ----------------------------------------------------------------------------------------------
# registry and cache


@dataclasses.dataclass(frozen=True)
class Builder:
    """How one figure's data is computed: build(preset, seed), the preset fields it reads (the cache
    key covers exactly these) and the optional modules whose code enters its cache key."""

    build: Callable[[Preset, int], dict]
    uses: tuple
    code: tuple = ()


BUILDERS: dict[str, Builder] = {
    "table1_regions": Builder(build_table1, ("grid",)),
    "regime_maps": Builder(build_regime_maps, ("grid",)),
    "regime_maps_all": Builder(build_regime_maps_all, ("grid",)),
    "condition_table": Builder(build_condition_table, ("-",)),
    "fig1_toy": Builder(build_fig1, ("fig1_pairs", "fig1_steps", "lr")),
    "algorithms": Builder(build_algorithms, ("algo_pairs", "algo_steps", "lr")),
    "suffix_cos": Builder(build_suffix_cos, ("suffix_Ls", "suffix_pairs")),
    "suffix_dynamics": Builder(build_suffix_dynamics, ("suffix_Ls", "suffix_pairs", "suffix_steps", "sft_steps")),
    "token_heatmap": Builder(build_token_heatmap, ("heat_L", "sft_steps")),
    "transformer_logps": Builder(build_transformer, ("diag",), ("diagnose.py", "sentiment.py", "corpus.py",
                                                                 "policies/transformer.py")),
    "transformer_claims": Builder(build_transformer_claims, ("claims",), ("diagnose.py", "sentiment.py", "corpus.py",
                                                                          "claim_stats.py", "policies/transformer.py")),
    "transformer_claims_scale": Builder(build_transformer_claims_scale, ("claims_scale",), (
        "diagnose.py", "sentiment.py", "corpus.py", "claim_stats.py", "policies/transformer.py")),
    "mitigations": Builder(build_mitigations, ("mitig",), results.OPTIONAL_CODE),
    "group_lld": Builder(build_group_lld, ("-",)),
}
# Figures sharing one builder share one cache file (the transformer runs are computed once).
DATA_OF = {"transformer_cos": "transformer_logps", "transformer_heatmap": "transformer_logps"}


def cache_key(name: str, preset_name: str, seed: int = SEED) -> str:
    """Configuration hash of one figure's data: the preset parameters its builder reads, the seed,
    the package version and the fingerprint of the code it runs."""
    p = preset(preset_name)
    b = BUILDERS[DATA_OF.get(name, name)]
    return results.config_hash({"figure": name, "preset": {k: p[k] for k in b.uses if k in p}, "seed": seed,
                                "version": __version__, "code": code_fingerprint(b.code)})


def cache_path(cache_dir, name: str, preset_name: str, seed: int = SEED) -> Path:
    return Path(cache_dir) / f"{name}-{preset_name}-{cache_key(name, preset_name, seed)}.npz"


def load_or_run(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED,
                force: bool = False) -> dict[str, Any]:
    """The data of builder `name`: from `cache_dir` if cached under this configuration's hash, else
    built and (with a cache_dir) saved atomically. cache_dir=None: always build, never write."""
    builder = BUILDERS[name]
    path = None if cache_dir is None else cache_path(cache_dir, name, preset_name, seed)

    def build():
        enable_x64()
        out = builder.build(preset(preset_name), seed)
        out.setdefault("preset", preset_name)
        out.setdefault("seed", seed)
        return out

    return results.load_or_build(path, build, force=force)


def figure_data(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED) -> dict[str, Any]:
    """Data for figure `name` (shared builders resolved through `DATA_OF`), cached."""
    return load_or_run(DATA_OF.get(name, name), preset_name, cache_dir=cache_dir, seed=seed)
