"""`entangle-sim analyze-log PATH`: co-movement regimes and condition checks from real run logs."""
from __future__ import annotations

import json
import math
import os

from . import CLIError
from .. import logs, regimes


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "analyze-log", help="classify logging intervals of a real run into co-movement regimes",
        description="Read a TRL trainer_state.json, the official code's gradient CSV/JSONL, or a "
                    "per-pair JSONL; classify each logging interval by how the chosen and "
                    "rejected log-probs moved; for gradient logs, recompute the Case-1 condition "
                    "correctly and compare it with the logged Grad_Condition.")
    p.add_argument("path", help="log file")
    p.add_argument("--format", dest="fmt", default="auto", choices=("auto",) + logs.FORMATS,
                   help="log format (default: detect from content)")
    p.add_argument("--split", default="auto", choices=logs.SPLITS,
                   help="TRL entries to use (auto: eval if >= 2 eval entries have log-probs)")
    p.add_argument("--tol", type=float, default=0.0,
                   help="a log-prob change with |delta| <= TOL counts as no change (default 0; "
                        "log-prob formats only)")
    p.add_argument("--json", action="store_true", help="print the full JSON summary")
    p.add_argument("--out", metavar="DIR",
                   help="write summary.json and the figure (log_regimes.png/.pdf) to DIR")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._checks import check_out_dir, dumps

    if not (math.isfinite(args.tol) and args.tol >= 0):
        raise CLIError(f"--tol must be a finite number >= 0, got {args.tol}")
    if args.out is not None:
        check_out_dir(args.out)  # before reading the log
    from ..group import trl_log   # GRPO runs: entangle/group_* keys (GroupEntanglementCallback)

    group = trl_log.summary_of(args.path) if args.fmt in ("auto", "trl") else None
    try:
        series = logs.load_log(args.path, fmt=args.fmt, split=args.split)
    except RecursionError:
        raise CLIError(f"{args.path}: JSON nested too deeply to be a log") from None
    except logs.LogFormatError:
        if group is None:
            raise
        summary = {"source": str(args.path), "format": "trl", "group_entangle": group}   # a GRPO log
        if args.out:
            from ..results import atomic_write
            atomic_write(os.path.join(args.out, "summary.json"), lambda f: f.write(dumps(summary, indent=2).encode()))
        print(dumps(summary, indent=2) if args.json else trl_log.text(group))
        return 0
    summary = logs.summarize(series, tol=args.tol)
    if group is not None:
        summary["group_entangle"] = group
    if args.out:
        _write_outputs(args.out, summary)
    print(dumps(summary, indent=2) if args.json else _human(summary)
          + ("\n" + trl_log.text(group) if group is not None else ""))
    return 0


def _write_outputs(out: str, summary: dict) -> None:
    if os.path.exists(out) and not os.path.isdir(out):
        raise CLIError(f"--out {out}: exists and is not a directory")
    try:
        os.makedirs(out, exist_ok=True)
        from ..plotting.logs import plot_log_regimes  # matplotlib only when a figure is wanted
        import matplotlib.pyplot as plt

        from ..results import atomic_write

        fig = plot_log_regimes(summary)
        try:
            for ext in ("png", "pdf"):
                atomic_write(os.path.join(out, f"log_regimes.{ext}"),
                              lambda f, ext=ext: fig.savefig(f, format=ext))
        finally:
            plt.close(fig)
        from ..results import strict_json_value

        text = (json.dumps(strict_json_value(summary), indent=2, allow_nan=False) + "\n").encode()
        atomic_write(os.path.join(out, "summary.json"), lambda f: f.write(text))
    except OSError as e:
        raise CLIError(f"--out {out}: cannot write: {e.strerror or e}") from None


def _pct(x: float) -> str:
    return f"{100 * x:.0f}%"


def _human(s: dict) -> str:
    label = logs.FORMAT_LABELS[s["format"]]
    split = f", {s['split']} split" if s.get("split") else ""
    lines = []
    if s.get("n_intervals") is not None:
        steps = s["series"]["step"]
        lines.append(f"{s['source']}: {label}{split}, {s['n_entries']} entries "
                     f"(steps {steps[0]}-{steps[-1]}), {s['n_intervals']} intervals")
        lines.append(f"finding: {s['finding']}")
        lines.append("regimes: " + _regimes_line(s["regime_fractions"]))
        nc = s["net_change"]
        lines.append(f"net change: chosen {nc['chosen']:+.4g}, rejected {nc['rejected']:+.4g}, "
                     f"margin {nc['margin']:+.4g}")
        for key, what in (("rejected_rose_intervals", "rejected rose"),
                          ("chosen_fell_intervals", "chosen fell")):
            if s[key]:
                shown = ", ".join(f"{a}->{b} ({d:+.3g})" for a, b, d in s[key][:8])
                more = f", ... ({len(s[key])} in all)" if len(s[key]) > 8 else ""
                lines.append(f"{what}: {shown}{more}")
        if "pairs" in s:
            p = s["pairs"]
            lines.append(f"per pair ({p['n_pairs']} pairs, {p['n_pair_changes']} changes): "
                         + _regimes_line(p["regime_fractions"]))
            agr = p.get("condition", {}).get("prediction_agreement")
            if agr and agr["n"]:
                lines.append(f"first-order prediction from G matches the observed regime in "
                             f"{agr['agree']} of {agr['n']} pair changes")
        if "entangle" in s:
            e = s["entangle"]
            lines.append(f"entangle/* (EntanglementCallback): {e['n_measurements']} measurements; predicted vs "
                         f"realised over {e['n_compared']} intervals: chosen sign {e['sign_agreement_chosen']}/"
                         f"{e['n_compared']}, rejected sign {e['sign_agreement_rejected']}/{e['n_compared']}, "
                         f"regime {e['regime_agreement']}/{e['n_compared']}")
    else:
        c = s["condition"]
        lines.append(f"{s['source']}: {label}, {s['n_steps']} checkpoints "
                     f"(steps {c['per_step'][0]['step']}-{c['per_step'][-1]['step']}); "
                     "no log-probs in this file")
        lines.append(f"finding: {s['finding']}")
        lines.append(f"corrected rho = max(rho_w, rho_l), ratio of per-step means: "
                     f"mean {c['corrected']['mean']:.4g}, range {c['corrected']['min']:.4g}"
                     f"-{c['corrected']['max']:.4g}")
        if c["logged"] is not None:
            lines.append(f"logged Grad_Condition (buggy mean of G_wl/G_ww): mean "
                         f"{c['logged']['mean']:.4g}; Case-1 verdicts differ at steps "
                         f"{c['disagreement_steps'] or 'none'}")
        lines.append("predicted regimes (first order): " + _regimes_line(s["regime_fractions"]))
    lines += [f"note: {n}" for n in s.get("notes", [])]
    return "\n".join(lines)


def _regimes_line(fr: dict) -> str:
    parts = [f"{n} {_pct(v)} [{regimes.CASE_OF_REGIME[n]}]"
             for n, v in sorted(fr.items(), key=lambda kv: -kv[1]) if v > 0]
    return ", ".join(parts) or "none"
