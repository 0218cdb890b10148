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

Modules: `common` (the series types, errors and the helpers every reader shares), `readers` (one
reader per format, `detect_format`, `load_log`) and `summary` (`summarize`, `condition_ratios`).
"""
from __future__ import annotations

from .common import (ENTANGLE_PREFIX, FORMAT_LABELS, FORMATS, SPLITS, CONDITION_AGGREGATE, LOGGED_CONDITION,  # noqa: F401
                     GradSeries, LogFormatError, LogProbSeries, PairRecords)
from .readers import detect_format, load_log, pair_changes  # noqa: F401
from .summary import condition_ratios, summarize  # noqa: F401
