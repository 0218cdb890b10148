"""`entangle/group_*` entries (GroupEntanglementCallback) of a TRL `trainer_state.json`, read back.

    s = summary_of("run/trainer_state.json")   # None when the file has no entangle/group_* entry
    s["comparisons"]      # predicted (at one measurement) vs realised (at the next) change per interval

Each comparison pairs the first-order prediction logged at one measurement (`group_pred_delta_correct`,
`group_pred_delta_incorrect`: plain SGD at the logged learning rate) with the realised change logged at
the next one (`group_real_delta_*`); with Adam or a training set other than the probe set only the signs
are comparable.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

PREFIX = "entangle/group_"


def _num(x):
    return float(x) if isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) else None


def entries(history: list) -> list[dict]:
    """One dict per step holding entangle/group_* values (keys without the `entangle/` prefix), by step."""
    out: dict[float, dict] = {}
    for e in history:
        if not isinstance(e, dict) or _num(e.get("step")) is None:
            continue
        vals = {k[len("entangle/"):]: _num(v) for k, v in e.items() if isinstance(k, str) and k.startswith(PREFIX)}
        vals = {k: v for k, v in vals.items() if v is not None}
        if vals:
            out.setdefault(float(e["step"]), {}).update(vals)
    return [{"step": s, **v} for s, v in sorted(out.items())]


def summarize(ent: list[dict]) -> dict:
    """Series of the logged geometry and predicted-vs-realised comparisons between measurements."""
    comps = []
    for a, b in zip(ent, ent[1:]):
        c = {"step_start": a["step"], "step_end": b["step"]}
        for side in ("correct", "incorrect"):
            p, r = a.get(f"group_pred_delta_{side}"), b.get(f"group_real_delta_{side}")
            if p is not None and r is not None:
                c[f"pred_delta_{side}"], c[f"real_delta_{side}"] = p, r
        if len(c) > 2:
            comps.append(c)

    def agree(side):
        k = [c for c in comps if f"pred_delta_{side}" in c]
        return sum((c[f"pred_delta_{side}"] > 0) == (c[f"real_delta_{side}"] > 0) for c in k), len(k)

    def series(key):
        return [[e["step"], e[key]] for e in ent if key in e]

    (ac, nc), (ai, ni) = agree("correct"), agree("incorrect")
    return {"n_measurements": len(ent), "n_compared": len(comps),
            "sign_agreement_correct": ac, "n_compared_correct": nc,
            "sign_agreement_incorrect": ai, "n_compared_incorrect": ni,
            "series": {k: series(f"group_{k}") for k in ("effective_rank", "top_eigen_frac", "frac_correct_fall",
                                                         "frac_zero_variance", "logps_correct", "logps_incorrect")},
            "comparisons": comps}


def summary_of(path) -> dict | None:
    """`summarize` of a trainer_state.json's log_history; None if the file is not JSON with such entries."""
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError, RecursionError):
        return None   # not ours to report: the ordinary reader says what is wrong with the file
    history = doc.get("log_history") if isinstance(doc, dict) else doc
    ent = entries(history) if isinstance(history, list) else []
    return summarize(ent) if ent else None


def text(s: dict) -> str:
    """Human summary lines."""
    lines = [f"entangle/group_* (GroupEntanglementCallback): {s['n_measurements']} measurements; predicted vs "
             f"realised over {s['n_compared']} intervals: correct-rollout sign {s['sign_agreement_correct']}/"
             f"{s['n_compared_correct']}, incorrect-rollout sign {s['sign_agreement_incorrect']}/"
             f"{s['n_compared_incorrect']}"]
    for key, what in (("effective_rank", "effective rank"), ("frac_correct_fall", "correct predicted to fall")):
        ser = s["series"][key]
        if ser:
            lines.append(f"{what}: " + ", ".join(f"step {st:g}: {v:.3g}" for st, v in ser[:8])
                         + (f", ... ({len(ser)} in all)" if len(ser) > 8 else ""))
    return "\n".join(lines)
