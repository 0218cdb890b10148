"""`entangle-sim mitigate`: method x setting comparison of the mitigations (issue 5 item 6)."""
from __future__ import annotations

import json

from . import CLIError


def register(sub) -> None:
    from ..mitigations import COMPARISON_METHODS, METHODS, SETTINGS

    p = sub.add_parser("mitigate", help="compare mitigations (normalized PO, token masks, DPOP, NLL) across settings")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(COMPARISON_METHODS))
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam", "adamw"), default="sgd")
    p.add_argument("--lr", type=float, default=None, help="one lr for all settings (default: per-setting)")
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--pairs", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sft-steps", type=int, default=150, help="transformer SFT steps before preference training")
    p.add_argument("--out", default=None, help="write rows as JSON and the table as markdown here (a directory)")
    p.add_argument("--figure", default=None, help="save the comparison figure to this path")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import mitigations as M

    if args.steps <= 0 or args.pairs <= 0:
        raise CLIError("--steps and --pairs must be positive")
    res = M.run_comparison(args.settings, args.methods, steps=args.steps, pairs=args.pairs, seed=args.seed,
                           optimizer=args.optimizer, lr=args.lr, loss=args.loss, sft_steps=args.sft_steps)
    rows = res["rows"]
    table = M.format_table(rows)
    if args.out:
        from pathlib import Path

        from ..results import save_json
        save_json(Path(args.out) / "mitigations.json", rows)
        (Path(args.out) / "mitigations.md").write_text(table + "\n")
    if args.figure:
        from ..plotting.mitigations import plot_comparison
        plot_comparison(rows).savefig(args.figure)
    print(json.dumps(rows, default=float) if args.json else table)
    return 0
