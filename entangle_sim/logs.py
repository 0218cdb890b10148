"""Read training logs of real runs and classify each logging interval into a co-movement regime.

Formats (detected from content; the extension only breaks ties and shapes error messages):

* ``trl`` — TRL ``trainer_state.json``: ``log_history`` entries with ``logps/chosen``,
  ``logps/rejected`` (train) or ``eval_logps/chosen``, ``eval_logps/rejected`` (eval); batch
  means of sequence-summed log-probs (docs/theory.md §6.1, §10.3).
* ``official-csv`` / ``official-jsonl`` — per-checkpoint output of the official code's
  ``analysis/grad_plot.py`` (§7.2): ``Step, InnerProduct, Correlation, Grad_W_Norm, Grad_L_Norm,
  Grad_Condition``, each a mean over pairs; the norms are *not* squared, and ``Grad_Condition``
  is the buggy mean of ``G_wl/G_ww`` (§7.3, bug 1).
* ``pairs-jsonl`` — one record per (step, pair): ``step``, ``pair`` (or ``id``),
  ``chosen_logp``, ``rejected_logp`` and optionally ``G_ww, G_wl, G_ll``.

`load_log` returns a `LogProbSeries` (log-prob formats) or a `GradSeries` (gradient formats);
`summarize` turns either into a JSON-ready dict. Everything here is pure: no printing, no
writing. User errors raise `LogFormatError` (a ValueError) with a one-line message naming the file.

Example::

    series = load_log("trainer_state.json")           # auto format, auto split
    summary = summarize(series, tol=0.0)
    summary["regime_fractions"]["both_down"]

Size: one reader per log format (TRL trainer_state / JSONL, the official code's CSV and JSONL,
per-pair tables) sharing the same split / validation helpers; splitting by format would scatter them.
"""
from __future__ import annotations

import csv
import io
import json
import math
import os
from collections import Counter
from typing import NamedTuple

import numpy as np

from . import regimes

FORMATS = ("trl", "official-csv", "official-jsonl", "pairs-jsonl")
SPLITS = ("auto", "train", "eval")
FORMAT_LABELS = {
    "trl": "TRL trainer_state.json",
    "official-csv": "official-code gradient CSV",
    "official-jsonl": "official-code gradient JSONL",
    "pairs-jsonl": "per-pair JSONL",
}

# Official gradient columns: the first four are required, the last two optional.
_GRAD_REQUIRED = ("Step", "InnerProduct", "Grad_W_Norm", "Grad_L_Norm")
_GRAD_OPTIONAL = ("Correlation", "Grad_Condition")
# Per-pair record aliases, first match wins.
_PAIR_ID_KEYS = ("pair", "id", "pair_id")
_PAIR_CHOSEN_KEYS = ("chosen_logp", "chosen_logps")
_PAIR_REJECTED_KEYS = ("rejected_logp", "rejected_logps")

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


class _Notes:
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
            shown = ", ".join(_fmt_num(w) for w in where[:5]) + (", ..." if len(where) > 5 else "")
            out.append(f"skipped {len(where)} entr{'y' if len(where) == 1 else 'ies'} "
                       f"({reason}): {shown}")
        return tuple(out + self.lines)


def _fmt_num(x) -> str:
    if isinstance(x, float) and x.is_integer():
        return str(int(x))
    return str(x)


def _read_text(path: str) -> str:
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


def _json_error(name: str, e: json.JSONDecodeError, what="JSON") -> LogFormatError:
    # An error at the very end of the text is what a half-written file looks like.
    unterminated = e.msg.startswith("Unterminated string")
    msg = "unterminated string" if unterminated else e.msg
    tail = " (file truncated?)" if unterminated or e.pos >= len(e.doc.rstrip()) - 1 else ""
    return LogFormatError(f"{name}: invalid {what} at line {e.lineno} column {e.colno}: "
                          f"{msg}{tail}")


def _jsonl_records(name: str, text: str, notes: _Notes) -> list:
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


def _record_kind(rec: dict) -> str | None:
    if "log_history" in rec:
        return "trl"
    if all(k in rec for k in _GRAD_REQUIRED):
        return "official-jsonl"
    if any(k in rec for k in _PAIR_CHOSEN_KEYS) and any(k in rec for k in _PAIR_REJECTED_KEYS):
        return "pairs-jsonl"
    return None


def _looks_like_trl_entries(obj) -> bool:
    return isinstance(obj, list) and any(
        isinstance(e, dict) and any(k.endswith("logps/chosen") for k in e) for e in obj)


def detect_format(path: str, text: str | None = None) -> str:
    """The format name of the log at `path` (one of FORMATS), from its content."""
    name = os.fspath(path)
    text = _read_text(name) if text is None else text
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
                    kind = _record_kind(rec)
                    if kind in ("official-jsonl", "pairs-jsonl"):
                        return kind
                    first_keys = list(rec) if first_keys is None else first_keys
            if first_keys is not None:
                raise LogFormatError(f"{name}: unrecognised JSON-lines log (first record's keys: "
                                     f"{', '.join(first_keys[:8]) or 'none'}); use --format")
            raise _json_error(name, whole_err) from None
        if isinstance(doc, dict):
            kind = _record_kind(doc)
            if kind is not None:
                return kind
        if _looks_like_trl_entries(doc):
            return "trl"
        raise LogFormatError(f"{name}: unrecognised JSON log (no 'log_history', no official "
                             "gradient columns, no chosen_logp/rejected_logp); use --format")
    header = next(csv.reader(io.StringIO(stripped)), [])
    header = [h.strip() for h in header]
    if all(k in header for k in _GRAD_REQUIRED):
        return "official-csv"
    if ext == ".csv":
        missing = [k for k in _GRAD_REQUIRED if k not in header]
        raise LogFormatError(f"{name}: CSV header lacks the official gradient columns "
                             f"{', '.join(missing)}")
    raise LogFormatError(f"{name}: unrecognised log format (expected a TRL trainer_state.json, "
                         "the official gradient CSV/JSONL, or a per-pair JSONL)")


def _finite(x) -> float | None:
    """float(x) if x is a finite number (bools excluded), else None."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _dedupe_sorted(rows: list, notes: _Notes, what="steps") -> list:
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
        notes.add(f"repeated {what} {', '.join(_fmt_num(s) for s in dup[:5])}: kept the last")
    return [last[s] for s in sorted(last)]


def _series(name, fmt, split, step, chosen, rejected, notes, pairs=None) -> LogProbSeries:
    step, chosen, rejected = (np.asarray(a, dtype=float) for a in (step, chosen, rejected))
    return LogProbSeries(name, fmt, split, step, chosen, rejected, step[:-1], step[1:],
                         np.diff(chosen), np.diff(rejected), notes, pairs)


def _trl_entry_kind(entry: dict) -> str:
    return "eval" if any(k.startswith("eval_") for k in entry) else "train"


def _trl_logps(entry: dict, kind: str):
    """(chosen, rejected) raw values of an entry or None if it logs no log-probs.

    Eval entries use ``eval_logps/*``; unprefixed ``logps/*`` are accepted in either kind
    (custom callbacks and some TRL versions log them so)."""
    keys = (("eval_logps/chosen", "eval_logps/rejected"),) if kind == "eval" else ()
    keys += (("logps/chosen", "logps/rejected"),)
    for kc, kr in keys:
        if kc in entry or kr in entry:
            return entry.get(kc), entry.get(kr), kc, kr
    return None


def _load_trl(name: str, text: str, split: str) -> LogProbSeries:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise _json_error(name, e) from None
    history = doc.get("log_history") if isinstance(doc, dict) else doc
    if not isinstance(history, list):
        raise LogFormatError(f"{name}: no 'log_history' list (is this a trainer_state.json?)")
    buckets = {"train": [], "eval": []}
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            continue
        kind = _trl_entry_kind(entry)
        got = _trl_logps(entry, kind)
        if got is not None:
            buckets[kind].append((i, entry, got))
    if split == "auto":
        n_eval_usable = sum(_finite(c) is not None and _finite(r) is not None
                            for _, _, (c, r, _, _) in buckets["eval"])
        split = "eval" if n_eval_usable >= 2 else "train"
    entries = buckets[split]
    if not entries:
        other = "eval" if split == "train" else "train"
        key = "eval_logps/chosen" if split == "eval" else "logps/chosen"
        hint = f"; {len(buckets[other])} {other} entries have them, try --split {other}" \
            if buckets[other] else ""
        raise LogFormatError(f"{name}: no {split} entries with {key} and "
                             f"{key.replace('chosen', 'rejected')} in log_history{hint}")
    notes = _Notes()
    rows = []
    for i, entry, (c, r, kc, kr) in entries:
        step = _finite(entry.get("step"))
        where = entry.get("step", f"entry {i}")
        if step is None:
            notes.skip("no numeric 'step'", f"entry {i}")
        elif kc not in entry or kr not in entry:
            notes.skip(f"missing {kr if kc in entry else kc}", where)
        elif _finite(c) is None or _finite(r) is None:
            notes.skip("NaN or non-numeric log-prob", where)
        else:
            rows.append((step, float(c), float(r)))
    rows = _dedupe_sorted(rows, notes) if rows else rows
    if len(rows) < 2:
        raise LogFormatError(f"{name}: only {len(rows)} usable {split} entr"
                             f"{'y' if len(rows) == 1 else 'ies'} with finite log-probs; "
                             "need at least 2 to form an interval")
    if split == "train":
        notes.add("train entries average different batches, so interval changes mix learning "
                  "with batch-to-batch variation; eval entries use a fixed set")
    s, c, r = zip(*rows)
    return _series(name, "trl", split, s, c, r, notes.render())._replace(entangle=_trl_entangle(history))


ENTANGLE_PREFIX = "entangle/"


def _trl_entangle(history: list) -> tuple:
    """`entangle/*` entries of a log_history (EntanglementCallback), by step, keys without the prefix."""
    out = {}
    for entry in history:
        if not isinstance(entry, dict) or _finite(entry.get("step")) is None:
            continue
        vals = {k[len(ENTANGLE_PREFIX):]: _finite(v) for k, v in entry.items() if k.startswith(ENTANGLE_PREFIX)}
        if vals:
            out.setdefault(float(entry["step"]), {}).update({k: v for k, v in vals.items() if v is not None})
    return tuple({"step": st, **v} for st, v in sorted(out.items()))


def _summarize_entangle(ent: tuple) -> dict:
    """Predicted (first order, at one measurement) vs realised (at the next) changes and regimes."""
    comps = []
    for a, b in zip(ent, ent[1:]):
        keys = ("pred_delta_chosen", "pred_delta_rejected")
        if not all(k in a for k in keys) or "real_delta_chosen" not in b or "real_delta_rejected" not in b:
            continue
        pc, pr, rc, rr = a[keys[0]], a[keys[1]], b["real_delta_chosen"], b["real_delta_rejected"]
        comps.append({"step_start": _r(a["step"]), "step_end": _r(b["step"]),
                      "pred_delta_chosen": _r(pc), "real_delta_chosen": _r(rc),
                      "pred_delta_rejected": _r(pr), "real_delta_rejected": _r(rr),
                      "pred_regime": regimes.REGIMES[int(regimes.classify(np.array(pc), np.array(pr)))],
                      "real_regime": regimes.REGIMES[int(regimes.classify(np.array(rc), np.array(rr)))]})
    n = len(comps)
    return {
        "n_measurements": len(ent), "n_compared": n,
        "sign_agreement_chosen": sum((c["pred_delta_chosen"] > 0) == (c["real_delta_chosen"] > 0) for c in comps),
        "sign_agreement_rejected": sum((c["pred_delta_rejected"] > 0) == (c["real_delta_rejected"] > 0)
                                       for c in comps),
        "regime_agreement": sum(c["pred_regime"] == c["real_regime"] for c in comps),
        "cos_mean": [[_r(e["step"]), _r(e["cos_mean"])] for e in ent if "cos_mean" in e],
        "rho_mean": [[_r(e["step"]), _r(e["rho_mean"])] for e in ent if "rho_mean" in e],
        "comparisons": comps,
    }


def _grad_rows(name: str, records, notes: _Notes) -> tuple:
    """Validated columns (step, inner, cos, norm_w, norm_l, logged_condition), sorted by step."""
    rows = []
    for where, rec in records:
        vals = {k: _finite(rec.get(k)) for k in _GRAD_REQUIRED + _GRAD_OPTIONAL}
        missing = [k for k in _GRAD_REQUIRED if vals[k] is None]
        if missing:
            notes.skip(f"missing or NaN {missing[0]}", where)
        elif vals["Grad_W_Norm"] <= 0 or vals["Grad_L_Norm"] <= 0:
            notes.skip("non-positive gradient norm", where)
        else:
            opt = [np.nan if vals[k] is None else vals[k] for k in _GRAD_OPTIONAL]
            rows.append((vals["Step"], vals["InnerProduct"], opt[0], vals["Grad_W_Norm"],
                         vals["Grad_L_Norm"], opt[1]))
    rows = _dedupe_sorted(rows, notes) if rows else rows
    if not rows:
        raise LogFormatError(f"{name}: no usable rows (each needs finite "
                             f"{', '.join(_GRAD_REQUIRED)})")
    step, inner, cos, nw, nl, cond = (np.asarray(a, dtype=float) for a in zip(*rows))
    if np.isnan(cond).all():
        notes.add("no Grad_Condition column: no logged statistic to compare against")
    return step, inner, cos, nw, nl, cond


def _load_official_csv(name: str, text: str) -> GradSeries:
    reader = csv.DictReader(io.StringIO(text.lstrip()))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [k for k in _GRAD_REQUIRED if k not in header]
    if missing:
        raise LogFormatError(f"{name}: CSV lacks column(s) {', '.join(missing)}")
    reader.fieldnames = header
    notes = _Notes()
    try:
        # pandas writes NaN as an empty cell; _finite maps '' to None and the row is skipped
        records = [(f"row {i + 2}", rec) for i, rec in enumerate(reader)]
    except csv.Error as e:
        raise LogFormatError(f"{name}: malformed CSV: {e}") from None
    cols = _grad_rows(name, records, notes)
    return GradSeries(name, "official-csv", *cols, notes.render())


def _load_official_jsonl(name: str, text: str) -> GradSeries:
    notes = _Notes()
    records = [(f"line {ln}", rec) for ln, rec in _jsonl_records(name, text, notes)]
    cols = _grad_rows(name, records, notes)
    return GradSeries(name, "official-jsonl", *cols, notes.render())


def _first_key(rec: dict, keys):
    return next((k for k in keys if k in rec), None)


def pair_changes(pairs: PairRecords) -> dict:
    """Changes of every pair present at two consecutive logged steps.

    Returns numpy arrays of length K: ``interval`` (index into the consecutive-step intervals),
    ``pair`` (ids), ``delta_chosen``, ``delta_rejected`` and the Gram entries at the interval's
    start (``G_ww``, ``G_wl``, ``G_ll``; NaN where absent, None when the log has none), plus
    ``steps`` (the sorted unique steps).
    """
    steps = np.unique(pairs.step)
    by_step: dict = {}  # step -> {pair: row}
    for i, (s, p) in enumerate(zip(pairs.step, pairs.pair)):
        by_step.setdefault(s, {})[p] = i
    rows_start, rows_end, interval = [], [], []
    for k in range(len(steps) - 1):
        here, nxt = by_step[steps[k]], by_step[steps[k + 1]]
        for p in sorted(here.keys() & nxt.keys()):
            rows_start.append(here[p])
            rows_end.append(nxt[p])
            interval.append(k)
    i0, i1 = np.asarray(rows_start, dtype=int), np.asarray(rows_end, dtype=int)
    out = {"steps": steps, "interval": np.asarray(interval, dtype=int),
           "pair": [pairs.pair[i] for i in i0],
           "delta_chosen": pairs.chosen[i1] - pairs.chosen[i0],
           "delta_rejected": pairs.rejected[i1] - pairs.rejected[i0]}
    for g in ("G_ww", "G_wl", "G_ll"):
        arr = getattr(pairs, g)
        out[g] = None if arr is None else arr[i0]
    return out


def _load_pairs(name: str, text: str) -> LogProbSeries:
    notes = _Notes()
    rows = []
    for lineno, rec in _jsonl_records(name, text, notes):
        where = f"line {lineno}"
        kid, kc, kr = (_first_key(rec, ks) for ks in (_PAIR_ID_KEYS, _PAIR_CHOSEN_KEYS,
                                                      _PAIR_REJECTED_KEYS))
        step = _finite(rec.get("step"))
        if step is None:
            notes.skip("missing or non-numeric 'step'", where)
        elif kid is None:
            notes.skip("missing 'pair'/'id'", where)
        elif kc is None or kr is None:
            notes.skip("missing chosen_logp or rejected_logp", where)
        elif _finite(rec[kc]) is None or _finite(rec[kr]) is None:
            notes.skip("NaN or non-numeric log-prob", where)
        else:
            gram = [_finite(rec.get(g)) for g in ("G_ww", "G_wl", "G_ll")]
            gram = [np.nan if v is None else v for v in gram]
            rows.append((step, str(rec[kid]), float(rec[kc]), float(rec[kr]), *gram))
    if not rows:
        raise LogFormatError(f"{name}: no usable per-pair records (each needs step, pair or id, "
                             "chosen_logp and rejected_logp)")
    # keep the last record of a repeated (step, pair), then sort by step (stable)
    last = {}
    for r in rows:
        last[(r[0], r[1])] = r
    if len(last) < len(rows):
        notes.add(f"{len(rows) - len(last)} repeated (step, pair) records: kept the last")
    rows = sorted(last.values(), key=lambda r: r[0])
    step, pair, chosen, rejected, gww, gwl, gll = zip(*rows)
    gram = [np.asarray(g, dtype=float) for g in (gww, gwl, gll)]
    if all(np.isnan(g).all() for g in gram):
        gram = [None, None, None]
    pairs = PairRecords(np.asarray(step, float), tuple(pair), np.asarray(chosen, float),
                        np.asarray(rejected, float), *gram)
    ch = pair_changes(pairs)
    steps = ch["steps"]
    if len(steps) < 2:
        raise LogFormatError(f"{name}: records cover {len(steps)} step; need at least 2")
    # Levels are chained from the paired changes (starting at the first step's mean), so pairs
    # entering or leaving the log do not show up as movement; a gap restarts at the plain mean.
    level_c = [pairs.chosen[pairs.step == steps[0]].mean()]
    level_r = [pairs.rejected[pairs.step == steps[0]].mean()]
    dc, dr, s0, s1 = [], [], [], []
    for k in range(len(steps) - 1):
        sel = ch["interval"] == k
        if not sel.any():
            notes.add(f"no pair logged at both steps {_fmt_num(steps[k])} and "
                      f"{_fmt_num(steps[k + 1])}: interval skipped")
            level_c.append(pairs.chosen[pairs.step == steps[k + 1]].mean())
            level_r.append(pairs.rejected[pairs.step == steps[k + 1]].mean())
            continue
        s0.append(steps[k]); s1.append(steps[k + 1])
        dc.append(ch["delta_chosen"][sel].mean()); dr.append(ch["delta_rejected"][sel].mean())
        level_c.append(level_c[-1] + dc[-1]); level_r.append(level_r[-1] + dr[-1])
    if not dc:
        raise LogFormatError(f"{name}: no pair appears at two consecutive steps")
    return LogProbSeries(name, "pairs-jsonl", None, np.asarray(steps, float),
                         np.asarray(level_c), np.asarray(level_r), np.asarray(s0, float),
                         np.asarray(s1, float), np.asarray(dc), np.asarray(dr),
                         notes.render(), pairs)


def load_log(path, fmt: str = "auto", split: str = "auto") -> LogProbSeries | GradSeries:
    """Read a training log. `fmt`: "auto" or one of FORMATS; `split` (TRL only): auto/train/eval.

    auto split: eval if at least 2 eval entries carry finite log-probs, else train.
    """
    name = os.fspath(path)
    if fmt != "auto" and fmt not in FORMATS:
        raise LogFormatError(f"unknown format {fmt!r}; choose from auto, {', '.join(FORMATS)}")
    if split not in SPLITS:
        raise LogFormatError(f"unknown split {split!r}; choose from {', '.join(SPLITS)}")
    text = _read_text(name)
    fmt = detect_format(name, text) if fmt == "auto" else fmt
    if fmt == "trl":
        return _load_trl(name, text, split)
    if fmt == "official-csv":
        series = _load_official_csv(name, text)
    elif fmt == "official-jsonl":
        series = _load_official_jsonl(name, text)
    else:
        series = _load_pairs(name, text)
    if split != "auto":
        series = series._replace(notes=series.notes + (f"--split {split} applies only to TRL "
                                                       "logs; ignored",))
    return series


# --------------------------------------------------------------------------------------------
# Analysis


def condition_ratios(G_ww, G_wl, G_ll):
    """(rho_w, rho_l, rho) = (G_wl/G_ww, G_wl/G_ll, max of both); Case 1 <=> rho <= 1 (R4, §3.3).

    Same formula as `geometry.gram_stats`, in float64 NumPy: log values are host data, and a
    verdict at rho ~ 1 must not depend on JAX's x64 flag.
    """
    G_ww, G_wl, G_ll = (np.asarray(a, dtype=float) for a in (G_ww, G_wl, G_ll))
    with np.errstate(divide="ignore", invalid="ignore"):
        rho_w, rho_l = G_wl / G_ww, G_wl / G_ll
    return rho_w, rho_l, np.maximum(rho_w, rho_l)


def _r(x, nd=6):
    """JSON-friendly rounding; integral values become int (steps), NaN/inf None (not JSON)."""
    x = float(x)
    if not math.isfinite(x):
        return None
    return int(x) if x.is_integer() and abs(x) < 2**53 else round(x, nd)


def _regime_block(codes) -> dict:
    counts = {n: int((np.asarray(codes) == i).sum()) for i, n in enumerate(regimes.REGIMES)}
    return {"regime_counts": counts, "regime_fractions": regimes.fractions(codes)}


def _finding_logprob(n, rose, fell) -> str:
    return (f"rejected log-prob rose in {rose} of {n} interval{'s' if n != 1 else ''}; "
            f"chosen fell in {fell}")


def _summarize_logprob(s: LogProbSeries, tol: float) -> dict:
    codes = regimes.classify(s.delta_chosen, s.delta_rejected, tol)
    names = regimes.names(codes)
    rose = [[_r(a), _r(b), _r(d)] for a, b, d in zip(s.step_start, s.step_end, s.delta_rejected)
            if d > tol]
    fell = [[_r(a), _r(b), _r(d)] for a, b, d in zip(s.step_start, s.step_end, s.delta_chosen)
            if d < -tol]
    n = len(codes)
    net_c, net_r = float(s.delta_chosen.sum()), float(s.delta_rejected.sum())
    out = {
        "format": s.format, "split": s.split, "source": s.source,
        "regime_basis": ("observed changes of the mean chosen/rejected log-prob between "
                         "consecutive log entries" if s.pairs is None else
                         "mean change of the pairs logged at both ends of each interval"),
        "tol": tol, "n_entries": int(len(s.step)), "n_intervals": n,
        **_regime_block(codes),
        # sum of interval changes: last - first for a series; for pairs, paired changes only
        "net_change": {"chosen": _r(net_c), "rejected": _r(net_r), "margin": _r(net_c - net_r)},
        "rejected_rose_intervals": rose,
        "chosen_fell_intervals": fell,
        "finding": _finding_logprob(n, len(rose), len(fell)),
        "intervals": [{"step_start": _r(a), "step_end": _r(b), "delta_chosen": _r(dc),
                       "delta_rejected": _r(dr), "regime": nm}
                      for a, b, dc, dr, nm in zip(s.step_start, s.step_end, s.delta_chosen,
                                                  s.delta_rejected, names)],
        "series": {"step": [_r(x) for x in s.step], "chosen": [_r(x) for x in s.chosen],
                   "rejected": [_r(x) for x in s.rejected]},
        "notes": list(s.notes),
    }
    if s.pairs is not None:
        out["pairs"] = _summarize_pairs(s.pairs, tol)
    if s.entangle:
        out["entangle"] = _summarize_entangle(s.entangle)
    return out


def _summarize_pairs(p: PairRecords, tol: float) -> dict:
    ch = pair_changes(p)
    codes = regimes.classify(ch["delta_chosen"], ch["delta_rejected"], tol)
    out = {"n_pairs": len(set(p.pair)), "n_pair_changes": int(len(codes)),
           "basis": "every pair's own change between consecutive logged steps, pooled",
           **_regime_block(codes)}
    if p.G_ww is None:
        return out
    per_step = []
    for s in ch["steps"]:
        sel = (p.step == s) & np.isfinite(p.G_ww) & np.isfinite(p.G_wl) & np.isfinite(p.G_ll)
        if not sel.any():
            continue
        rho = condition_ratios(p.G_ww[sel], p.G_wl[sel], p.G_ll[sel])[2]
        rom = condition_ratios(p.G_ww[sel].mean(), p.G_wl[sel].mean(), p.G_ll[sel].mean())[2]
        per_step.append({"step": _r(s), "n_pairs": int(sel.sum()),
                         "case1_fraction": _r((rho <= 1).mean()),
                         "rho_mean_of_ratios": _r(rho.mean()),
                         "rho_ratio_of_means": _r(rom)})
    # First-order prediction (R3): sign(d l_w) = sign(G_ww - G_wl), sign(d l_l) = sign(G_wl - G_ll)
    ok = np.isfinite(ch["G_ww"]) & np.isfinite(ch["G_wl"]) & np.isfinite(ch["G_ll"])
    pred = regimes.classify(ch["G_ww"][ok] - ch["G_wl"][ok], ch["G_wl"][ok] - ch["G_ll"][ok])
    agree = int((pred == codes[ok]).sum())
    out["condition"] = {
        "per_step": per_step,
        "aggregates": "rho = max(G_wl/G_ww, G_wl/G_ll) per pair; 'mean_of_ratios' averages the "
                      "per-pair rho, 'ratio_of_means' applies the formula to mean G entries",
        "prediction_agreement": {
            "basis": "first-order regime from the Gram entries at the interval's start (R3) "
                     "vs the pair's observed regime over the interval",
            "n": int(ok.sum()), "agree": agree,
            "fraction": _r(agree / ok.sum()) if ok.any() else None},
    }
    return out


def _summarize_grad(g: GradSeries) -> dict:
    rho_w, rho_l, rho = condition_ratios(g.norm_w ** 2, g.inner, g.norm_l ** 2)
    pred = regimes.classify(g.norm_w ** 2 - g.inner, g.inner - g.norm_l ** 2)
    pred_names = regimes.names(pred)
    case1 = rho <= 1
    has_logged = np.isfinite(g.logged_condition)
    logged_case1 = g.logged_condition <= 1
    disagree = has_logged & (case1 != logged_case1)
    per_step = [{"step": _r(s), "rho_w": _r(a), "rho_l": _r(b), "rho": _r(c),
                 "logged_condition": _r(d), "cos_mean": _r(e),
                 "case1_corrected": bool(k1),
                 "case1_logged": bool(k2) if h else None,
                 "predicted_regime": nm}
                for s, a, b, c, d, e, k1, k2, h, nm in zip(
                    g.step, rho_w, rho_l, rho, g.logged_condition, g.cos, case1, logged_case1,
                    has_logged, pred_names)]
    n = len(g.step)
    n_c, n_l = int(case1.sum()), int((logged_case1 & has_logged).sum())
    finding = f"corrected rho says Case 1 holds at {n_c} of {n} steps"
    if has_logged.any():
        finding += (f"; logged Grad_Condition says {n_l}"
                    f" ({int(disagree.sum())} disagree{'s' if disagree.sum() == 1 else ''})")

    def stats(x):
        x = x[np.isfinite(x)]
        return {"mean": _r(x.mean()), "min": _r(x.min()), "max": _r(x.max())} if x.size else None

    return {
        "format": g.format, "split": None, "source": g.source,
        "regime_basis": ("first-order prediction per checkpoint from the ratio of per-step means "
                         "(R3: sign(G_ww - G_wl), sign(G_wl - G_ll)); the file has no log-probs"),
        "n_steps": n,
        # No log-probs in this file, so there are no observed interval changes.
        "n_intervals": None, "net_change": None,
        "rejected_rose_intervals": None, "chosen_fell_intervals": None,
        **_regime_block(pred),
        "condition": {
            "corrected": {"definition": CONDITION_AGGREGATE, **stats(rho),
                          "case1_steps": n_c},
            "logged": ({"definition": LOGGED_CONDITION, **stats(g.logged_condition),
                        "case1_steps": n_l} if has_logged.any() else None),
            "disagreement_count": int(disagree.sum()) if has_logged.any() else None,
            "disagreement_steps": [_r(s) for s in g.step[disagree]],
            "only_rho_l_exceeds_1_steps": [_r(s) for s in g.step[(rho_w <= 1) & (rho_l > 1)]],
            "per_step": per_step,
        },
        "finding": finding,
        "notes": list(g.notes),
    }


def summarize(series: LogProbSeries | GradSeries, tol: float = 0.0) -> dict:
    """JSON-ready summary: regimes per interval (R4 via `regimes.classify`) and, for gradient
    logs, the corrected vs logged condition statistic.

    `tol` (log-prob units): a change with |delta| <= tol counts as no change.
    """
    if not (isinstance(tol, (int, float)) and math.isfinite(tol) and tol >= 0):
        raise ValueError(f"tol must be a finite number >= 0, got {tol!r}")
    if isinstance(series, GradSeries):
        return _summarize_grad(series)
    return _summarize_logprob(series, float(tol))
