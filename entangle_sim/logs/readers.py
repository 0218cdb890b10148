"""One reader per log format, `detect_format` and `load_log` (see the package docstring)."""
from __future__ import annotations

import csv
import io
import json
import os

import numpy as np

from .common import (FORMATS, GRAD_OPTIONAL, GRAD_REQUIRED, GradSeries, LogFormatError, LogProbSeries, Notes,
                     PAIR_CHOSEN_KEYS, PAIR_ID_KEYS, PAIR_REJECTED_KEYS, PairRecords, SPLITS, dedupe_sorted,
                     detect_format, finite_or_none, fmt_num, json_error, jsonl_records, make_series,
                     read_text, trl_entangle)


def trl_entry_kind(entry: dict) -> str:
    return "eval" if any(k.startswith("eval_") for k in entry) else "train"


def trl_logps(entry: dict, kind: str):
    """(chosen, rejected) raw values of an entry or None if it logs no log-probs.

    Eval entries use ``eval_logps/*``; unprefixed ``logps/*`` are accepted in either kind
    (custom callbacks and some TRL versions log them so)."""
    keys = (("eval_logps/chosen", "eval_logps/rejected"),) if kind == "eval" else ()
    keys += (("logps/chosen", "logps/rejected"),)
    for kc, kr in keys:
        if kc in entry or kr in entry:
            return entry.get(kc), entry.get(kr), kc, kr
    return None


def load_trl(name: str, text: str, split: str) -> LogProbSeries:
    try:
        doc = json.loads(text)
    except json.JSONDecodeError as e:
        raise json_error(name, e) from None
    history = doc.get("log_history") if isinstance(doc, dict) else doc
    if not isinstance(history, list):
        raise LogFormatError(f"{name}: no 'log_history' list (is this a trainer_state.json?)")
    buckets = {"train": [], "eval": []}
    for i, entry in enumerate(history):
        if not isinstance(entry, dict):
            continue
        kind = trl_entry_kind(entry)
        got = trl_logps(entry, kind)
        if got is not None:
            buckets[kind].append((i, entry, got))
    if split == "auto":
        n_eval_usable = sum(finite_or_none(c) is not None and finite_or_none(r) is not None
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
    notes = Notes()
    rows = []
    for i, entry, (c, r, kc, kr) in entries:
        step = finite_or_none(entry.get("step"))
        where = entry.get("step", f"entry {i}")
        if step is None:
            notes.skip("no numeric 'step'", f"entry {i}")
        elif kc not in entry or kr not in entry:
            notes.skip(f"missing {kr if kc in entry else kc}", where)
        elif finite_or_none(c) is None or finite_or_none(r) is None:
            notes.skip("NaN or non-numeric log-prob", where)
        else:
            rows.append((step, float(c), float(r)))
    rows = dedupe_sorted(rows, notes) if rows else rows
    if len(rows) < 2:
        raise LogFormatError(f"{name}: only {len(rows)} usable {split} entr"
                             f"{'y' if len(rows) == 1 else 'ies'} with finite log-probs; "
                             "need at least 2 to form an interval")
    if split == "train":
        notes.add("train entries average different batches, so interval changes mix learning "
                  "with batch-to-batch variation; eval entries use a fixed set")
    s, c, r = zip(*rows)
    return make_series(name, "trl", split, s, c, r, notes.render())._replace(entangle=trl_entangle(history))


def grad_rows(name: str, records, notes: Notes) -> tuple:
    """Validated columns (step, inner, cos, norm_w, norm_l, logged_condition), sorted by step."""
    rows = []
    for where, rec in records:
        vals = {k: finite_or_none(rec.get(k)) for k in GRAD_REQUIRED + GRAD_OPTIONAL}
        missing = [k for k in GRAD_REQUIRED if vals[k] is None]
        if missing:
            notes.skip(f"missing or NaN {missing[0]}", where)
        elif vals["Grad_W_Norm"] <= 0 or vals["Grad_L_Norm"] <= 0:
            notes.skip("non-positive gradient norm", where)
        else:
            opt = [np.nan if vals[k] is None else vals[k] for k in GRAD_OPTIONAL]
            rows.append((vals["Step"], vals["InnerProduct"], opt[0], vals["Grad_W_Norm"],
                         vals["Grad_L_Norm"], opt[1]))
    rows = dedupe_sorted(rows, notes) if rows else rows
    if not rows:
        raise LogFormatError(f"{name}: no usable rows (each needs finite "
                             f"{', '.join(GRAD_REQUIRED)})")
    step, inner, cos, nw, nl, cond = (np.asarray(a, dtype=float) for a in zip(*rows))
    if np.isnan(cond).all():
        notes.add("no Grad_Condition column: no logged statistic to compare against")
    return step, inner, cos, nw, nl, cond


def load_official_csv(name: str, text: str) -> GradSeries:
    reader = csv.DictReader(io.StringIO(text.lstrip()))
    header = [h.strip() for h in (reader.fieldnames or [])]
    missing = [k for k in GRAD_REQUIRED if k not in header]
    if missing:
        raise LogFormatError(f"{name}: CSV lacks column(s) {', '.join(missing)}")
    reader.fieldnames = header
    notes = Notes()
    try:
        # pandas writes NaN as an empty cell; finite_or_none maps '' to None and the row is skipped
        records = [(f"row {i + 2}", rec) for i, rec in enumerate(reader)]
    except csv.Error as e:
        raise LogFormatError(f"{name}: malformed CSV: {e}") from None
    cols = grad_rows(name, records, notes)
    return GradSeries(name, "official-csv", *cols, notes.render())


def load_official_jsonl(name: str, text: str) -> GradSeries:
    notes = Notes()
    records = [(f"line {ln}", rec) for ln, rec in jsonl_records(name, text, notes)]
    cols = grad_rows(name, records, notes)
    return GradSeries(name, "official-jsonl", *cols, notes.render())


def first_key(rec: dict, keys):
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


def load_pairs(name: str, text: str) -> LogProbSeries:
    notes = Notes()
    rows = []
    for lineno, rec in jsonl_records(name, text, notes):
        where = f"line {lineno}"
        kid, kc, kr = (first_key(rec, ks) for ks in (PAIR_ID_KEYS, PAIR_CHOSEN_KEYS,
                                                      PAIR_REJECTED_KEYS))
        step = finite_or_none(rec.get("step"))
        if step is None:
            notes.skip("missing or non-numeric 'step'", where)
        elif kid is None:
            notes.skip("missing 'pair'/'id'", where)
        elif kc is None or kr is None:
            notes.skip("missing chosen_logp or rejected_logp", where)
        elif finite_or_none(rec[kc]) is None or finite_or_none(rec[kr]) is None:
            notes.skip("NaN or non-numeric log-prob", where)
        else:
            gram = [finite_or_none(rec.get(g)) for g in ("G_ww", "G_wl", "G_ll")]
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
            notes.add(f"no pair logged at both steps {fmt_num(steps[k])} and "
                      f"{fmt_num(steps[k + 1])}: interval skipped")
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
    text = read_text(name)
    fmt = detect_format(name, text) if fmt == "auto" else fmt
    if fmt == "trl":
        return load_trl(name, text, split)
    if fmt == "official-csv":
        series = load_official_csv(name, text)
    elif fmt == "official-jsonl":
        series = load_official_jsonl(name, text)
    else:
        series = load_pairs(name, text)
    if split != "auto":
        series = series._replace(notes=series.notes + (f"--split {split} applies only to TRL "
                                                       "logs; ignored",))
    return series
