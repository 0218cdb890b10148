"""`entangle-sim losses | conditions | predict`: the registry and its first-order theory."""
from __future__ import annotations

import argparse
import json
import math
import sys

from . import CLIError
from ._user_losses import add_flag as add_losses_flag
from ._checks import dumps


def _x64():
    import jax

    jax.config.update("jax_enable_x64", True)  # predictions are compared to 1e-9 relative


def register(sub) -> None:
    p = sub.add_parser("losses", help="list registered losses with TRL equivalents and hyperparameters")
    p.add_argument("--json", action="store_true", help="print JSON")
    add_losses_flag(p)
    p.set_defaults(func=run_losses)

    p = sub.add_parser("conditions", help="incentives, first-order changes and regime conditions of a loss")
    p.add_argument("loss", nargs="?", help="loss name (see `entangle-sim losses`)")
    p.add_argument("--all", action="store_true", help="every registered loss")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.add_argument("--latex", action="store_true", help="LaTeX instead of plain expressions")
    p.add_argument("--table", choices=("markdown", "latex"), default=None,
                   help="print the registry-wide condition table (t_w, t_l, incentive signs, fourth regime)")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a hyperparameter (others stay symbolic)")
    add_losses_flag(p)
    p.set_defaults(func=run_conditions)

    p = sub.add_parser("predict", help="one-step first-order prediction at a given state and Gram")
    p.add_argument("loss")
    p.add_argument("--chosen-logp", type=float, required=True)
    p.add_argument("--rejected-logp", type=float, required=True)
    p.add_argument("--ref-chosen-logp", type=float, default=None)
    p.add_argument("--ref-rejected-logp", type=float, default=None)
    p.add_argument("--chosen-len", type=float, default=1.0)
    p.add_argument("--rejected-len", type=float, default=1.0)
    p.add_argument("--prompt-logp", type=float, default=0.0, help="prompt log-prob (ORPO's NLL)")
    p.add_argument("--prompt-len", type=float, default=0.0)
    p.add_argument("--gww", type=float, required=True, help="|g_w|^2")
    p.add_argument("--gwl", type=float, required=True, help="<g_w, g_l>")
    p.add_argument("--gll", type=float, required=True, help="|g_l|^2")
    p.add_argument("--eta", "--lr", type=float, default=1.0, help="step size (default 1); --lr is the name simulate and mitigate use")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE")
    p.add_argument("--json", action="store_true")
    add_losses_flag(p)
    p.set_defaults(func=run_predict)


def parse_params(spec, items) -> dict:
    """`NAME=VALUE` strings -> checked hyperparameters (numbers as float, strings for choices)."""
    out = {}
    for item in items:
        if "=" not in item:
            raise CLIError(f"--param {item!r} is not NAME=VALUE")
        name, value = item.split("=", 1)
        h = spec.hyper(name.strip())
        val = value.strip() if h.structural else _float(value, f"--param {name}")
        try:
            h.check(val)
        except TypeError as e:
            raise CLIError(str(e)) from None
        out[h.name] = val
    return out


def _float(value, what) -> float:
    try:
        x = float(value)
    except ValueError:
        raise CLIError(f"{what}: {value!r} is not a number") from None
    if not math.isfinite(x):
        raise CLIError(f"{what}: {value!r} must be finite")
    return x


def run_losses(args) -> int:
    from .. import losses

    infos = [losses.get(n).info() for n in losses.names()]
    if args.json:
        print(json.dumps(infos, indent=2))
        return 0
    for i in infos:
        hp = ", ".join(f"{k}={v['default']}" for k, v in i["hyperparameters"].items()) or "-"
        alias = f" (aka {', '.join(i['aliases'])})" if i["aliases"] else ""
        print(f"{i['name']:<18} {i['trl'] or '-':<28} {hp}{alias}")
        print(f"{'':<18} {i['description']}")
    return 0


def condition_text(d, trl: str | None = None) -> str:
    """The readable block of one derivation dict: compact forms in named symbols, signs, regime."""
    from ..symbolic.compact import block

    return block(d, trl)


def run_conditions(args) -> int:
    from .. import losses
    from .predict_group_cmd import run_group_conditions

    if run_group_conditions(args):   # a GRPOTrainer loss type: the group theory's own renderer
        return 0
    from ..symbolic import derive

    if args.table:
        if args.loss or args.param:
            raise CLIError("--table prints every loss at default hyperparameters; drop LOSS and --param")
        from ..symbolic.compact import table

        print(table(args.table))
        return 0
    if args.all == bool(args.loss):
        raise CLIError("give exactly one of LOSS, --all or --table")
    if args.all and args.param:
        raise CLIError("--param fixes a hyperparameter of one loss; it cannot be combined with --all")
    names = losses.names() if args.all else [losses.get(args.loss).name]
    out = []
    for name in names:
        spec = losses.get(name)
        hp = parse_params(spec, args.param) if not args.all else {}
        out.append(derive(spec, **hp).as_dict(latex=args.latex))
    if args.json:
        print(dumps(out if args.all else out[0], indent=2))
    else:
        print("\n\n".join(condition_text(d, losses.get(d["loss"]).trl) for d in out))
    return 0


def predict(loss_name: str, *, chosen_logp, rejected_logp, ref_chosen_logp=None, ref_rejected_logp=None,
            chosen_len=1.0, rejected_len=1.0, prompt_logp=0.0, prompt_len=0.0, gww, gwl, gll, eta=1.0,
            params=None) -> dict:
    """First-order prediction at one state (validated); the body of `entangle-sim predict`."""
    import numpy as np

    from .. import losses, regimes
    from ..symbolic import derive

    spec = losses.get(loss_name)
    params = dict(params or {})
    spec.resolve(**params)
    nums = {"--chosen-logp": chosen_logp, "--rejected-logp": rejected_logp, "--chosen-len": chosen_len,
            "--rejected-len": rejected_len, "--gww": gww, "--gwl": gwl, "--gll": gll, "--eta": eta,
            "--prompt-logp": prompt_logp, "--prompt-len": prompt_len}
    if ref_chosen_logp is not None:
        nums["--ref-chosen-logp"] = ref_chosen_logp
    if ref_rejected_logp is not None:
        nums["--ref-rejected-logp"] = ref_rejected_logp
    for k, v in nums.items():
        if not math.isfinite(v):
            raise CLIError(f"{k} must be finite, got {v}")
    for k in ("--chosen-logp", "--rejected-logp", "--ref-chosen-logp", "--ref-rejected-logp", "--prompt-logp"):
        if k in nums and nums[k] > 0:
            raise CLIError(f"{k} is a log-probability and must be <= 0, got {nums[k]}")
    if chosen_len <= 0 or rejected_len <= 0:
        raise CLIError(f"lengths must be positive, got --chosen-len {chosen_len} --rejected-len {rejected_len}")
    if prompt_len < 0:
        raise CLIError(f"--prompt-len must be >= 0, got {prompt_len}")
    if eta <= 0:
        raise CLIError(f"--eta must be positive, got {eta}")
    if gww < 0 or gll < 0 or gwl * gwl > gww * gll * (1 + 1e-12):
        raise CLIError(f"the Gram matrix [[{gww}, {gwl}], [{gwl}, {gll}]] is not positive semidefinite "
                       "(need G_ww >= 0, G_ll >= 0, G_wl^2 <= G_ww G_ll)")
    if spec.uses_reference and (ref_chosen_logp is None or ref_rejected_logp is None):
        raise CLIError(f"loss {spec.name!r} uses a reference model: give --ref-chosen-logp and --ref-rejected-logp")
    if spec.batch_coupled:
        print(f"note: {spec.name} couples pairs across a batch; this is its one-pair form", file=sys.stderr)

    der = derive(spec, **{k: v for k, v in params.items() if spec.hyper(k).structural or spec.hyper(k).keep_value})
    values = {**spec.resolve(**params), "chosen_logps": chosen_logp, "rejected_logps": rejected_logp,
              "ref_chosen_logps": ref_chosen_logp or 0.0, "ref_rejected_logps": ref_rejected_logp or 0.0,
              "chosen_len": chosen_len, "rejected_len": rejected_len, "prompt_logps": prompt_logp,
              "prompt_len": prompt_len, "G_ww": gww, "G_wl": gwl, "G_ll": gll, "eta": eta}
    values = {k: v for k, v in values.items() if not isinstance(v, str)}
    try:
        with np.errstate(all="raise"):
            ev = der.evaluate(**values)
    except (OverflowError, ZeroDivisionError, FloatingPointError) as e:
        raise CLIError(f"the formulas of {spec.name!r} overflow at these values ({e}); "
                       "use less extreme hyperparameters or inputs") from None
    out = {"loss": spec.name}
    for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin"):
        out[k] = float(ev[k])
    out["regime"] = regimes.REGIMES[int(ev["regime_code"])]
    out["case"] = regimes.CASE_OF_REGIME[out["regime"]]
    out["loss_value"] = float(der.loss(**values))
    out["delta_loss"] = float(der.delta_loss(**values))
    out["delta_z"] = None if der.delta_z is None else float(der.delta_z(**values))
    out["hyperparameters"] = {k: v for k, v in spec.resolve(**params).items()}
    for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "delta_margin", "loss_value"):
        if not math.isfinite(out[k]):
            raise CLIError(f"{k} is not finite at this state ({out[k]}); check the inputs")
    return out


def run_predict(args) -> int:
    _x64()
    from .. import losses

    spec = losses.get(args.loss)
    out = predict(spec.name, chosen_logp=args.chosen_logp, rejected_logp=args.rejected_logp,
                  ref_chosen_logp=args.ref_chosen_logp, ref_rejected_logp=args.ref_rejected_logp,
                  chosen_len=args.chosen_len, rejected_len=args.rejected_len, prompt_logp=args.prompt_logp,
                  prompt_len=args.prompt_len, gww=args.gww, gwl=args.gwl, gll=args.gll, eta=args.eta,
                  params=parse_params(spec, args.param))
    if args.json:
        print(dumps(out))
        return 0
    print(f"{out['loss']}: d_w = {out['d_w']:.6g}, d_l = {out['d_l']:.6g}")
    print(f"  Delta l_w ~ {out['delta_chosen']:+.6g}   Delta l_l ~ {out['delta_rejected']:+.6g}   "
          f"Delta margin ~ {out['delta_margin']:+.6g}")
    print(f"  regime: {out['regime']} ({out['case']})")
    return 0
