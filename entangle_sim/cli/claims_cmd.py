"""`entangle-sim claims`: the paper's transformer claims as statistics over seeds and settings.

Writes claims.json (every run, the claim x setting table, the attribution of every failure),
claims.md (the table) and transformer_claims.{png,pdf}; prints the table (or JSON with --json).
`--preset gpu` is the larger-model sweep for one GPU; `--scale tiny` runs any preset at the tiny
preset's model size and step counts (a CPU smoke run of the same command)."""
from __future__ import annotations

import dataclasses
import sys

from ._checks import SEED, check_out_dir, dumps


def register(sub) -> None:
    p = sub.add_parser("claims", help="the paper's transformer claims as statistics over seeds and settings")
    p.add_argument("--preset", choices=("tiny", "quick", "full", "gpu"), default="quick",
                   help="sweep size (default quick; gpu: 6 layers x 384 wide, every setting, 8 seeds)")
    p.add_argument("--scale", choices=("preset", "tiny"), default="preset",
                   help="tiny: the tiny preset's model and step counts with this preset's settings and seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the preset's)")
    p.add_argument("--settings", default=None, help="comma-separated setting names (default: the preset's)")
    p.add_argument("--seed", type=SEED, default=0, help="base seed")
    p.add_argument("--out", default=None, help="write claims.json, claims.md and the figure here")
    p.add_argument("--json", action="store_true", help="print claims.json's table and attribution as JSON")
    p.add_argument("--x64", action="store_true", help="float64 (default float32: about twice as fast on CPU)")
    p.set_defaults(func=run)


def sweep_config(args):
    from .. import claim_stats, presets
    from . import CLIError

    c = dict(presets.CLAIMS_GPU if args.preset == "gpu" else presets.preset(args.preset)["claims"])
    base = dict(c.get("base", {}))
    if args.scale == "tiny":
        base = dict(presets.preset("tiny")["claims"]["base"])
    if args.settings is not None:
        names = tuple(s.strip() for s in args.settings.split(",") if s.strip())
        bad = [s for s in names if s not in claim_stats.SETTINGS]
        if bad or not names:
            raise CLIError(f"unknown setting {bad[0] if bad else '(none)'!r}; valid: {', '.join(claim_stats.SETTINGS)}")
        c["settings"] = names
    if args.seeds is not None:
        if args.seeds < 1 or args.seeds > 1000:
            raise CLIError(f"--seeds must be in [1, 1000], got {args.seeds}")
        c["seeds"] = args.seeds
    b = dataclasses.replace(claim_stats.SweepConfig().base, seed=args.seed, **base)
    return claim_stats.SweepConfig(base=b, settings=tuple(c["settings"]), seeds=int(c["seeds"]), x64=args.x64)


def table_markdown(sw) -> str:
    from ..results import markdown_table

    settings = list(sw["settings"])
    rows = []
    for cid, info in sw["claims"].items():
        cells = []
        for s in settings:
            r = next(r for r in sw["table"] if r["claim"] == cid and r["setting"] == s)
            lo, hi = r["interval"]
            why = "; ".join(f"{t} {n}" for t, n in r["attribution"].items())
            cells.append(f"{r['k']}/{r['n']} [{lo:.2f}, {hi:.2f}]" + (f" ({why})" if why else ""))
        rows.append([f"{cid}: {info['paper']}", *cells])
    agree = [[lv, *[f"{sw['settings'][s]['agreement'][lv]:.3f}" for s in settings]] for lv in ("one", "batch", "lin")]
    return (markdown_table(["claim (paper)", *settings], rows) + "\n\nSign agreement with the realised per-pair "
            "change (mean over runs, datasets, steps): one = one-pair SGD theory, batch = 2B x 2B Gram, lin = "
            "first order of the real update\n\n" + markdown_table(["account", *settings], agree))


def run(args) -> int:
    import jax

    from .. import claim_stats

    sc = sweep_config(args)
    if args.out is not None:
        out = check_out_dir(args.out)
    show = sys.stderr.isatty()
    from tqdm.auto import tqdm

    bar = tqdm(total=3 * len(sc.settings), desc="claims", unit="stage", disable=not show)

    def progress(msg):
        bar.set_postfix_str(msg)
        bar.update(1)

    try:
        sw = claim_stats.run_sweep(sc, progress=progress)
    finally:
        bar.close()
    sw["backend"] = jax.default_backend()
    md = table_markdown(sw)
    if args.out is not None:
        import matplotlib.pyplot as plt

        from ..plotting.claims import plot_claim_table
        from ..results import save_figure, save_json, save_text

        save_json(out / "claims.json", sw)
        save_text(out / "claims.md", "# The paper's transformer claims as statistics\n\n" + md + "\n")
        fig = plot_claim_table(sw)
        save_figure(fig, out, "transformer_claims")
        plt.close(fig)
    if args.json:
        print(dumps({"seeds": sw["seeds"], "settings": {k: v["label"] for k, v in sw["settings"].items()},
                     "agreement": {k: v["agreement"] for k, v in sw["settings"].items()},
                     "claims": sw["claims"], "table": sw["table"], "backend": sw["backend"]}))
    else:
        print(md)
    return 0
