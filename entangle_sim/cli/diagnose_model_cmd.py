"""`entangle-sim diagnose-model`: per-pair gradient entanglement of a local Hugging Face model on TRL rows."""
from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

from . import CLIError

INSTALL = 'diagnose-model needs the PyTorch extra: pip install "entangle_sim[torch]"'


def register(sub) -> None:
    p = sub.add_parser("diagnose-model", help="gradient entanglement of your own causal LM on your preference pairs")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained; nothing is downloaded)")
    p.add_argument("--data", required=True, help="JSON/JSONL file of TRL preference rows (prompt, chosen, rejected)")
    p.add_argument("--ref-model", default=None,
                   help="local reference model directory (default: the model itself, as TRL's DPOTrainer "
                        "with ref_model=None: every log-ratio starts at 0)")
    p.add_argument("--loss", nargs="+", action="extend", default=None, metavar="NAME",
                   help="registered loss(es) for incentives and regimes (default: sigmoid)")
    p.add_argument("--subset", nargs="+", action="extend", default=None, metavar="PREFIX",
                   help="parameter-name prefixes (e.g. lm_head transformer.h.11) or 'trainable'")
    p.add_argument("--pairs", type=int, default=None, help="use the first N rows")
    p.add_argument("--batch-size", type=int, default=8, help="pairs per forward/backward")
    p.add_argument("--token-maps", type=int, default=0, metavar="K", help="token heat maps of the K most entangled pairs")
    p.add_argument("--method", choices=["auto", "ghost", "exact"], default="auto")
    p.add_argument("--max-length", type=int, default=1024, help="TRL's max_length (keep_start truncation)")
    p.add_argument("--out", default=None, help="write pairs.csv, summary.json and figures here")
    p.add_argument("--json", action="store_true", help="print the JSON summary")
    p.set_defaults(func=run)


def _load(path: str, what: str):
    d = Path(path)
    if not d.is_dir():
        raise CLIError(f"{what} directory not found: {path}")
    if not (d / "config.json").is_file():
        raise CLIError(f"{what} directory {path} has no config.json (save it with save_pretrained)")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tok = AutoTokenizer.from_pretrained(d, local_files_only=True)
        model = AutoModelForCausalLM.from_pretrained(d, local_files_only=True)
    except Exception as e:  # noqa: BLE001 - any loading problem becomes one line
        raise CLIError(f"cannot load {what} from {path}: {str(e).splitlines()[0] if str(e) else type(e).__name__}")
    return tok, model.eval()


def run(args) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise CLIError(INSTALL) from None
    from .. import regimes
    from ..torch import theory
    from ..torch.data import load_preference_rows, pad_token_id, tokenize_rows
    from ..torch.session import MeasurementSession

    for flag, v in (("--pairs", args.pairs), ("--batch-size", args.batch_size)):
        if v is not None and v <= 0:
            raise CLIError(f"{flag} must be a positive integer, got {v}")
    if args.token_maps < 0:
        raise CLIError(f"--token-maps must be >= 0, got {args.token_maps}")
    loss_names = [theory.loss_spec(n).name for n in (args.loss or ["sigmoid"])]  # unknown -> error
    if not Path(args.model).is_dir():
        raise CLIError(f"model directory not found: {args.model}")
    rows = load_preference_rows(args.data, limit=args.pairs)   # bad data fails before any model loads
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep stderr to our own progress bar and one-line errors
    tok, model = _load(args.model, "model")
    ref = _load(args.ref_model, "reference model")[1] if args.ref_model else None
    subset = None
    if args.subset:
        subset = "trainable" if args.subset == ["trainable"] else args.subset
    examples = tokenize_rows(tok, rows, max_length=args.max_length)
    session = MeasurementSession(model, pad_token_id=pad_token_id(tok), subset=subset, method=args.method,
                                 batch_size=args.batch_size, max_length=args.max_length)  # bad prefix -> error
    B = len(examples)

    from tqdm.auto import tqdm
    with tqdm(total=B, desc="diagnose-model", unit="pair", disable=None, file=sys.stderr) as bar:
        d = session.diagnose(examples, loss_names, ref_model=ref, token_maps=args.token_maps, progress=bar.update)
    m, (ref_w, ref_l), per_loss = d["measure"], d["ref"], d["per_loss"]

    summary = {"n_pairs": B, "model": str(args.model), "data": str(args.data), "subset": args.subset,
               "losses": loss_names, "cos_mean": float(m["cos"].mean()), "rho_mean": float(m["rho"].mean()),
               "frac_rho_le_1": float((m["rho"] <= 1).mean()), "regime_fractions": {},
               "batch_regime_fractions": {}, "moved_by_batch": {},
               # TRL's default: without a reference model the reference is the model itself (log-ratios 0)
               "reference": d["reference"], "ref_model": args.ref_model, "method": args.method,
               "dtype": session.dtype,
               "reference_used_by": {n: bool(theory.loss_spec(n).uses_reference) for n in loss_names}}
    for name, th in per_loss.items():
        summary["regime_fractions"][name] = regimes.fractions(regimes.classify(th["delta_chosen"], th["delta_rejected"]))
        summary["batch_regime_fractions"][name] = regimes.fractions(
            regimes.classify(th["batch_delta_chosen"], th["batch_delta_rejected"]))
        summary["moved_by_batch"][name] = int(sum(a != b for a, b in zip(th["regime"], th["batch_regime"])))

    cols = ["pair", "chosen_logps", "rejected_logps", "ref_chosen_logps", "ref_rejected_logps"]
    cols += ["chosen_len", "rejected_len", "prompt_len", "G_ww", "G_wl", "G_ll", "cos", "rho_w", "rho_l", "rho"]
    for name in loss_names:
        cols += [f"{k}_{name}" for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "regime",
                                         "batch_delta_chosen", "batch_delta_rejected", "batch_regime")]
    table = []
    for i in range(B):
        r = {"pair": i, **{k: m[k][i] for k in ("chosen_logps", "rejected_logps", "G_ww", "G_wl", "G_ll", "cos",
                                                "rho_w", "rho_l", "rho")},
             "chosen_len": int(m["chosen_len"][i]), "rejected_len": int(m["rejected_len"][i]),
             "prompt_len": int(m["prompt_len"][i])}
        r["ref_chosen_logps"], r["ref_rejected_logps"] = float(ref_w[i]), float(ref_l[i])
        for name, th in per_loss.items():
            for k in ("d_w", "d_l", "delta_chosen", "delta_rejected", "batch_delta_chosen", "batch_delta_rejected"):
                r[f"{k}_{name}"] = float(th[k][i])
            r[f"regime_{name}"] = th["regime"][i]
            r[f"batch_regime_{name}"] = th["batch_regime"][i]
        table.append(r)

    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        with open(out / "pairs.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            for r in table:
                w.writerow({k: (f"{v:.9g}" if isinstance(v, float) else v) for k, v in r.items()})
        _figures(out, m, per_loss, examples, tok, d["token_maps"])
        summary["figures"] = sorted(p.name for p in out.glob("*.png"))
        (out / "summary.json").write_text(json.dumps(summary, indent=2))
    if args.json:
        print(json.dumps(summary))
    else:
        print(f"diagnose-model {B} pairs: mean cos {summary['cos_mean']:+.3f}, rho <= 1 for "
              f"{summary['frac_rho_le_1']:.0%} of pairs")
        for name in loss_names:
            fr = summary["regime_fractions"][name]
            print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in fr.items() if v)
                  + f"; batch step moves {summary['moved_by_batch'][name]} pair(s) to another regime")
    return 0


def _figures(out, m, per_loss, examples, tok, token_maps):
    import matplotlib.pyplot as plt
    import numpy as np

    from ..plotting.model_diagnose import plot_histograms, plot_pairs_regime_map, plot_token_map

    ratio = np.sqrt(m["G_ll"] / np.maximum(m["G_ww"], np.finfo(float).tiny))
    figs = {}
    for name, th in per_loss.items():
        figs[f"regime_map_{name}"] = plot_pairs_regime_map(m["cos"], ratio, th["regime"], th["d_w"], th["d_l"], loss=name)
    figs["histograms"] = plot_histograms(m["cos"], m["rho"])
    for rank, (i, tg) in enumerate(token_maps):
        ex = examples[i]
        cw = tok.convert_ids_to_tokens(ex["chosen_ids"][: tg.cos.shape[0]])
        cl = tok.convert_ids_to_tokens(ex["rejected_ids"][: tg.cos.shape[1]])
        figs[f"token_map_{rank}_pair{i}"] = plot_token_map(
            tg.cos.numpy(), cw, cl, title=f"pair {i}: cos {m['cos'][i]:+.3f}, token inner products sum to G_wl")
    from ..results import atomic_write

    for fname, fig in figs.items():  # atomically, like every other output file
        atomic_write(out / f"{fname}.png", lambda fh, fig=fig: fig.savefig(fh, format="png", dpi=110))
        plt.close(fig)
