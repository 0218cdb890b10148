"""`entangle-sim diagnose`: SFT -> preference optimisation on the sentiment task with gradient geometry."""
from __future__ import annotations

import json
import sys

from . import CLIError
from ._user_losses import add_flag as add_losses_flag


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="train a tiny transformer (SFT then PO) and log gradient entanglement")
    p.add_argument("--task", choices=["sentiment"], default="sentiment")
    p.add_argument("--suffix", choices=["1t", "short", "long"], required=True,
                   help="shared suffix after the contrastive token: none, short, long")
    p.add_argument("--loss", default="sigmoid", help="registered loss (see `entangle-sim losses`)")
    p.add_argument("--steps", type=int, default=None, help="preference-optimisation steps (default preset)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-sft-suffix", action="store_true",
                   help="SFT on prompt + label word only (the paper's literal SFT data)")
    p.add_argument("--out", default=None, help="write figures (PNG+PDF), summary.json, arrays.npz here")
    p.add_argument("--json", action="store_true", help="print the JSON summary")
    add_losses_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import losses
    from ..diagnose import DiagnoseConfig, run_diagnose

    spec = losses.get(args.loss)  # unknown name -> error with suggestions
    kw = {}
    if args.steps is not None:
        if args.steps <= 0:
            raise CLIError(f"--steps must be a positive integer, got {args.steps}")
        kw["po_steps"] = args.steps
    cfg = DiagnoseConfig(suffix=args.suffix, loss=spec.name, seed=args.seed,
                         sft_with_suffix=not args.no_sft_suffix, **kw)

    show = sys.stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.sft_steps + cfg.po_steps, desc=f"diagnose {args.suffix}", unit="step")
    try:
        res = run_diagnose(cfg, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = res["summary"]

    if args.out:
        from pathlib import Path

        import matplotlib.pyplot as plt

        from ..plotting.diagnose import plot_geometry, plot_logps, plot_token_heatmap
        from ..results import save_json, save_npz
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, fn in (("logps", plot_logps), ("geometry", plot_geometry), ("token_heatmap", plot_token_heatmap)):
            fig = fn(res)
            for ext in ("png", "pdf"):
                fig.savefig(out / f"{name}.{ext}")
            plt.close(fig)
        save_json(out / "summary.json", summary)
        arrays = {k: res[k] for k in ("steps", "chosen_logp", "rejected_logp", "interval_regimes", "step_regimes",
                                      "token_cos", "token_inner", "chosen_tokens", "rejected_tokens",
                                      "sft_loss", "po_loss")}
        arrays |= {f"geometry_{k}": v for k, v in res["geometry"].items()}
        save_npz(out / "arrays.npz", **arrays)

    if args.json:
        print(json.dumps(summary))
    else:
        fr = summary["regime_fractions"]
        print(f"diagnose sentiment/{args.suffix} loss={spec.name}: final cosine {summary['final_cosine']:+.3f}, "
              f"delta chosen {summary['delta_chosen']:+.3f}, delta rejected {summary['delta_rejected']:+.3f}")
        print("  interval regimes: " + ", ".join(f"{k} {v:.2f}" for k, v in fr.items()))
    return 0
