"""`entangle-sim diagnose`: SFT -> preference optimisation on the sentiment task with gradient geometry."""
from __future__ import annotations

import sys

from ._user_losses import add_flag as add_losses_flag
from ._checks import SEED, STEPS, add_allow_large, check_out_dir, check_size, dumps, require_finite


def register(sub) -> None:
    p = sub.add_parser("diagnose", help="train a tiny transformer (SFT then PO) and log gradient entanglement")
    p.add_argument("--task", choices=["sentiment"], default="sentiment")
    p.add_argument("--suffix", choices=["1t", "short", "long"], required=True,
                   help="shared suffix after the contrastive token: none, short, long")
    p.add_argument("--loss", default="sigmoid", help="registered loss (see `entangle-sim losses`)")
    p.add_argument("--steps", type=STEPS, default=None, help="preference-optimisation steps (default preset)")
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--no-sft-suffix", action="store_true",
                   help="SFT on prompt + label word only (the paper's SFT data; the default when pretrained)")
    p.add_argument("--from-scratch", action="store_true",
                   help="skip the pretraining stage on the synthetic corpus (SFT then also shows the suffix)")
    p.add_argument("--out", default=None, help="write figures (PNG+PDF), summary.json, arrays.npz here")
    p.add_argument("--json", action="store_true", help="print the JSON summary")
    add_losses_flag(p)
    add_allow_large(p)
    p.set_defaults(func=run)


def estimate(cfg) -> tuple[float, float]:
    """(bytes, per-pair gradient evaluations) upper bounds: SFT and PO batches (2 gradients per PO
    pair) plus the geometry logged every `log_every` steps on `n_eval_pairs` pairs (per-token
    Gram blocks of up to (prompt + long suffix + 2)^2 entries, 8 bytes each, kept for every log)."""
    n_logs = cfg.po_steps // max(cfg.log_every, 1) + 2
    T = cfg.prompt_len + cfg.long_len + 2
    mem = n_logs * cfg.n_eval_pairs * (T * T + 64) * 8 * 4
    work = cfg.pretrain_steps * cfg.pretrain_batch + cfg.sft_steps * cfg.sft_batch + cfg.po_steps * cfg.po_batch * 2 + n_logs * cfg.n_eval_pairs * 2 * T
    return float(mem), float(work)


def run(args) -> int:
    from .. import losses
    from ..diagnose import DiagnoseConfig, run_diagnose

    spec = losses.get(args.loss)  # unknown name -> error with suggestions
    kw = {}
    if args.steps is not None:
        kw["po_steps"] = args.steps
    if args.from_scratch:
        kw["pretrain_steps"] = 0
    cfg = DiagnoseConfig(suffix=args.suffix, loss=spec.name, seed=args.seed,
                         sft_with_suffix=False if args.no_sft_suffix else None, **kw)
    mem, work = estimate(cfg)
    check_size(args, memory_bytes=mem, work=work, flags="--steps")
    if args.out is not None:
        check_out_dir(args.out)  # before the work, not after it

    show = sys.stderr.isatty()
    bar = None
    if show:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.pretrain_steps + cfg.sft_steps + cfg.po_steps, desc=f"diagnose {args.suffix}", unit="step")
    try:
        res = run_diagnose(cfg, progress=bar.update if bar is not None else None)
    finally:
        if bar is not None:
            bar.close()
    summary = res["summary"]
    require_finite(summary, "diagnose summary", keys=("final_cosine", "delta_chosen", "delta_rejected"))

    if args.out:
        from pathlib import Path

        import matplotlib.pyplot as plt

        from ..plotting.diagnose import plot_geometry, plot_logps, plot_token_heatmap
        from ..results import atomic_write, save_json, save_npz
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        for name, fn in (("logps", plot_logps), ("geometry", plot_geometry), ("token_heatmap", plot_token_heatmap)):
            fig = fn(res)
            for ext in ("png", "pdf"):
                atomic_write(out / f"{name}.{ext}", lambda f, ext=ext: fig.savefig(f, format=ext))
            plt.close(fig)
        save_json(out / "summary.json", summary)
        arrays = {k: res[k] for k in ("steps", "chosen_logp", "rejected_logp", "interval_regimes", "step_regimes",
                                      "token_cos", "token_inner", "chosen_tokens", "rejected_tokens",
                                      "sft_loss", "po_loss")}
        arrays |= {f"geometry_{k}": v for k, v in res["geometry"].items()}
        save_npz(out / "arrays.npz", **arrays)

    if args.json:
        print(dumps(summary))
    else:
        fr = summary["regime_fractions"]
        print(f"diagnose sentiment/{args.suffix} loss={spec.name}: final cosine {summary['final_cosine']:+.3f}, "
              f"delta chosen {summary['delta_chosen']:+.3f}, delta rejected {summary['delta_rejected']:+.3f}")
        print("  interval regimes: " + ", ".join(f"{k} {v:.2f}" for k, v in fr.items()))
    return 0
