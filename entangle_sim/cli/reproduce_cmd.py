"""`entangle-sim reproduce [--quick] [--out DIR]`: every CPU figure (PNG + PDF), report.md,
report.json, the condition table and conditions.md (the per-loss conditions of
`entangle-sim conditions --all`). Figure data and report checks are cached by configuration hash
under DIR/cache (inside the output folder; or --cache DIR2); a second run reuses them and an
interrupted run resumes."""
from __future__ import annotations

import sys
import time

from ._checks import SEED, check_out_dir

DEFAULT_OUT = "paper_figs/out"


def register(sub) -> None:
    p = sub.add_parser("reproduce", help="regenerate every figure and the verification report")
    p.add_argument("--quick", action="store_true", help="quick preset (< 5 min on 2 cores)")
    p.add_argument("--preset", choices=("tiny", "quick", "full"), default=None,
                   help="explicit preset (default: full, or quick with --quick)")
    p.add_argument("--out", default=DEFAULT_OUT, help=f"output folder (default {DEFAULT_OUT})")
    p.add_argument("--cache", default=None, help="cache folder (default: OUT/cache, inside the output folder)")
    p.add_argument("--only", action="append", default=None, metavar="FIGURE", help="only these figures")
    p.add_argument("--no-report", action="store_true", help="skip report.md / report.json")
    p.add_argument("--seed", type=SEED, default=0)
    p.set_defaults(func=run)


def conditions_markdown() -> str:
    """Every loss's full conditions (the text of `entangle-sim conditions --all`) as Markdown."""
    from .. import losses
    from ..symbolic import derive
    from .losses_cmd import condition_text

    blocks = [condition_text(derive(losses.get(n)).as_dict()) for n in losses.names()]
    return "# Conditions of every registered loss\n\n```\n" + "\n\n".join(blocks) + "\n```\n"


def reproduce(out, *, preset: str = "full", cache=None, only=None, report: bool = True, seed: int = 0,
              progress: bool | None = None, log=print) -> dict:
    """Body of the command (also used by tests): returns {'figures': [...], 'skipped': [...], 'seconds': ...}."""
    import matplotlib.pyplot as plt
    from tqdm.auto import tqdm

    from .. import figures, results
    from .. import report as report_mod
    from .. import reproduce as rp

    from . import CLIError

    t0 = time.perf_counter()
    names = list(figures.FIGURES) if not only else list(only)
    for n in names:
        if n not in figures.FIGURES:
            raise CLIError(f"unknown figure {n!r}; valid: {', '.join(figures.FIGURES)}")
    # Both folders validated (and created) before any work.
    out = check_out_dir(out, "--out")
    cache = check_out_dir(cache, "--cache") if cache is not None else check_out_dir(out / "cache", "--cache")
    show = sys.stderr.isatty() if progress is None else progress
    done, skipped, timings = [], [], {}
    steps = len(names) + (1 if report else 0)
    bar = tqdm(total=steps, desc="reproduce", unit="item", disable=not show)
    for n in names:
        bar.set_postfix_str(n)
        t1 = time.perf_counter()
        fig, _ = figures.render(n, preset, cache_dir=cache, seed=seed)
        figures.save_figure(fig, out, n)
        plt.close(fig)
        timings[n] = round(time.perf_counter() - t1, 1)
        done.append(n)
        bar.update(1)
    rows = rp.condition_rows()
    results.save_text(out / "condition_table.md", report_mod.condition_table_markdown(rows))
    results.save_text(out / "conditions.md", conditions_markdown())
    summary = None
    if report:
        bar.set_postfix_str("report")
        rep = report_mod.run_report(preset, cache_dir=cache, seed=seed)
        rep["skipped_figures"] = skipped
        rep["figures"] = done
        rep["figure_timings_s"] = timings
        report_mod.write_report(rep, out)
        summary = rep["summary"]
        bar.update(1)
    bar.close()
    secs = time.perf_counter() - t0
    log(f"reproduce ({preset}): {len(done)} figures (PNG + PDF) in {out}/ in {secs:.0f} s")
    for s in skipped:
        log(f"  {s}")
    log(f"  condition table: {out / 'condition_table.md'}; per-loss conditions: {out / 'conditions.md'}")
    n4 = [r["loss"] for r in rows if "can be < 0" in (r["d_w_sign"], r["d_l_sign"])]
    und = [r["loss"] for r in rows if r["fourth_regime_possible"] and r["loss"] not in n4]
    log(f"  conditions: {len(rows)} losses; 4th regime (chosen down, rejected up) reachable for: {', '.join(n4)}"
        + (f"; not excluded (incentive sign undecided): {', '.join(und)}" if und else ""))
    if summary:
        log(f"  report: {summary['pass']} pass, {summary['fail']} fail, {summary['not_available']} not available "
            f"-> {out / 'report.md'}")
    return {"figures": done, "skipped": skipped, "seconds": secs, "summary": summary, "timings_s": timings}


def run(args) -> int:
    from ..presets import enable_x64

    enable_x64()
    preset = args.preset or ("quick" if args.quick else "full")
    reproduce(args.out, preset=preset, cache=args.cache, only=args.only, report=not args.no_report, seed=args.seed)
    return 0
