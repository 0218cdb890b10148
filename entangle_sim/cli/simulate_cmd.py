"""`entangle-sim simulate`: train toy policies and compare the theory's predictions with what happens."""
from __future__ import annotations

from . import CLIError
from ._user_losses import add_flag as add_losses_flag
from ._checks import COUNT, SEED, STEPS, add_allow_large, check_out_dir, check_size, dumps, int_in, real_in, \
    require_finite


def register(sub) -> None:
    from ..simulate import POLICIES, TASKS
    from ..train import OPTIMIZERS

    p = sub.add_parser("simulate", help="simulate training on a toy policy; theory vs realised changes")
    p.add_argument("--policy", choices=POLICIES, default="linear")
    p.add_argument("--task", choices=TASKS, default="geometry")
    p.add_argument("--suffix-len", type=int_in(0, 10**6), default=8, metavar="L", help="shared suffix/prefix length")
    p.add_argument("--loss", default="sigmoid")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE", help="loss hyperparameter")
    p.add_argument("--optimizer", choices=OPTIMIZERS, default="sgd")
    p.add_argument("--lr", type=real_in(0, lo_open=True), default=0.05)
    p.add_argument("--steps", type=STEPS, default=100)
    p.add_argument("--runs", type=COUNT, default=4)
    p.add_argument("--seed", type=SEED, default=0)
    p.add_argument("--pairs", type=COUNT, default=16)
    p.add_argument("--K", type=int_in(2, 10**9), default=8, help="responses per prompt / vocabulary size")
    p.add_argument("--d", type=COUNT, default=8, help="feature width")
    p.add_argument("--cos", type=real_in(-1, 1), default=0.9, help="geometry task: initial cos(g_w, g_l)")
    p.add_argument("--norm-ratio", type=real_in(0, lo_open=True), default=2.0,
                   help="geometry task: initial |g_l|/|g_w|")
    p.add_argument("--batch-size", type=int_in(0, 10**9), default=0, help="pairs per step (0: full batch)")
    p.add_argument("--init-noise", type=real_in(0), default=0.0)
    p.add_argument("--sft-steps", type=int_in(0, 10**9), default=0, help="SFT warm start on chosen responses first")
    p.add_argument("--mitigation", default="none",
                   help="none, or a method of entangle_sim.mitigations.METHODS (e.g. normalized, oracle_mask)")
    p.add_argument("--out", default=None, help="write trajectories (npz + config.json); resumes")
    p.add_argument("--json", action="store_true")
    add_losses_flag(p)
    add_allow_large(p)
    p.set_defaults(func=run)


def estimate(args) -> tuple[float, float]:
    """(bytes, per-pair gradient evaluations) upper bounds of a simulate run.

    Parameters ~ pairs*K + 2*K*d + pairs*d; per run and step each pair has 2 gradients (recorded
    Jacobian rows, 8 bytes a value, one chunk of <= 64 runs at a time) and 16 recorded fields;
    the host keeps every run's records twice (chunks + the concatenation)."""
    n_params = args.pairs * args.K + 2 * args.K * args.d + args.pairs * args.d
    chunk = min(args.runs, 64)
    jac = chunk * 2 * args.pairs * n_params * 8
    records = 2 * args.runs * (args.steps + args.sft_steps) * args.pairs * 16 * 8
    return float(jac + records), float(args.runs) * (args.steps + args.sft_steps) * 2 * args.pairs


def run(args) -> int:
    from .. import losses
    from ..simulate import SimConfig, run_mitigated, run_sweep
    from ..train import TrainConfig, summarize
    from .losses_cmd import parse_params

    mem, work = estimate(args)
    check_size(args, memory_bytes=mem, work=work, flags="--runs/--steps/--pairs/--K/--d")
    if args.out is not None:
        check_out_dir(args.out)
    spec = losses.get(args.loss)
    params = parse_params(spec, args.param)
    tcfg = TrainConfig(loss=spec.name, loss_params=tuple(sorted(params.items())), optimizer=args.optimizer,
                       lr=args.lr, steps=args.steps, batch_size=args.batch_size)
    cfg = SimConfig(policy=args.policy, task=args.task, pairs=args.pairs, K=args.K, d=args.d, cos=args.cos,
                    norm_ratio=args.norm_ratio, L=args.suffix_len, init_noise=args.init_noise,
                    sft_steps=args.sft_steps, train=tcfg)
    if args.mitigation != "none":
        from .. import mitigations

        if args.mitigation not in mitigations.METHODS:
            raise CLIError(f"unknown --mitigation {args.mitigation!r}; valid: none, {', '.join(mitigations.METHODS)}")
        summary = run_mitigated(cfg, args.seed, args.runs, args.mitigation, out=args.out)
    else:
        traj = run_sweep(cfg, args.seed, args.runs, out=args.out)
        summary = {"config": cfg.as_dict(), "runs": args.runs, "seed": args.seed, "mitigation": "none",
                   **summarize(traj)}
    require_finite(summary, "simulation summary", keys=("mean_delta_chosen", "mean_delta_rejected", "regime_fractions"))
    if args.out:
        from ..results import save_json

        save_json(f"{args.out}/summary.json", summary)
    if args.json:
        print(dumps(summary))
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
