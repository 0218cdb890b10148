"""Shared pieces of the log readers: formats, the series types, `LogFormatError`, the notes a reader
keeps, and the parsing helpers (numbers, JSON lines, de-duplicated steps, `entangle/*` entries)."""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from typing import NamedTuple

import numpy as np

from .. import regimes

FORMATS = ("trl", "official-csv", "official-jsonl", "pairs-jsonl")
SPLITS = ("auto", "train", "eval")
FORMAT_LABELS = {
    "trl": "TRL trainer_state.json",
    "official-csv": "official-code gradient CSV",
    "official-jsonl": "official-code gradient JSONL",
    "pairs-jsonl": "per-pair JSONL",
}

# Official gradient columns: the first four are required, the last two optional.
GRAD_REQUIRED = ("Step", "InnerProduct", "Grad_W_Norm", "Grad_L_Norm")
GRAD_OPTIONAL = ("Correlation", "Grad_Condition")
# Per-pair record aliases, first match wins.
PAIR_ID_KEYS = ("pair", "id", "pair_id")
PAIR_CHOSEN_KEYS = ("chosen_logp", "chosen_logps")
PAIR_REJECTED_KEYS = ("rejected_logp", "rejected_logps")

CONDITION_AGGREGATE = ("ratio of per-step means: rho_w = InnerProduct / Grad_W_Norm^2, "
                       "rho_l = InnerProduct / Grad_L_Norm^2, rho = max(rho_w, rho_l); the squared "
                       "mean norms stand in for mean G_ww, G_ll (an approximation: "
                       "(mean |g|)^2 <= mean |g|^2)")
LOGGED_CONDITION = ("Grad_Condition as logged by the official code: mean over pairs of G_wl/G_ww "
                    "(divides by the chosen norm twice, so it tests only the chosen half of "
                    "Condition 1; docs/theory.md section 7.3, bug 1)")


class LogFormatError(ValueError):
    """A log that cannot be read or analysed; the message is one line naming the file."""


class PairRecords(NamedTuple):
    """Per-pair records of a ``pairs-jsonl`` log, R rows sorted by step (stable).

    step [R], pair (R ids as str), chosen [R], rejected [R]; G_ww, G_wl, G_ll [R] with NaN where
    a record has no Gram entries, or None when no record has them.
    """

    step: np.ndarray
    pair: tuple
    chosen: np.ndarray
    rejected: np.ndarray
    G_ww: np.ndarray | None
    G_wl: np.ndarray | None
    G_ll: np.ndarray | None


class LogProbSeries(NamedTuple):
    """Chosen/rejected log-prob levels at N logged steps and their changes over M intervals.

    step, chosen, rejected: [N] float, steps increasing. chosen/rejected are means over the
    logged batch (TRL logs sequence-summed log-probs); for ``pairs-jsonl`` the first step's mean
    over pairs, then chained by the paired interval changes. step_start, step_end,
    delta_chosen, delta_rejected: [M]; for a series M = N - 1 and delta = level difference; for
    ``pairs-jsonl`` delta is the mean change of the pairs present at both ends of the interval.
    """

    source: str
    format: str
    split: str | None
    step: np.ndarray
    chosen: np.ndarray
    rejected: np.ndarray
    step_start: np.ndarray
    step_end: np.ndarray
    delta_chosen: np.ndarray
    delta_rejected: np.ndarray
    notes: tuple = ()
    pairs: PairRecords | None = None
    entangle: tuple = ()  # `entangle/*` measurements (EntanglementCallback), one dict per entry


class GradSeries(NamedTuple):
    """Per-checkpoint means over pairs from the official gradient script, N rows by step.

    inner = mean G_wl, cos = mean cosine, norm_w / norm_l = mean |g_w| / |g_l| (not squared),
    logged_condition = the logged (buggy) Grad_Condition. cos and logged_condition are NaN
    where the column is absent.
    """

    source: str
    format: str
    step: np.ndarray
    inner: np.ndarray
    cos: np.ndarray
    norm_w: np.ndarray
    norm_l: np.ndarray
    logged_condition: np.ndarray
    notes: tuple = ()


# --------------------------------------------------------------------------------------------
# Reading


class Notes:
    """Collects skipped-entry reasons and renders one line per reason (bounded length)."""

    def __init__(self):
        self._by_reason: dict[str, list] = {}
        self.lines: list[str] = []

    def skip(self, reason: str, where) -> None:
        self._by_reason.setdefault(reason, []).append(where)

    def add(self, line: str) -> None:
        self.lines.append(line)

    def render(self) -> tuple:
        out = []
        for reason, where in self._by_reason.items():
            shown = ", ".join(fmt_num(w) for w in where[:5]) + (", ..." if len(where) > 5 else "")
            out.append(f"skipped {len(where)} entr{'y' if len(where) == 1 else 'ies'} "
                       f"({reason}): {shown}")
        return tuple(out + self.lines)


def fmt_num(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def read_text(path: str) -> str:
    name = os.fspath(path)
    if not os.path.exists(name):
        raise LogFormatError(f"{name}: no such file")
    if os.path.isdir(name):
        hint = ""
        if os.path.isfile(os.path.join(name, "trainer_state.json")):
            hint = f" (did you mean {os.path.join(name, 'trainer_state.json')}?)"
        raise LogFormatError(f"{name}: is a directory, expected a log file{hint}")
    try:
        with open(name, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise LogFormatError(f"{name}: cannot read: {e.strerror or e}") from None
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise LogFormatError(f"{name}: not a UTF-8 text file (binary?)") from None
    if not text.strip():
        raise LogFormatError(f"{name}: file is empty")
    return text


def json_error(name: str, e: json.JSONDecodeError, what="JSON") -> LogFormatError:
    # An error at the very end of the text is what a half-written file looks like.
    unterminated = e.msg.startswith("Unterminated string")
    msg = "unterminated string" if unterminated else e.msg
    tail = " (file truncated?)" if unterminated or e.pos >= len(e.doc.rstrip()) - 1 else ""
    return LogFormatError(f"{name}: invalid {what} at line {e.lineno} column {e.colno}: "
                          f"{msg}{tail}")


def jsonl_records(name: str, text: str, notes: Notes) -> list:
    """Parse JSON lines; a corrupt *last* line (an interrupted write) is skipped with a note."""
    lines = [(i + 1, ln) for i, ln in enumerate(text.splitlines()) if ln.strip()]
    out = []
    for k, (lineno, ln) in enumerate(lines):
        try:
            rec = json.loads(ln)
        except json.JSONDecodeError as e:
            if k == len(lines) - 1 and k > 0:
                notes.add(f"line {lineno} is not valid JSON (truncated write?), skipped")
                continue
            raise LogFormatError(f"{name}: invalid JSON on line {lineno}: {e.msg} "
                                 f"(column {e.colno})") from None
        if not isinstance(rec, dict):
            raise LogFormatError(f"{name}: line {lineno} is a JSON {type(rec).__name__}, "
                                 "expected an object")
        out.append((lineno, rec))
    return out


def record_kind(rec: dict) -> str | None:
    if "log_history" in rec:
        return "trl"
    if all(k in rec for k in GRAD_REQUIRED):
        return "official-jsonl"
    if any(k in rec for k in PAIR_CHOSEN_KEYS) and any(k in rec for k in PAIR_REJECTED_KEYS):
        return "pairs-jsonl"
    return None


def looks_like_trl_entries(obj) -> bool:
    return isinstance(obj, list) and any(
        isinstance(e, dict) and any(k.endswith("logps/chosen") for k in e) for e in obj)


def detect_format(path: str, text: str | None = None) -> str:
    """The format name of the log at `path` (one of FORMATS), from its content."""
    name = os.fspath(path)
    text = read_text(name) if text is None else text
    ext = os.path.splitext(name)[1].lower()
    stripped = text.lstrip()
    if stripped[:1] in "{[":
        try:
            doc = json.loads(text)
        except json.JSONDecodeError as whole_err:
            # Not one JSON document: JSON lines? Look at the first few records.
            first_keys = None
            for ln in [ln for ln in stripped.splitlines() if ln.strip()][:20]:
                try:
                    rec = json.loads(ln)
                except json.JSONDecodeError:
                    continue
                if isinstance(rec, dict):
                    kind = record_kind(rec)
                    if kind in ("official-jsonl", "pairs-jsonl"):
                        return kind
                    first_keys = list(rec) if first_keys is None else first_keys
            if first_keys is not None:
                raise LogFormatError(f"{name}: unrecognised JSON-lines log (first record's keys: "
                                     f"{', '.join(first_keys[:8]) or 'none'}); use --format")
            raise json_error(name, whole_err) from None
        if isinstance(doc, dict):
            kind = record_kind(doc)
            if kind is not None:
                return kind
        if looks_like_trl_entries(doc):
            return "trl"
        raise LogFormatError(f"{name}: unrecognised JSON log (no 'log_history', no official "
                             "gradient columns, no chosen_logp/rejected_logp); use --format")
    header = next(csv.reader(io.StringIO(stripped)), [])
    header = [h.strip() for h in header]
    if all(k in header for k in GRAD_REQUIRED):
        return "official-csv"
    if ext == ".csv":
        missing = [k for k in GRAD_REQUIRED if k not in header]
        raise LogFormatError(f"{name}: CSV header lacks the official gradient columns "
                             f"{', '.join(missing)}")
    raise LogFormatError(f"{name}: unrecognised log format (expected a TRL trainer_state.json, "
                         "the official gradient CSV/JSONL, or a per-pair JSONL)")


def finite_or_none(x) -> float | None:
    """float(x) if x is a finite number (bools excluded), else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def dedupe_sorted(rows: list, notes: Notes, what="steps") -> list:
    """Sort (step, ...) rows by step; on repeated steps keep the last row, as a resumed run
    re-logs its steps and the later values are the ones that continued."""
    if any(rows[i][0] > rows[i + 1][0] for i in range(len(rows) - 1)):
        notes.add("rows were not in step order; sorted by step")
    last = {}
    for r in rows:
        last[r[0]] = r
    if len(last) < len(rows):
        counts = Counter(r[0] for r in rows)
        dup = sorted(s for s, c in counts.items() if c > 1)
        notes.add(f"repeated {what} {', '.join(fmt_num(s) for s in dup[:5])}: kept the last")
    return [last[s] for s in sorted(last)]


def make_series(name, fmt, split, step, chosen, rejected, notes, pairs=None) -> LogProbSeries:
    step, chosen, rejected = (np.asarray(a, dtype=float) for a in (step, chosen, rejected))
    return LogProbSeries(name, fmt, split, step, chosen, rejected, step[:-1], step[1:],
                         np.diff(chosen), np.diff(rejected), notes, pairs)


ENTANGLE_PREFIX = "entangle/"


def trl_entangle(history: list) -> tuple:
    """`entangle/*` entries of a log_history (EntanglementCallback), by step, keys without the prefix."""
    out = {}
    for entry in history:
        if not isinstance(entry, dict) or finite_or_none(entry.get("step")) is None:
            continue
        # entangle/group_* entries are the GRPO callback's (read by `group.trl_log`), not this one's
        vals = {k[len(ENTANGLE_PREFIX):]: finite_or_none(v) for k, v in entry.items()
                if k.startswith(ENTANGLE_PREFIX) and not k.startswith(ENTANGLE_PREFIX + "group_")}
        if vals:
            out.setdefault(float(entry["step"]), {}).update({k: v for k, v in vals.items() if v is not None})
    return tuple({"step": st, **v} for st, v in sorted(out.items()))


def summarize_entangle(ent: tuple) -> dict:
    """Predicted (first order, at one measurement) vs realised (at the next) changes and regimes."""
    comps = []
    for a, b in zip(ent, ent[1:]):
        keys = ("pred_delta_chosen", "pred_delta_rejected")
        if not all(k in a for k in keys) or "real_delta_chosen" not in b or "real_delta_rejected" not in b:
            continue
        pc, pr, rc, rr = a[keys[0]], a[keys[1]], b["real_delta_chosen"], b["real_delta_rejected"]
        comps.append({"step_start": rounded(a["step"]), "step_end": rounded(b["step"]),
                      "pred_delta_chosen": rounded(pc), "real_delta_chosen": rounded(rc),
                      "pred_delta_rejected": rounded(pr), "real_delta_rejected": rounded(rr),
                      "pred_regime": regimes.REGIMES[int(regimes.classify(np.array(pc), np.array(pr)))],
                      "real_regime": regimes.REGIMES[int(regimes.classify(np.array(rc), np.array(rr)))]})
    n = len(comps)
    return {
        "n_measurements": len(ent), "n_compared": n,
        "sign_agreement_chosen": sum((c["pred_delta_chosen"] > 0) == (c["real_delta_chosen"] > 0) for c in comps),
        "sign_agreement_rejected": sum((c["pred_delta_rejected"] > 0) == (c["real_delta_rejected"] > 0)
                                       for c in comps),
        "regime_agreement": sum(c["pred_regime"] == c["real_regime"] for c in comps),
        "cos_mean": [[rounded(e["step"]), rounded(e["cos_mean"])] for e in ent if "cos_mean" in e],
        "rho_mean": [[rounded(e["step"]), rounded(e["rho_mean"])] for e in ent if "rho_mean" in e],
        "comparisons": comps,
    }


def rounded(x, nd=6):
    """JSON-friendly rounding; integral values become int (steps), NaN/inf None (not JSON)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return int(x) if x.is_integer() and abs(x) < 2**53 else round(x, nd)
