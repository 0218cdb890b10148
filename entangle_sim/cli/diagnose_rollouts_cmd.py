"""`entangle-sim diagnose-rollouts --model DIR --data FILE`: group entanglement of GRPO rollouts on your model.

Per completion the first-order change delta = eta K w of its log-prob under one SGD step on its group's
TRL GRPOTrainer loss, and its regime; per group and overall the fraction of correct completions
predicted to fall, zero-variance groups and the spectrum / effective rank of diag(|w|)^1/2 K diag(|w|)^1/2
(derived in this project; docs/theory.md, "Group entanglement"; docs/torch_bridge.md, "Groups (GRPO)").
"""
from __future__ import annotations

import csv
import json
import math
import sys
from pathlib import Path

from . import CLIError
from ._checks import load_model
from .predict_group_cmd import parse_params

INSTALL = 'diagnose-rollouts needs the PyTorch extra: pip install "entangle_sim[torch]"'
CSV_COLUMNS = ("group", "index", "reward", "advantage", "weight", "length", "logp", "K_ii", "delta", "rises",
               "regime")


def register(sub) -> None:
    p = sub.add_parser("diagnose-rollouts", help="group entanglement of GRPO rollouts on your own causal LM")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained; nothing is downloaded)")
    p.add_argument("--data", required=True,
                   help="JSON/JSONL rows: prompt, completions (G strings or message lists), rewards (G numbers)")
    p.add_argument("--loss-type", default="grpo", metavar="LOSS",
                   help="TRL GRPOTrainer loss_type: grpo (default), bnpo, dr_grpo, dapo, cispo, sapo, luspo, vespo")
    p.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="TRL GRPOConfig hyperparameter by TRL's name (scale_rewards, max_completion_length, ...)")
    p.add_argument("--eta", "--lr", type=float, default=1.0, help="SGD step size of the prediction (default 1)")
    p.add_argument("--subset", nargs="+", action="extend", default=None, metavar="PREFIX",
                   help="parameter-name prefixes (e.g. lm_head transformer.h.1) or 'trainable'")
    p.add_argument("--method", choices=["auto", "ghost", "exact"], default="auto")
    p.add_argument("--groups", type=int, default=None, metavar="N", help="use the first N rows (groups)")
    p.add_argument("--out", default=None, help="write rollouts.csv, summary.json and figures here")
    p.add_argument("--json", action="store_true", help="print the JSON summary")
    p.set_defaults(func=run)


def run(args) -> int:
    from ._checks import check_out_dir, dumps
    from ..group import losses as gl

    gl.check_loss_type(args.loss_type)                  # bad input first, before torch or the model load
    params = parse_params(args.param)
    gl.resolve(args.loss_type, **params)
    if not (math.isfinite(args.eta) and args.eta > 0):
        raise CLIError(f"--eta must be a positive finite number, got {args.eta}")
    if args.groups is not None and args.groups <= 0:
        raise CLIError(f"--groups must be a positive integer, got {args.groups}")
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise CLIError(INSTALL) from None
    from ..torch.rollouts import diagnose_rollouts, load_rollout_rows
    rows = load_rollout_rows(args.data, limit=args.groups)   # bad data fails before any model loads
    if not Path(args.model).is_dir():
        raise CLIError(f"model directory not found: {args.model}")
    out = check_out_dir(args.out) if args.out else None
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()
    tok, model = load_model(args.model)
    subset = None
    if args.subset:
        subset = "trainable" if args.subset == ["trainable"] else args.subset
    from tqdm.auto import tqdm
    with tqdm(total=len(rows), desc="diagnose-rollouts", unit="group", disable=None, file=sys.stderr) as bar:
        d = diagnose_rollouts(model, tok, rows, loss_type=args.loss_type, eta=args.eta, params=params,
                              subset=subset, method=args.method, progress=bar.update)
    summary = {"model": str(args.model), "data": str(args.data), "loss_type": args.loss_type, "eta": args.eta,
               "subset": args.subset, "method": args.method, "params": d["params"], **d["overall"],
               "groups": [{k: v for k, v in g.items() if k != "gram"} for g in d["groups"]]}
    if out is not None:
        from ..results import atomic_write

        def write_csv(fh):
            import io
            s = io.StringIO()
            w = csv.DictWriter(s, fieldnames=CSV_COLUMNS)
            w.writeheader()
            for r in d["rollouts"]:
                w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
            fh.write(s.getvalue().encode())

        atomic_write(out / "rollouts.csv", write_csv)
        summary["figures"] = _figures(out, d)
        (out / "grams.json").write_text(json.dumps([g["gram"] for g in d["groups"]]))
        (out / "summary.json").write_text(dumps(summary, indent=2))
    if args.json:
        print(dumps(summary))
        return 0
    o = d["overall"]
    fcf = "n/a" if o["frac_correct_fall"] is None else f"{o['frac_correct_fall']:.0%}"
    er = "n/a" if o["effective_rank_mean"] is None else f"{o['effective_rank_mean']:.3g}"
    print(f"diagnose-rollouts {o['n_groups']} groups, {o['n_rollouts']} completions ({args.loss_type}, eta "
          f"{args.eta:g}): {o['n_correct_fall']}/{o['n_correct']} correct completions predicted to fall ({fcf}); "
          f"{o['n_zero_variance']} zero-variance group(s); mean effective rank {er}")
    for g in d["groups"]:
        ev = ", ".join(f"{x:.3g}" for x in g["eigenvalues"][:4])
        print(f"  group {g['group']}: G={g['G']}" + (" zero-variance (no change)" if g["zero_variance"] else
              f", {g['n_correct_fall']}/{g['n_correct']} correct fall, effective rank {g['effective_rank']:.3g}, "
              f"eigenvalues {ev}"))
    return 0


def _figures(out, d) -> list[str]:
    import matplotlib.pyplot as plt

    from ..plotting.group import plot_rollout_spectra, plot_rollout_deltas
    from ..results import atomic_write

    figs = {"rollout_deltas": plot_rollout_deltas(d["rollouts"]),
            "rollout_spectra": plot_rollout_spectra(d["groups"])}
    for name, fig in figs.items():
        atomic_write(out / f"{name}.png", lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
    return sorted(f"{n}.png" for n in figs)
