"""`entangle-sim claims`: the paper's transformer claims as statistics over seeds and settings.

Writes claims.json (every run, the claim x setting table, the attribution of every failure),
claims.md (the table) and transformer_claims.{png,pdf}; prints the table (or JSON with --json).
`--preset gpu` is the larger-model sweep for one GPU; `--scale tiny` runs any preset at the tiny
preset's model size and step counts (a CPU smoke run of the same command).

`--preset scale` (CPU) and `--preset scale-gpu` (one GPU, GPT-2-small-like) sweep the model size instead
of the setting: they write claims_scale.json, claims_scale.md and transformer_claims_scale.{png,pdf};
`--with PATH` adds the sizes of earlier claims_scale.json files (e.g. the GPU run) to the table and figure."""
from __future__ import annotations

import dataclasses
import sys

from ._checks import SEED, check_out_dir, dumps


def register(sub) -> None:
    p = sub.add_parser("claims", help="the paper's transformer claims as statistics over seeds and settings")
    p.add_argument("--preset", choices=("tiny", "quick", "full", "gpu", "scale", "scale-gpu"), default="quick",
                   help="sweep size (default quick; gpu: 6 layers x 384 wide, every setting, 8 seeds; scale: model "
                        "sizes 2x32/V32 -> 4x256/V256 on CPU; scale-gpu: 12 layers x 768, vocabulary 1024)")
    p.add_argument("--scale", choices=("preset", "tiny"), default="preset",
                   help="tiny: the tiny preset's model and step counts with this preset's settings and seeds")
    p.add_argument("--seeds", type=int, default=None, help="seeds per setting (default: the preset's)")
    p.add_argument("--settings", default=None, help="comma-separated setting names (default: the preset's)")
    p.add_argument("--seed", type=SEED, default=0, help="base seed")
    p.add_argument("--out", default=None, help="write claims.json, claims.md and the figure here")
    p.add_argument("--json", action="store_true", help="print claims.json's table and attribution as JSON")
    p.add_argument("--x64", action="store_true", help="float64 (default float32: about twice as fast on CPU)")
    p.add_argument("--with", dest="with_", action="append", default=[], metavar="PATH",
                   help="scale presets: add the sizes of this claims_scale.json (repeatable)")
    p.set_defaults(func=run)


def _settings_and_seeds(args) -> dict:
    """The --settings and --seeds overrides of a preset, checked (shared by both sweeps)."""
    from .. import claim_stats
    from . import CLIError

    c = {}
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
    return c


def sweep_config(args):
    from .. import claim_stats, presets

    c = dict(presets.CLAIMS_GPU if args.preset == "gpu" else presets.preset(args.preset)["claims"])
    base = dict(c.get("base", {}))
    if args.scale == "tiny":
        base = dict(presets.preset("tiny")["claims"]["base"])
    c.update(_settings_and_seeds(args))
    b = dataclasses.replace(claim_stats.SweepConfig().base, seed=args.seed, **base)
    return claim_stats.SweepConfig(base=b, settings=tuple(c["settings"]), seeds=int(c["seeds"]), x64=args.x64)


def scale_config(args):
    from .. import claim_stats, presets

    c = dict(presets.CLAIMS_SCALE_GPU if args.preset == "scale-gpu" else presets.CLAIMS_SCALE)
    base = dict(c["base"])
    sizes = c["sizes"]
    if args.scale == "tiny":
        base, sizes = dict(presets.SCALE_TINY_BASE), presets.SCALE_TINY_SIZES
    c.update(_settings_and_seeds(args))
    b = dataclasses.replace(claim_stats.SweepConfig().base, seed=args.seed, **base)
    return claim_stats.ScaleConfig(base=b, sizes=tuple((n, tuple(sorted(o.items()))) for n, o in sizes),
                                   settings=tuple(c["settings"]), seeds=int(c["seeds"]), x64=args.x64,
                                   budget_gb=c["budget_gb"])


def _num(x, spec: str) -> str:
    """A number for a table; None (a NaN read back from strict JSON, e.g. the Adam runs' SGD rate) is '-'."""
    return "-" if x is None or x != x else format(x, spec)


def scale_markdown(sc) -> str:
    """The claim x size table per setting (k/n, Wilson interval, attribution), the turns of the
    single-token claims and the first-order check per size and setting."""
    from ..results import markdown_table

    sizes = list(sc["sizes"])
    out = []
    for setting in sc["settings"]:
        rows = []
        for cid in sc["claims"]:
            cells = []
            for n in sizes:
                r = next((r for r in sc["table"] if r["claim"] == cid and r["size"] == n and r["setting"] == setting),
                         None)
                if r is None:
                    cells.append("-")
                    continue
                lo, hi = r["interval"]
                why = "; ".join(f"{t} {k}" for t, k in r["attribution"].items())
                cells.append(f"{r['k']}/{r['n']} [{lo:.2f}, {hi:.2f}]" + (f" ({why})" if why else ""))
            rows.append([cid, *cells])
        head = [f"claim ({setting})", *[f"{n} ({sc['sizes'][n]['n_params'] / 1e3:.0f}k)" for n in sizes]]
        out.append(markdown_table(head, rows))
    fo_rows = []
    for n in sizes:
        sz = sc["sizes"][n]
        for s, fo in sz["first_order"].items():
            fo_rows.append([n, s, _num(fo["po_lr"], ".3g"), _num(fo["gram_diag_ref"], ".3g"),
                            _num(fo["remainder_median"], ".3f"), _num(fo["remainder_max"], ".3f"),
                            "yes" if fo["first_order"] else "no",
                            f"{_num(fo['lin_1t_chosen'], '.3g')} / {_num(fo['real_1t_chosen'], '.3g')}",
                            _num(sz["pretrain"]["loss"], ".3f"), _num(sz["pretrain"]["suffix_logp"], ".3f")])
    out.append("First-order check (remainder = sum |real - lin| / sum |lin| over PO steps, pairs, sides; first "
               "order: every run below 0.1) and pretraining per size\n\n" + markdown_table(
                   ["size", "setting", "PO rate", "Gbar (ref)", "remainder median", "remainder max", "first order",
                    "1t chosen: lin / real", "pretrain loss", "suffix log-prob"], fo_rows))
    t_rows = []
    for cid, t in sc["turns"].items():
        sup = "; ".join(f"{n}: " + ", ".join(f"{lv} {v:.1f}" for lv, v in s.items()) for n, s in zip(t["sizes"], t["support"]))
        t_rows.append([cid, " -> ".join(str(d) for d in t["dominant_term"]), str(t["holds_from"]),
                       ", ".join(t["gains"]) or "-", ", ".join(t["losses"]) or "-", sup])
    out.append("Where it turns (paper-like setting): dominant failure term per size, first size from which the "
               "claim holds (Wilson lower bound > 1/2), accounts whose support (fraction of seeds where that level "
               "satisfies the claim) grows / shrinks by >= 0.4 from the smallest to the largest size\n\n" +
               markdown_table(["claim", "dominant failure term by size", "holds from", "gains", "loses", "support"],
                              t_rows))
    return "\n\n".join(out)


def run_scale(args) -> int:
    import jax

    from .. import claim_stats
    from . import CLIError

    sc = scale_config(args)
    extra = []
    for path in args.with_:
        import json
        import pathlib

        try:
            extra.append(json.loads(pathlib.Path(path).read_text()))
        except (OSError, ValueError) as e:
            raise CLIError(f"--with {path}: cannot read a claims_scale.json ({e.__class__.__name__})") from None
        if not isinstance(extra[-1], dict) or "sizes" not in extra[-1]:
            raise CLIError(f"--with {path}: not a claims_scale.json (no 'sizes')")
    if args.out is not None:
        out = check_out_dir(args.out)
    from tqdm.auto import tqdm

    bar = tqdm(total=3 * len(sc.settings) * len(sc.sizes), desc="claims scale", unit="stage",
               disable=not sys.stderr.isatty())

    def progress(msg):
        bar.set_postfix_str(msg)
        bar.update(1)

    try:
        res = claim_stats.run_scale(sc, progress=progress)
    finally:
        bar.close()
    res["backend"] = jax.default_backend()
    both = claim_stats.merge_scale(res, *extra) if extra else res
    md = scale_markdown(both)
    if args.out is not None:
        import matplotlib.pyplot as plt

        from ..plotting.claims import plot_claim_scale
        from ..results import save_figure, save_json, save_text

        save_json(out / "claims_scale.json", res)      # this run's sizes only: another run can add it (--with)
        save_text(out / "claims_scale.md", "# The paper's transformer claims as the model grows\n\n" + md + "\n")
        fig = plot_claim_scale(both)
        save_figure(fig, out, "transformer_claims_scale")
        plt.close(fig)
    if args.json:
        print(dumps({"seeds": both["seeds"], "settings": both["settings"], "claims": both["claims"],
                     "sizes": {n: {k: v for k, v in sz.items() if k != "settings"} for n, sz in both["sizes"].items()},
                     "table": both["table"], "turns": both["turns"], "backend": res["backend"]}))
    else:
        print(md)
    return 0


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

    if args.preset in ("scale", "scale-gpu"):
        return run_scale(args)
    if args.with_:
        from . import CLIError
        raise CLIError("--with needs --preset scale or scale-gpu")
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
