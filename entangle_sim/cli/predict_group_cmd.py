"""`entangle-sim predict-group LOSS --rewards R1,R2,... --lens N1,N2,...`: one group's one-step prediction.

delta_i = eta (K w)_i with w_i = -dL/dl_i at ratio 1 for TRL's GRPOTrainer loss type LOSS (derived in
this project; docs/theory.md, "Group entanglement"). Without --gram, K = I (delta = eta * weights).
"""
from __future__ import annotations

import json
import math
from pathlib import Path

from . import CLIError
from ._checks import dumps


def register(sub) -> None:
    p = sub.add_parser("predict-group", help="one-step first-order prediction for one GRPO group (TRL loss types)")
    p.add_argument("loss", metavar="LOSS", help="TRL GRPOTrainer loss_type: grpo, bnpo, dr_grpo, dapo, cispo, "
                   "sapo, luspo, vespo")
    p.add_argument("--rewards", required=True, metavar="R1,R2,...", help="the G rewards of the group")
    p.add_argument("--lens", required=True, metavar="N1,N2,...", help="the G completion lengths (tokens)")
    p.add_argument("--gram", default=None, metavar="FILE",
                   help="G x G Gram of the completions' log-prob gradients: JSON matrix or .npy (default: identity)")
    p.add_argument("--eta", "--lr", type=float, default=1.0, help="step size (default 1)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="TRL GRPOConfig hyperparameter by TRL's name (scale_rewards, max_completion_length, "
                        "num_items_in_batch, epsilon, epsilon_high, beta, ...); the prediction is at the on-policy "
                        "step with the policy equal to the reference, where the KL term (beta) has no gradient")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=run)


def _numbers(text: str, flag: str) -> list[float]:
    items = [t.strip() for t in text.split(",")]
    out = []
    for t in items:
        try:
            out.append(float(t))
        except ValueError:
            raise CLIError(f"{flag}: {t!r} is not a number") from None
    return out


def _gram(path: str):
    import numpy as np

    p = Path(path)
    if p.suffix == ".npy":
        try:
            return np.load(p, allow_pickle=False)
        except ValueError as e:
            raise CLIError(f"--gram {path}: not a numeric .npy file ({e})") from None
    try:
        K = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise CLIError(f"--gram {path}: not valid JSON ({e.msg})") from None
    try:
        return np.asarray(K, dtype=float)
    except (TypeError, ValueError):
        raise CLIError(f"--gram {path}: expected a G x G matrix of numbers") from None


def _params(items) -> dict:
    out = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--param {item!r} is not NAME=VALUE")
        name, value = (s.strip() for s in item.split("=", 1))
        if name in ("scale_rewards", "importance_sampling_level", "use_bias_correction_kl", "train"):
            out[name] = value
        elif value.lower() == "none" and name in ("epsilon_high", "delta", "num_items_in_batch"):
            out[name] = None
        else:
            try:
                out[name] = float(value)
            except ValueError:
                raise CLIError(f"--param {name}: {value!r} is not a number") from None
    return out


parse_params = _params   # public: diagnose-rollouts takes the same --param NAME=VALUE


def run(args) -> int:
    import jax

    jax.config.update("jax_enable_x64", True)   # weights are compared to TRL at 1e-6 in float64
    from ..group import losses as gl
    from ..group.predict import predict

    gl.check_loss_type(args.loss)
    rewards = _numbers(args.rewards, "--rewards")
    lens = _numbers(args.lens, "--lens")
    if not math.isfinite(args.eta):
        raise CLIError(f"--eta must be finite, got {args.eta}")
    K = None if args.gram is None else _gram(args.gram)
    params = _params(args.param)
    gl.resolve(args.loss, **params)   # unknown names / bad values -> one line, exit 2
    out = predict(args.loss, rewards, lens, K, args.eta, **params)
    if args.json:
        print(dumps(out))
        return 0
    print(f"{args.loss}: G = {len(rewards)}, eta = {args.eta:g}, K = {'identity' if K is None else args.gram}"
          + ("  (zero-variance group: no change)" if out["zero_variance"] else ""))
    print(f"  {'i':>3} {'reward':>9} {'len':>5} {'advantage':>11} {'weight':>11} {'delta':>12}  regime")
    for i, (r, n, a, w, d, g) in enumerate(zip(rewards, lens, out["advantages"], out["weights"], out["delta"],
                                                out["regimes"])):
        print(f"  {i:>3} {r:>9.4g} {int(n):>5} {a:>+11.4g} {w:>+11.4g} {d:>+12.4g}  {g}")
    print(f"  w^T K w = {out['wKw']:.4g} (>= 0); effective rank of diag(|w|)^1/2 K diag(|w|)^1/2: "
          f"{out['effective_rank']:.3g}")
    return 0


def run_group_conditions(args) -> bool:
    """`entangle-sim conditions LOSS` for a GRPOTrainer loss type: print its group theory, return True;
    False (nothing printed) for any other LOSS, which the pair renderer handles."""
    from ..symbolic import group

    if not getattr(args, "loss", None) or args.loss not in group.LOSS_TYPES:
        return False
    if args.all or args.table or args.param or args.latex:
        raise CLIError(f"{args.loss} is a group loss type: its conditions take no --all, --table, --param or --latex")
    d = group.conditions(args.loss)
    print(dumps(d, indent=2) if args.json else group.conditions_text(d))
    return True
