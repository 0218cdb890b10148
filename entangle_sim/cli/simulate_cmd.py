"""`entangle-sim simulate`: train toy policies and compare the theory's predictions with what happens."""
from __future__ import annotations

import json

from . import CLIError
from ._user_losses import add_flag as add_losses_flag


def register(sub) -> None:
    from ..simulate import POLICIES, TASKS
    from ..train import OPTIMIZERS

    p = sub.add_parser("simulate", help="simulate training on a toy policy; theory vs realised changes")
    p.add_argument("--policy", choices=POLICIES, default="linear")
    p.add_argument("--task", choices=TASKS, default="geometry")
    p.add_argument("--suffix-len", type=int, default=8, metavar="L", help="shared suffix/prefix length")
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="loss hyperparameter")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--runs", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--pairs", type=int, default=16)
    p.add_argument("--K", type=int, default=8, help="responses per prompt / vocabulary size")
    p.add_argument("--d", type=int, default=8, help="feature width")
    p.add_argument("--cos", type=float, default=0.9, help="geometry task: initial cos(g_w, g_l)")
    p.add_argument("--norm-ratio", type=float, default=2.0, help="geometry task: initial |g_l|/|g_w|")
    p.add_argument("--batch-size", type=int, default=0, help="pairs per step (0: full batch)")
    p.add_argument("--init-noise", type=float, default=0.0)
    p.add_argument("--sft-steps", type=int, default=0, help="SFT warm start on chosen responses first")
    p.add_argument("--mitigation", default="none",
                   help="none, or a method of entangle_sim.mitigations.METHODS (e.g. normalized, oracle_mask)")
    p.add_argument("--out", default=None, help="write trajectories (npz + config.json); resumes")
    p.add_argument("--json", action="store_true")
    add_losses_flag(p)
    p.set_defaults(func=run)


def run(args) -> int:
    from .. import losses
    from ..simulate import SimConfig, run_sweep
    from ..train import TrainConfig, summarize
    from .losses_cmd import parse_params

    if args.steps <= 0:
        raise CLIError(f"--steps must be positive, got {args.steps}")
    if args.runs <= 0:
        raise CLIError(f"--runs must be positive, got {args.runs}")
    if args.suffix_len < 0:
        raise CLIError(f"--suffix-len must be >= 0, got {args.suffix_len}")
    if args.K < 2:
        raise CLIError(f"--K must be >= 2, got {args.K}")
    spec = losses.get(args.loss)
    params = parse_params(spec, args.param)
    tcfg = TrainConfig(loss=spec.name, loss_params=tuple(sorted(params.items())), optimizer=args.optimizer,
                       lr=args.lr, steps=args.steps, batch_size=args.batch_size)
    cfg = SimConfig(policy=args.policy, task=args.task, pairs=args.pairs, K=args.K, d=args.d, cos=args.cos,
                    norm_ratio=args.norm_ratio, L=args.suffix_len, init_noise=args.init_noise,
                    sft_steps=args.sft_steps, train=tcfg)
    if args.mitigation != "none":
        summary = _run_mitigated(cfg, args)
    else:
        traj = run_sweep(cfg, args.seed, args.runs, out=args.out)
        summary = {"config": cfg.as_dict(), "runs": args.runs, "seed": args.seed, "mitigation": "none",
                   **summarize(traj)}
    if args.out:
        from ..results import save_json

        save_json(f"{args.out}/summary.json", summary)
    if args.json:
        print(json.dumps(summary))
        return 0
    rf = summary["regime_fractions"]
    print(f"{spec.name} on {args.policy}/{args.task}: {args.runs} runs x {args.steps} steps x {args.pairs} pairs")
    print(f"  sign agreement (first order of the real step vs realised): {summary['sign_agreement']:.5f}"
          + (f" over {summary['sign_agreement_n']} changes" if "sign_agreement_n" in summary else ""))
    if "sign_agreement_one_pair" in summary:
        print(f"  sign agreement (one-pair SGD theory vs realised):          {summary['sign_agreement_one_pair']:.5f}")
    print("  realised regimes: " + ", ".join(f"{k} {v:.3f}" for k, v in rf.items() if v > 0))
    print(f"  mean change: chosen {summary['mean_delta_chosen']:+.4f}, rejected {summary['mean_delta_rejected']:+.4f}")
    return 0


def _run_mitigated(cfg, args) -> dict:
    """Runs with a mitigation (entangle_sim.mitigations), one compiled program, a loop over runs."""
    import jax
    import numpy as np

    from .. import mitigations
    from ..simulate import build

    if args.mitigation not in mitigations.METHODS:
        raise CLIError(f"unknown --mitigation {args.mitigation!r}; valid: none, {', '.join(mitigations.METHODS)}")
    key = jax.random.PRNGKey(args.seed)
    pol, params, batch = build(cfg, jax.random.fold_in(key, 0))
    runs = []
    for r in range(args.runs):
        _, s = mitigations.run_with_mitigation(pol, params, batch, cfg.train, args.mitigation,
                                               jax.random.fold_in(key, r + 1))
        runs.append(s)
    out = {"config": cfg.as_dict(), "runs": args.runs, "seed": args.seed, "mitigation": args.mitigation}
    for k, v in runs[0].items():
        if isinstance(v, dict):
            out[k] = {kk: float(np.mean([r[k][kk] for r in runs])) for kk in v}
        else:
            out[k] = float(np.mean([r[k] for r in runs]))
    out["sign_agreement"] = out["sign_agreement_lin"]
    out["mean_delta_chosen"] = out["delta_chosen"]
    out["mean_delta_rejected"] = out["delta_rejected"]
    return out
