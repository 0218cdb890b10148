"""Simulation presets: build a policy and data set from a flat config, run chunked sweeps with
resume. This sits above the trainer (CLI, reports and notebooks use it; nothing below imports it)."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path
from typing import Any

import jax
import numpy as np

from . import validate as _v
from . import data, results
from .policies import lastlayer, softmax
from .train import TrainConfig, Trajectory, pretrain_sft, sweep, train

POLICIES = ("softmax", "linear", "lastlayer", "lastlayer-embed")
TASKS = ("geometry", "1t", "suffix", "prefix", "edit")


@dataclasses.dataclass(frozen=True)
class SimConfig:
    """A simulation: policy, task and training. Frozen, hashable, JSON-able via `as_dict`.

    geometry task (softmax / linear): `pairs` pairs with cos(g_w, g_l) = cos and
    |g_l|/|g_w| = norm_ratio at the start (R7 initial conditions). Token tasks (lastlayer*):
    vocabulary K, prompt_len, suffix/prefix length L, edit positions edit_k of length edit_T.
    """

    policy: str = "linear"
    task: str = "geometry"
    pairs: int = 16
    K: int = 8
    d: int = 8
    cos: float = 0.9
    norm_ratio: float = 2.0
    L: int = 8
    prompt_len: int = 2
    edit_T: int = 6
    edit_k: int = 2
    decay: float = 0.5
    init_noise: float = 0.0
    sft_steps: int = 0
    sft_lr: float = 0.05
    train: TrainConfig = TrainConfig()

    def __post_init__(self):
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; valid: {', '.join(POLICIES)}")
        if self.task not in TASKS:
            raise ValueError(f"unknown task {self.task!r}; valid: {', '.join(TASKS)}")
        if self.task == "geometry" and self.policy not in ("softmax", "linear"):
            raise ValueError(f"task 'geometry' needs --policy softmax or linear, got {self.policy!r}")
        if self.task != "geometry" and self.policy not in ("lastlayer", "lastlayer-embed"):
            raise ValueError(f"token task {self.task!r} needs --policy lastlayer or lastlayer-embed")
        _v.integer("K", self.K, lo=2)  # a pair needs two responses
        _v.integer("suffix/prefix length L", self.L, lo=0)
        _v.integer("pairs", self.pairs, lo=1)
        _v.integer("d", self.d, lo=1)
        _v.integer("sft_steps", self.sft_steps, lo=0)
        _v.integer("prompt_len", self.prompt_len, lo=1)
        _v.integer("edit_T", self.edit_T, lo=1)
        _v.integer("edit_k", self.edit_k, lo=0)
        _v.real("cos", self.cos, lo=-1, hi=1)
        _v.real("norm_ratio", self.norm_ratio, lo=0, lo_open=True)
        _v.real("decay", self.decay, lo=0, hi=1)
        _v.real("init_noise", self.init_noise, lo=0)
        _v.real("sft_lr", self.sft_lr, lo=0, lo_open=True)

    def as_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["train"]["loss_params"] = [list(x) for x in self.train.loss_params]
        return d


def build(cfg: SimConfig, key):
    """(policy, initial params, batch) for a config, deterministic in `key`.

    With sft_steps > 0 the initial params are an SFT warm start on the chosen responses.
    """
    pol, params, batch = _build_raw(cfg, key)
    if cfg.sft_steps > 0:
        params = pretrain_sft(pol, params, batch, steps=cfg.sft_steps, lr=cfg.sft_lr)
    return pol, params, batch


def _build_raw(cfg: SimConfig, key):
    if cfg.task == "geometry":
        gp = data.geometry_pairs(key, cfg.policy, cfg.pairs, cfg.K, cfg.cos, cfg.norm_ratio, d=cfg.d)
        return gp.policy(), gp.params, gp.batch
    k_data, k_init = jax.random.split(key)
    kw = dict(n_pairs=cfg.pairs, K=cfg.K, prompt_len=cfg.prompt_len)
    if cfg.task in ("suffix", "prefix"):
        kw["L"] = cfg.L
    if cfg.task == "edit":
        kw.update(T=cfg.edit_T, k=cfg.edit_k)
    batch = data.make_task(cfg.task, k_data, **kw)
    pol = lastlayer.make(lastlayer.LastLayerConfig(K=cfg.K, d=cfg.d, decay=cfg.decay,
                                                   trainable_embedding=cfg.policy == "lastlayer-embed"))
    return pol, pol.init(k_init), batch


def run(cfg: SimConfig, key) -> Trajectory:
    """One run of a configuration: `[S, B]` records."""
    pol, params, batch = build(cfg, key)
    return jax.jit(lambda p, k: train(pol, p, batch, cfg.train, k))(params, jax.random.fold_in(key, 1))


def run_sweep(cfg: SimConfig, seed: int, runs: int, *, out=None, chunk: int | None = None,
              progress: bool | None = None) -> Trajectory:
    """`runs` runs in chunks (one compiled vmapped program each), with a progress bar on a terminal.

    With `out`, each chunk is written atomically as `chunk_0000.npz`, `chunk_0001.npz`, ... next to `config.json`; an
    interrupted sweep resumes from the chunks already on disk. Returns [R, S, B] records.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    chunk = chunk or max(1, min(runs, 64))
    n_chunks = -(-runs // chunk)
    key = jax.random.PRNGKey(seed)
    pol, params, batch = build(cfg, jax.random.fold_in(key, 0))
    outdir = None
    if out is not None:
        outdir = results.prepare_dir(out, {"sim": cfg.as_dict(), "seed": seed, "runs": runs, "chunk": chunk})
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm.auto import tqdm

    parts = []
    for i in tqdm(range(n_chunks), desc="simulate", unit="chunk", disable=not show):
        n = min(chunk, runs - i * chunk)
        path = None if outdir is None else Path(outdir) / f"chunk_{i:04d}.npz"
        cached = None if path is None else results.load_chunk(path)  # None: missing or damaged
        if cached is not None:
            parts.append(Trajectory(**cached))
            continue
        params0 = params if (cfg.task == "geometry" or cfg.sft_steps > 0) else None
        traj = sweep(pol, batch, cfg.train, jax.random.fold_in(key, i + 1), n, params0=params0,
                     init_noise=cfg.init_noise)
        traj = jax.tree.map(np.asarray, traj)
        if path is not None:
            results.save_chunk(path, **traj._asdict())
        parts.append(traj)
    # a chunk saved before a field existed holds None there: the field is then None for the whole run
    return Trajectory(*[None if any(x is None for x in xs) else np.concatenate(xs, 0) for xs in zip(*parts)])


def run_mitigated(cfg: SimConfig, seed: int, runs: int, mitigation: str, *, out=None,
                  progress: bool | None = None) -> dict[str, Any]:
    """`runs` runs of `cfg` with a mitigation (`entangle_sim.mitigations.METHODS`), one compiled
    program, and the summary averaged over runs (the schema of `run_sweep` + `train.summarize`, plus
    the mitigation's own statistics; `mitigations.simulation_summary`).

    With `out`, each run's records ([S, B]; masks [S, B, T]) are written atomically as `run_0000.npz`,
    `run_0001.npz`, ... next to `config.json`; an interrupted call resumes from the runs on disk
    (a damaged or partial file is recomputed). Returns the summary dict.
    """
    from . import mitigations

    if mitigation not in mitigations.METHODS:
        raise ValueError(f"unknown mitigation {mitigation!r}; valid: none, {', '.join(mitigations.METHODS)}")
    _v.integer("runs", runs, lo=1)
    key = jax.random.PRNGKey(seed)
    pol, params, batch = build(cfg, jax.random.fold_in(key, 0))
    outdir = None
    if out is not None:
        outdir = results.prepare_dir(out, {"sim": cfg.as_dict(), "seed": seed, "runs": runs,
                                           "mitigation": mitigation})
    show = sys.stderr.isatty() if progress is None else progress
    from tqdm.auto import tqdm

    summaries = []
    for r in tqdm(range(runs), desc=f"simulate ({mitigation})", unit="run", disable=not show):
        path = None if outdir is None else Path(outdir) / f"run_{r:04d}.npz"
        cached = None if path is None else results.load_chunk(path)   # None: missing or damaged
        if cached is not None:
            rec = mitigations.MitigationRecord(**cached)
        else:
            rec, _ = mitigations.run_with_mitigation(pol, params, batch, cfg.train, mitigation,
                                                     jax.random.fold_in(key, r + 1))
            rec = jax.tree.map(np.asarray, rec)
            if path is not None:
                results.save_chunk(path, **rec._asdict())
        summaries.append(mitigations.simulation_summary(rec))
    out_d: dict[str, Any] = {"config": cfg.as_dict(), "runs": runs, "seed": seed, "mitigation": mitigation}
    for k, v in summaries[0].items():
        if isinstance(v, dict):
            out_d[k] = {kk: float(np.mean([s[k][kk] for s in summaries])) for kk in v}
        else:
            out_d[k] = float(np.mean([s[k] for s in summaries]))
    return out_d

