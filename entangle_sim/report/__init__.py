"""Verification report: one check per result R1-R21 of docs/theory.md §12 and per qualitative claim.

Each entry is {id, statement, check, measured, threshold, pass, note}: `measured` is computed now
(never hard-coded), `pass` is True / False (None is kept in the schema for a check that cannot run). `run_report(preset)` runs them all; `write_report` writes
report.json and report.md (including the Table 2 analogue from the symbolic engine).

Checks use the package: the symbolic engine (`symbolic.derive`, `symbolic.proofs`,
`symbolic.softmax_theory`), the loss registry with `jax.grad`, exact one-step updates on toy
models, the trainer (`simulate`), `geometry`, `diagnose` and `mitigations`.

Modules: `toys` (entry rows, exact one-step toy models), `checks` (R1-R12, R21), `softmax_checks`
(R13-R20), `group_checks` (R22a-R22d, group entanglement), `claims` (qualitative claims from the figure data); this file runs and writes them.

Example:
    >>> rep = run_report("tiny")  # doctest: +SKIP
    >>> sum(e["pass"] is True for e in rep["entries"]), len(rep["entries"])  # doctest: +SKIP
"""
from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any, Callable

from .. import __version__, reproduce, results
from .checks import (R1_LOSSES, R9_LOSSES, check_R1, check_R2, check_R3, check_R4, check_R5, check_R6,  # noqa: F401
                     check_R7, check_R8, check_R9_R11_R12, check_R10, check_R21)
from .claims import DIAG_NOTE, check_claims, mitigation_claims  # noqa: F401
from .group_checks import check_R22
from .softmax_checks import check_R13, check_R14, check_R15, check_R16, check_R17, check_R18, check_R19
from .toys import clean, entry, one_step, toy_logps, toy_pairs  # noqa: F401


CHECKS: list[tuple[str, Callable]] = [
    ("R1", check_R1), ("R2", check_R2), ("R3", check_R3), ("R4", check_R4), ("R5", check_R5), ("R6", check_R6),
    ("R7", check_R7), ("R8", check_R8), ("R9-R11-R12", check_R9_R11_R12), ("R10", check_R10), ("R13", check_R13),
    ("R14", check_R14), ("R15", check_R15), ("R16", check_R16), ("R17", check_R17), ("R18", check_R18),
    ("R19", check_R19), ("R21", check_R21), ("R22", check_R22),
]


def _guard(name, fn, *args):
    try:
        return fn(*args)
    except Exception as e:  # a crashing check is a failed check, reported with its error
        return [entry(name, f"check {name}", "raised an exception", repr(e)[:500], "-", False,
                      note="the check itself failed to run")]


def run_report(preset_name: str = "quick", *, cache_dir=None, seed: int = reproduce.SEED,
               progress: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run every check (cached per check under cache_dir by configuration hash) and the claims."""
    reproduce.enable_x64()
    p = reproduce.preset(preset_name)["report"]
    entries, timings = [], {}
    for name, fn in CHECKS:
        t0 = time.perf_counter()
        path = None
        if cache_dir is not None:
            key = results.config_hash({"check": name, "p": p, "seed": seed, "version": __version__,
                                       "code": results.code_fingerprint()})
            path = Path(cache_dir) / f"report-{name}-{preset_name}-{key}.json"
        got = results.load_or_build(path, lambda: _guard(name, fn, p, seed), fmt="json")
        entries += got
        timings[name] = round(time.perf_counter() - t0, 2)
        if progress:
            progress(name)
    entries += _guard("claims", check_claims, preset_name, cache_dir, seed)
    n_pass = sum(e["pass"] is True for e in entries)
    n_fail = sum(e["pass"] is False for e in entries)
    n_na = sum(e["pass"] is None for e in entries)
    return {"preset": preset_name, "seed": seed, "version": __version__, "entries": entries,
            "summary": {"pass": n_pass, "fail": n_fail, "not_available": n_na, "total": len(entries)},
            "check_timings_s": timings, "conditions": reproduce.condition_rows()}


def _round(x):
    if isinstance(x, float):
        return float(f"{x:.4g}")
    if isinstance(x, dict):
        return {k: _round(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_round(v) for v in x]
    return x


def _fmt(x) -> str:
    """Compact display of a measured value (4 significant digits; report.json keeps full precision)."""
    s = json.dumps(_round(clean(x)), default=str)
    return s if len(s) <= 300 else s[:297] + "..."


def to_markdown(rep: dict) -> str:

    s = rep["summary"]
    lines = [f"# entangle_sim verification report ({rep['preset']} preset, seed {rep['seed']}, "
             f"version {rep['version']})", "",
             f"**{s['pass']} pass, {s['fail']} fail, {s['not_available']} not available** of {s['total']} entries. "
             "Every measured value is computed by this run; thresholds are stated per entry.", "",
             results.markdown_table(
                 ["id", "statement", "check", "measured", "threshold", "result"],
                 [[e["id"], e["statement"], e["check"], _fmt(e["measured"]), e["threshold"],
                   {True: "PASS", False: "**FAIL**", None: "n/a"}[e["pass"]]
                   + (f" ({e['note']})" if e.get("note") else "")] for e in rep["entries"]])]
    lines += ["", "## Loss-specific conditions (Table 2 analogue, symbolic engine)", "",
              "Chosen rises iff `G_wl <= t_w G_ww` (where `d_l > 0`); rejected falls iff `G_wl <= t_l G_ll` "
              "(where `d_w > 0`).", "", condition_table_markdown(rep["conditions"]), ""]
    return "\n".join(lines)


def write_report(rep: dict, out_dir) -> tuple[Path, Path]:
    """Write report.json and report.md (atomically) into out_dir."""
    out = Path(out_dir)
    results.save_json(out / "report.json", rep)
    results.save_text(out / "report.md", to_markdown(rep))
    return out / "report.json", out / "report.md"


def condition_table_markdown(rows) -> str:
    """The condition table as Markdown, in the compact named-symbol forms (derived in this project)."""
    return results.markdown_table(
        ["loss", "TRL", "chosen ↑ iff G_wl ≤ t_w G_ww, t_w =", "rejected ↓ iff G_wl ≤ t_l G_ll, t_l =", "d_w / d_l",
         "4th regime"],
        [[r["loss"], r["trl"], f"`{r['chosen_threshold']}`", f"`{r['rejected_threshold']}`",
          f"{r['d_w_sign']} / {r['d_l_sign']}", "possible" if r["fourth_regime_possible"] else "impossible"]
         for r in rows], escape=False)

