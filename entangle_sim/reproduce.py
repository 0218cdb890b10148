"""Figure data for `entangle-sim reproduce`: presets, builders, a cache keyed by configuration hash.

Every figure of docs/theory.md §9 that has a CPU toy analogue is one entry of `FIGURES`:

    name -> Figure(build(preset) -> data dict, plot(data) -> matplotlib Figure, doc)

`build` computes the numbers (symbolic engine, trainer, geometry, diagnose); `plot` is a pure
`plot_*` function of `entangle_sim.plotting.theory` / `.simulation` / `.diagnose`. `load_or_run`
caches each figure's data as one npz file named by the hash of (figure, preset parameters,
package version), written atomically, so a second run reuses it and an interrupted run resumes.

Presets: 'tiny' (tests, seconds), 'quick' (< 5 min on 2 cores), 'full' (< 30 min on 2 cores).

Example:
    >>> from entangle_sim import reproduce
    >>> data = reproduce.load_or_run("table1_regions", "tiny", cache_dir=None)   # no cache
    >>> fig = reproduce.FIGURES["table1_regions"].plot(data)
"""
from __future__ import annotations

import dataclasses
import importlib.util
import json
import os
from pathlib import Path
from typing import Any, Callable

import numpy as np

from . import __version__, results

SEED = 0

# The six losses of the algorithm comparison (theory §6.2, §9): DPO (sigmoid), IPO, R-DPO, DPOP, SimPO, RRHF.
ALGORITHMS = ("sigmoid", "ipo", "rdpo", "dpop", "simpo", "rrhf")
ALGO_LABELS = {"sigmoid": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "dpop": "DPOP", "simpo": "SimPO", "rrhf": "RRHF"}

# One stated pair state for the regime maps (r_w = -1 < 0 so DPOP's penalty is active; the RRHF
# ranking hinge is active because lbar_w = -2.1 < lbar_l = -1.6; n_w != n_l).
MAP_STATE = dict(chosen_logps=-21.0, rejected_logps=-24.0, ref_chosen_logps=-20.0, ref_rejected_logps=-22.0,
                 chosen_len=10.0, rejected_len=15.0, prompt_logps=0.0, prompt_len=0.0)

PRESETS: dict[str, dict[str, Any]] = {
    "tiny": dict(grid=24, fig1_pairs=4, fig1_steps=20, algo_pairs=4, algo_steps=20, lr=0.5,
                 suffix_Ls=(0, 2, 8), suffix_pairs=4, suffix_steps=10, heat_L=4, sft_steps=20,
                 diag=dict(sft_steps=2, po_steps=2, log_every=1, n_eval_pairs=4, d_model=16, n_layers=1,
                           n_heads=2, sft_batch=8, po_batch=4, long_len=6),
                 mitig=dict(settings=("tabular", "lastlayer-short"), methods=("baseline", "normalized", "oracle_mask"),
                            steps=3, pairs=2, sft_steps=0),
                 report=dict(points=64, r15_draws=2000, r17_Ls=(0, 2, 8, 32), r4_pairs=64, r9_draws=32,
                             grams=2000, r19_pairs=200)),
    "quick": dict(grid=81, fig1_pairs=16, fig1_steps=200, algo_pairs=16, algo_steps=200, lr=0.5,
                  suffix_Ls=(0, 1, 2, 4, 8, 16, 32), suffix_pairs=16, suffix_steps=60, heat_L=8, sft_steps=100,
                  diag=dict(sft_steps=100, po_steps=60, log_every=10, n_eval_pairs=16),
                  mitig=dict(settings=("linear", "lastlayer-long"),
                             methods=("baseline", "normalized", "oracle_mask", "learned_mask"), steps=40, pairs=8,
                             sft_steps=0),
                  report=dict(points=1000, r15_draws=20000, r17_Ls=(0, 1, 2, 4, 8, 16, 32, 64), r4_pairs=256,
                              r9_draws=200, grams=20000,
                              r19_pairs=1000)),
    "full": dict(grid=201, fig1_pairs=32, fig1_steps=400, algo_pairs=32, algo_steps=400, lr=0.5,
                 suffix_Ls=(0, 1, 2, 4, 8, 16, 32, 64), suffix_pairs=32, suffix_steps=120, heat_L=12, sft_steps=100,
                 diag=dict(),  # DiagnoseConfig defaults
                 mitig=dict(settings=("tabular", "linear", "lastlayer-1t", "lastlayer-short", "lastlayer-long",
                                      "transformer-long"),
                            methods=("baseline", "normalized", "normalized_batch", "oracle_mask", "learned_mask",
                                     "dpop", "nll"), steps=40, pairs=8, sft_steps=150),
                 report=dict(points=5000, r15_draws=20000, r8_all=True, r17_Ls=(0, 1, 2, 4, 8, 16, 32, 64),
                             r4_pairs=1024, r9_draws=500, grams=100000,
                             r19_pairs=1000)),
}


def preset(name: str) -> dict[str, Any]:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def enable_x64() -> None:
    """Float64 for every check and figure (first-order predictions are compared to ~1e-10)."""
    import jax

    jax.config.update("jax_enable_x64", True)


def available(module: str) -> bool:
    """Whether an optional package module (e.g. 'entangle_sim.mitigations') is importable."""
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


# ----------------------------------------------------------------------------------------------
# cache: arrays in npz, everything else as one JSON string; nested dicts flattened with '/'


def _flatten(d: dict, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Nested dict -> ({'a/b': array}, {'a/c': JSON value}); non-empty dicts are descended into."""
    arrays, meta = {}, {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if "/" in str(k):
            raise ValueError(f"data key {k!r} must not contain '/'")
        if isinstance(v, dict) and v:
            a, m = _flatten(v, key + "/")
            arrays.update(a)
            meta.update(m)
        elif isinstance(v, (np.ndarray, np.generic)) or type(v).__module__.startswith("jax"):
            arrays[key] = np.asarray(v)
        else:
            meta[key] = v
    return arrays, meta


def _unflatten(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in [*meta.items(), *arrays.items()]:
        parts = k.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def save_data(path, data: dict[str, Any]) -> None:
    """Atomically write a figure's data dict (arrays + JSON-able values) to one npz file."""
    arrays, meta = _flatten(data)
    arrays["__json__"] = np.asarray(json.dumps(meta, default=_json_default))
    results.save_npz(path, **arrays)


def load_data(path) -> dict[str, Any]:
    arrays = results.load_npz(path)
    meta = json.loads(str(arrays.pop("__json__")))
    return _unflatten(arrays, meta)


def _json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


_SKIP_FINGERPRINT = ("plotting", "cli", "report.py", "reproduce.py", "logs.py", "distributed.py")
# Optional modules enter the fingerprint only of the figures that use them.
_OPTIONAL_CODE = ("diagnose.py", "sentiment.py", "mitigations.py", "symbolic/mitigations.py",
                  "policies/transformer.py")


def code_fingerprint(extra: tuple = ()) -> str:
    """Hash of the package's computational source files (not plotting / CLI / report code): a change
    to the science invalidates cached results, a change to a figure's look does not. Optional
    modules (`_OPTIONAL_CODE`) are included only when named in `extra`."""
    import hashlib

    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        if rel.split("/")[0] in _SKIP_FINGERPRINT or (rel in _OPTIONAL_CODE and rel not in extra):
            continue
        h.update(rel.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


_CODE_OF = {"transformer_logps": ("diagnose.py", "sentiment.py", "policies/transformer.py"),
            "mitigations": _OPTIONAL_CODE}


def cache_key(name: str, preset_name: str, seed: int = SEED) -> str:
    """Configuration hash of one figure's data: the preset parameters its builder reads, the seed,
    the package version and the fingerprint of the code it runs."""
    p = preset(preset_name)
    keys = FIGURES[name].uses if name in FIGURES and FIGURES[name].uses else tuple(sorted(p))
    return results.config_hash({"figure": name, "preset": {k: p[k] for k in keys if k in p}, "seed": seed,
                                "version": __version__, "code": code_fingerprint(_CODE_OF.get(name, ()))})


def cache_path(cache_dir, name: str, preset_name: str, seed: int = SEED) -> Path:
    return Path(cache_dir) / f"{name}-{preset_name}-{cache_key(name, preset_name, seed)}.npz"


def load_or_run(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED,
                force: bool = False) -> dict[str, Any]:
    """The data of figure `name`: from `cache_dir` if cached under this configuration's hash, else
    built and (with a cache_dir) saved atomically. cache_dir=None: always build, never write."""
    fig = FIGURES[name]
    path = None if cache_dir is None else cache_path(cache_dir, name, preset_name, seed)
    if path is not None and path.exists() and not force:
        try:
            return load_data(path)
        except Exception:  # a corrupt cache file (not expected: writes are atomic) is rebuilt
            pass
    enable_x64()
    data = fig.build(preset(preset_name), seed)
    data.setdefault("preset", preset_name)
    data.setdefault("seed", seed)
    if path is not None:
        save_data(path, data)
    return data


# ----------------------------------------------------------------------------------------------
# builders


def _numeric_hp(spec) -> dict[str, Any]:
    return {k: v for k, v in spec.resolve().items() if not isinstance(v, str)}


def derivation(name: str):
    """(spec, Derivation at its structural defaults, numeric default hyperparameters)."""
    from . import losses
    from .symbolic import derive

    spec = losses.get(name)
    structural = {h.name: h.default for h in spec.hypers if h.structural or h.keep_value}
    return spec, derive(spec, **structural), _numeric_hp(spec)


def build_table1(p, seed) -> dict[str, Any]:
    """Table 1 region map over (rho_w, rho_l): DPO's first-order regime from the symbolic engine.

    At each (rho_w, rho_l) with equal signs and rho_w rho_l = cos^2 <= 1 the Gram is G_wl = s,
    G_ww = s/rho_w, G_ll = s/rho_l (s = sign); elsewhere no Gram matrix exists (code -1)."""
    from . import regimes

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
    from . import regimes

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
    from . import regimes

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
    from . import losses

    return _build_maps(losses.names(), p)


def condition_rows(losses_=None) -> list[dict[str, Any]]:
    """The loss-specific condition table (Table 2 analogue) from the symbolic engine: every
    registered loss, or the given names / LossSpecs (user-defined ones included), in the compact
    named-symbol forms of `entangle_sim.symbolic.compact` (text and inline LaTeX).

    chosen rises <=> G_wl <= t_w G_ww (where d_l > 0); rejected falls <=> G_wl <= t_l G_ll (where d_w > 0)."""
    from .symbolic.compact import table_rows

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
    import jax

    from . import regimes, simulate, train
    from .train import TrainConfig

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
    import jax

    from .policies import lastlayer

    cfg = lastlayer.LastLayerConfig(K=K, d=d, decay=decay)
    pol = lastlayer.make(cfg)
    return cfg, pol, pol.init(jax.random.PRNGKey(seed))


def suffix_cos_table(Ls, pairs: int, seed: int = SEED, K: int = 8, d: int = 8) -> dict[str, Any]:
    """R17 on Setting A: per-pair Gram for suffix lengths L (one batch of the longest suffix,
    shorter ones masked out -- exact by causality). Means over pairs of cos, G_ww, G_ll, |g_w - g_l|^2."""
    import jax
    import jax.numpy as jnp

    from . import data, geometry

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
    import jax

    from . import simulate
    from .train import TrainConfig

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
    import jax

    from . import geometry, simulate

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
    from . import diagnose

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


def build_mitigations(p, seed):
    """Mitigation comparison (theory §8, R19/R20): `mitigations.run_comparison` rows, SGD, DPO."""
    from . import mitigations

    kw = dict(p["mitig"])
    res = mitigations.run_comparison(settings=tuple(kw.pop("settings")), methods=tuple(kw.pop("methods")),
                                     seed=seed, **kw)
    rows = [{k: (float(v) if isinstance(v, (float, np.floating)) else v) for k, v in r.items()} for r in res["rows"]]
    return {"rows": rows}


# ----------------------------------------------------------------------------------------------
# registry


@dataclasses.dataclass(frozen=True)
class Figure:
    name: str
    build: Callable[[dict, int], dict]
    plot: Callable[..., Any]
    title: str
    theory: str
    requires: str | None = None  # optional module that must be importable
    uses: tuple = ()  # preset keys the builder reads (the cache key covers exactly these)

    @property
    def is_available(self) -> bool:
        return self.requires is None or available(self.requires)


def _plot(module: str, fn: str):
    def call(data, **kw):
        mod = importlib.import_module(f"entangle_sim.plotting.{module}")
        return getattr(mod, fn)(data, **kw)
    call.__name__ = fn
    return call


FIGURES: dict[str, Figure] = {f.name: f for f in [
    Figure("table1_regions", build_table1, _plot("theory", "plot_table1_regions"),
           "Table 1: the three cases over (rho_w, rho_l)", "R4, R5"),
    Figure("regime_maps", build_regime_maps, _plot("theory", "plot_regime_maps"),
           "Regime maps of the six compared losses in the (cos, |g_l|/|g_w|) plane", "R9, R12"),
    Figure("regime_maps_all", build_regime_maps_all, _plot("theory", "plot_regime_maps"),
           "Regime maps of every registered loss", "R9, R12, R21"),
    Figure("condition_table", build_condition_table, _plot("theory", "plot_condition_table"),
           "Table 2 analogue: loss-specific conditions from the symbolic engine", "R1, R9, R12"),
    Figure("fig1_toy", build_fig1, _plot("simulation", "plot_fig1"),
           "Fig. 1 analogue: both down / both up from R7 initial conditions", "R7, §6.1"),
    Figure("algorithms", build_algorithms, _plot("simulation", "plot_algorithms"),
           "Algorithm comparison analogue: six losses on one toy setting", "R12, §6.2"),
    Figure("suffix_cos", build_suffix_cos, _plot("theory", "plot_suffix_cos"),
           "R17: cos(g_w, g_l) vs shared-suffix length on the last-layer model", "R17"),
    Figure("suffix_dynamics", build_suffix_dynamics, _plot("simulation", "plot_suffix_dynamics"),
           "Fig. 3 toy analogue on the last-layer model: log-probs vs step by suffix length", "R17, §6.3"),
    Figure("token_heatmap", build_token_heatmap, _plot("simulation", "plot_token_heatmap"),
           "Fig. 4b toy analogue: token-level gradient cosines (last-layer model)", "R13, R17"),
    Figure("transformer_logps", build_transformer, _plot("simulation", "plot_transformer_logps"),
           "Fig. 3 analogue: tiny transformer, chosen/rejected log-probs for 1t/short/long", "§6.3",
           requires="entangle_sim.diagnose"),
    Figure("transformer_cos", build_transformer, _plot("simulation", "plot_transformer_cos"),
           "Fig. 4a analogue: gradient cosine vs step for 1t/short/long", "§6.3, R15, R17",
           requires="entangle_sim.diagnose"),
    Figure("transformer_heatmap", build_transformer, _plot("simulation", "plot_transformer_heatmap"),
           "Fig. 4b analogue: token-level gradient cosines, long suffix", "§6.3, R13",
           requires="entangle_sim.diagnose"),
    Figure("mitigations", build_mitigations, _plot("simulation", "plot_mitigation_comparison"),
           "Mitigation comparison: normalized GD and token masks vs plain DPO", "R19, R20, §8",
           requires="entangle_sim.mitigations"),
]}

_USES = {"table1_regions": ("grid",), "regime_maps": ("grid",), "regime_maps_all": ("grid",),
         "condition_table": ("-",), "fig1_toy": ("fig1_pairs", "fig1_steps", "lr"),
         "algorithms": ("algo_pairs", "algo_steps", "lr"), "suffix_cos": ("suffix_Ls", "suffix_pairs"),
         "suffix_dynamics": ("suffix_Ls", "suffix_pairs", "suffix_steps", "sft_steps"),
         "token_heatmap": ("heat_L", "sft_steps"), "transformer_logps": ("diag",), "transformer_cos": ("diag",),
         "transformer_heatmap": ("diag",), "mitigations": ("mitig",)}
FIGURES = {n: dataclasses.replace(f, uses=_USES[n]) for n, f in FIGURES.items()}

# Figures sharing one builder share one cache file (the transformer runs are computed once).
DATA_OF = {"transformer_cos": "transformer_logps", "transformer_heatmap": "transformer_logps"}


def figure_data(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED) -> dict[str, Any]:
    """Data for figure `name` (shared builders resolved through `DATA_OF`), cached."""
    return load_or_run(DATA_OF.get(name, name), preset_name, cache_dir=cache_dir, seed=seed)


def render(name: str, preset_name: str = "quick", *, cache_dir=None, seed: int = SEED):
    """(matplotlib Figure, data) of figure `name`."""
    data = figure_data(name, preset_name, cache_dir=cache_dir, seed=seed)
    return FIGURES[name].plot(data), data


def save_figure(fig, out_dir, name: str) -> list[Path]:
    """Save a Figure as PNG and PDF (atomically: temp file + rename); returns the two paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for ext in ("png", "pdf"):
        path = out / f"{name}.{ext}"
        tmp = out / f".{name}.{os.getpid()}.tmp.{ext}"
        fig.savefig(tmp, format=ext)
        os.replace(tmp, path)
        paths.append(path)
    return paths
