"""`entangle-sim mitigate`: method x setting comparison of the mitigations.

Prints the comparison table (markdown; --json: the rows). With --out DIR it also writes
DIR/mitigations.md, DIR/mitigations.json and DIR/mitigations.png (ideal-fraction bars).
"""
from __future__ import annotations

import math

from . import CLIError
from ._user_losses import add_flag as add_losses_flag
from ._checks import COUNT, SEED, STEPS, add_allow_large, check_out_dir, check_size, dumps, int_in, real_in


def register(sub) -> None:
    from ..mitigations import COMPARISON_METHODS, LR_TARGET, METHODS, SETTINGS

    p = sub.add_parser("mitigate", help="compare mitigations (normalized PO, token masks, DPOP, NLL) across settings")
    p.add_argument("--settings", nargs="+", choices=SETTINGS, default=list(SETTINGS))
    p.add_argument("--methods", nargs="+", choices=METHODS, default=list(COMPARISON_METHODS))
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="loss hyperparameter by its registry name, as in `simulate --param` (e.g. beta=0.2)")
    p.add_argument("--optimizer", choices=("sgd", "momentum", "adam", "adamw"), default="sgd")
    p.add_argument("--lr", type=real_in(0, lo_open=True), default=None,
                   help="one lr for every setting and method (default: calibrated per setting on the baseline "
                        "so its first step moves log-probs by --lr-target; shared by all methods)")
    p.add_argument("--lr-target", type=real_in(0, lo_open=True), default=LR_TARGET,
                   help="mean first-step |change of log-prob| of the baseline used by the lr calibration")
    p.add_argument("--steps", type=STEPS, default=40)
    p.add_argument("--pairs", type=COUNT, default=8)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--sft-steps", type=int_in(0, 10**9), default=150,
                   help="transformer SFT steps before preference training")
    p.add_argument("--mask-l1", type=real_in(0), default=None, help="l1 weight of the learned / feature masks")
    p.add_argument("--mask-lr", type=real_in(0, lo_open=True), default=None,
                   help="SGD step on the free mask logits (learned_mask)")
    p.add_argument("--feature-lr", type=real_in(0, lo_open=True), default=None,
                   help="SGD step on the feature-mask parameters (v, c) (feature_mask)")
    p.add_argument("--out", default=None, help="directory: writes mitigations.md, mitigations.json, mitigations.png")
    p.add_argument("--figure", default=None, help="also save the comparison figure to this path")
    p.add_argument("--json", action="store_true", help="print the rows as JSON instead of the table")
    add_losses_flag(p)
    add_allow_large(p)
    p.set_defaults(func=run)


#: Parameters of the largest comparison model (the transformer settings, ~1e5) as an upper bound.
_MODEL_PARAMS = 1.2e5


def estimate(args) -> tuple[float, float]:
    """(bytes, per-pair gradient evaluations) upper bounds: per-pair gradients of the largest
    model (2 per pair, 8 bytes a value, held at once for the Gram) plus per-step records of every
    (setting, method) run; work counts SFT and preference steps of every run."""
    runs = len(args.settings) * len(args.methods)
    mem = 2 * args.pairs * _MODEL_PARAMS * 8 + runs * args.steps * args.pairs * 16 * 8
    work = runs * (args.steps + args.sft_steps) * 2 * args.pairs
    return float(mem), float(work)


def _check(args) -> tuple:
    """Validates the arguments; returns the loss hyperparameters as TrainConfig.loss_params."""
    from ..losses import get
    from .losses_cmd import parse_params

    if args.steps <= 0 or args.pairs <= 0:
        raise CLIError("--steps and --pairs must be positive")
    if args.sft_steps < 0:
        raise CLIError("--sft-steps must be >= 0")
    for name in ("lr", "lr_target", "mask_lr", "feature_lr"):
        v = getattr(args, name)
        if v is not None and not (math.isfinite(v) and v > 0):
            raise CLIError(f"--{name.replace('_', '-')} must be a positive finite number, got {v}")
    if args.mask_l1 is not None and not (math.isfinite(args.mask_l1) and args.mask_l1 >= 0):
        raise CLIError(f"--mask-l1 must be >= 0, got {args.mask_l1}")
    try:
        spec = get(args.loss)
    except (KeyError, ValueError) as e:
        raise CLIError(str(e.args[0] if e.args else e)) from e
    params = parse_params(spec, args.param)
    mem, work = estimate(args)
    check_size(args, memory_bytes=mem, work=work, flags="--pairs/--steps/--sft-steps")
    if args.out is not None:
        check_out_dir(args.out)  # before the work, not after it
    if args.figure is not None:
        from pathlib import Path

        fig = Path(args.figure)
        if not str(args.figure).strip() or fig.is_dir():
            raise CLIError(f"--figure {args.figure!r} must be a file path")
        check_out_dir(fig.parent if str(fig.parent) else ".", "--figure folder")
    return tuple(sorted(params.items()))


def run(args) -> int:
    from .. import mitigations as M

    loss_params = _check(args)
    kw = {k: getattr(args, k) for k in ("mask_l1", "mask_lr", "feature_lr") if getattr(args, k) is not None}
    res = M.run_comparison(args.settings, args.methods, steps=args.steps, pairs=args.pairs, seed=args.seed,
                           optimizer=args.optimizer, lr=args.lr, loss=args.loss, loss_params=loss_params,
                           sft_steps=args.sft_steps, lr_target=args.lr_target, **kw)
    rows = res["rows"]
    table = M.format_table(rows)
    # strict JSON: NaN / inf (e.g. sgd_vs_precond_flip under SGD, a diverged run) become null
    clean = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in r.items()} for r in rows]
    figs = [args.figure] if args.figure else []
    if args.out:
        from pathlib import Path

        from ..results import save_json, save_text
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        save_json(out / "mitigations.json", clean)
        save_text(out / "mitigations.md", table + "\n")
        figs.append(str(out / "mitigations.png"))
    if figs:
        import matplotlib.pyplot as plt

        from ..plotting.mitigations import plot_comparison
        fig = plot_comparison(rows)
        from ..results import atomic_write

        for f in figs:  # atomically, like every other output file
            atomic_write(f, lambda fh, f=f: fig.savefig(fh, format=f.rsplit(".", 1)[-1], bbox_inches="tight"))
        plt.close(fig)
    print(dumps(clean) if args.json else table)
    return 0
