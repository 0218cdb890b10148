"""`entangle-sim diagnose-model`: per-pair gradient entanglement of a local Hugging Face model on TRL rows."""
from __future__ import annotations

import json
from pathlib import Path

from . import CLIError
from ._checks import load_model
from ._user_losses import add_flag as add_losses_flag

INSTALL = 'diagnose-model needs the PyTorch extra: pip install "entangle_sim[torch]"'


def register(sub) -> None:
    p = sub.add_parser("diagnose-model", help="gradient entanglement of your own causal LM on your preference pairs")
    p.add_argument("--model", required=True, help="local model directory (save_pretrained; nothing is downloaded)")
    p.add_argument("--data", required=True, help="TRL preference rows (prompt, chosen, rejected): JSONL, JSON, "
                   "Parquet or a datasets save_to_disk folder, streamed")
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
    p.add_argument("--json", action="store_true", help="print the JSON summary (strict JSON, for scripts)")
    p.add_argument("--optimizer-state", default=None, metavar="DIR",
                   help="a Trainer/TRL checkpoint folder (its optimizer.pt): Adam-preconditioned Gram and regimes")
    p.add_argument("--screen", type=int, default=None, metavar="K",
                   help="CHES-score every pair (forward only), measure the exact Gram on the top K")
    p.add_argument("--check-step", action="store_true",
                   help="take one real optimiser step on the measured pairs: predicted vs realised")
    p.add_argument("--lr", type=float, default=None,
                   help="learning rate of --check-step (default: the optimiser state's initial lr, else 1e-4)")
    p.add_argument("--top", type=int, default=10, metavar="K", help="the K most entangled pairs in the report")
    p.add_argument("--dist-timeout", type=float, default=60.0, metavar="S",
                   help="under torchrun: seconds a rank waits for its peers before failing")
    p.add_argument("--chunk-rows", type=int, default=256,
                   help="rows per resumable output chunk (under --out/measure/chunks)")
    add_losses_flag(p)  # user losses: usable in --loss and evaluated in the what-if table
    p.set_defaults(func=run)


def run(args) -> int:
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        raise CLIError(INSTALL) from None
    from ..torch import theory
    from ..torch.diagnosis_run import run_diagnosis
    from ..torch.stream import source_format

    for flag, v in (("--pairs", args.pairs), ("--batch-size", args.batch_size), ("--screen", args.screen),
                    ("--chunk-rows", args.chunk_rows), ("--top", args.top)):
        if v is not None and v <= 0:
            raise CLIError(f"{flag} must be a positive integer, got {v}")
    if args.token_maps < 0:
        raise CLIError(f"--token-maps must be >= 0, got {args.token_maps}")
    if args.lr is not None and not args.lr > 0:
        raise CLIError(f"--lr must be > 0, got {args.lr}")
    loss_names = [theory.loss_spec(n).name for n in (args.loss or ["sigmoid"])]  # unknown -> error
    if not Path(args.model).is_dir():
        raise CLIError(f"model directory not found: {args.model}")
    source_format(args.data)  # a missing or unknown data source fails before any model loads
    from transformers.utils import logging as hf_logging
    hf_logging.disable_progress_bar()  # keep stderr to our own progress bar and one-line errors
    tok, model = load_model(args.model, "model")
    ref = load_model(args.ref_model, "reference model")[1] if args.ref_model else None
    subset = None
    if args.subset:
        subset = "trainable" if args.subset == ["trainable"] else args.subset
    res = run_diagnosis(model, tok, args.data, out=args.out, ref_model=ref, losses=loss_names, subset=subset,
                        pairs=args.pairs, batch_size=args.batch_size, token_maps=args.token_maps,
                        method=args.method, max_length=args.max_length, optimizer_state=args.optimizer_state,
                        screen=args.screen, check_step=args.check_step, lr=args.lr, chunk_rows=args.chunk_rows,
                        top_k=args.top, progress=True,
                        config={"model": str(Path(args.model).resolve()), "ref_model": args.ref_model},
                        extra={"model": str(args.model), "ref_model": args.ref_model},
                        dist_timeout_s=args.dist_timeout, make_figures=_figures)
    if res is None:  # a rank > 0 under torchrun: rank 0 writes and prints
        return 0
    summary = res["summary"]
    if args.json:
        print(json.dumps(summary, allow_nan=False))
        return 0
    print(summary["verdict"])
    print(f"diagnose-model {summary['n_pairs']} pairs: mean cos {summary['cos_mean']:+.3f}, rho <= 1 for "
          f"{summary['frac_rho_le_1']:.0%} of pairs")
    for name in loss_names:
        fr = summary["regime_fractions"][name]
        print(f"  {name}: " + ", ".join(f"{k} {v:.2f}" for k, v in fr.items() if v)
              + f"; batch step moves {summary['moved_by_batch'][name]} pair(s) to another regime")
    adam = any("adam" in r for r in summary["what_if"])
    print("what to change (first order; ranked by pairs with chosen up and margin up"
          + (", under Adam" if adam else "") + "):")
    for r in [r for r in summary["what_if"] if "skipped" not in r][:5]:
        s = r["adam" if adam else "sgd"]
        print(f"  {r['label']:<32} chosen up & margin up {s['chosen_up_margin_up']:.0%}, "
              f"chosen falls {s['chosen_falls']:.0%}")
    if "check_step" in summary:
        c = summary["check_step"]
        print(f"check-step ({c['optimizer']}, lr {c['lr']:g}, {c['pairs']} pairs): sign agreement "
              f"{c['sign_agreement']}/{c['counted']}, regime agreement {c['regime_agreement']:.0%}, "
              f"max relative error {c['max_rel_error']:.2g}")
    if args.out:
        print(f"report: {Path(args.out) / 'report.md'}")
    return 0


def _figures(m, per_loss, summary, examples, tok, token_maps) -> dict:
    """{file stem: Figure} of diagnose-model: regime maps, histograms, the per-group split, the what-if
    ranking and the token heat maps."""
    import numpy as np

    from ..plotting.diagnosis import plot_by_group, plot_what_if
    from ..plotting.model_diagnose import plot_histograms, plot_pairs_regime_map, plot_token_map

    ratio = np.sqrt(m["G_ll"] / np.maximum(m["G_ww"], np.finfo(float).tiny))
    figs = {}
    for name, th in per_loss.items():
        figs[f"regime_map_{name}"] = plot_pairs_regime_map(m["cos"], ratio, th["regime"], th["d_w"], th["d_l"], loss=name)
    figs["histograms"] = plot_histograms(m["cos"], m["rho"])
    if summary["by_group"]:
        figs["by_group"] = plot_by_group(summary["by_group"])
    figs["what_if"] = plot_what_if(summary["what_if"])
    for stem, j, tg in token_maps:
        ex = examples[j]
        cw = tok.convert_ids_to_tokens(ex["chosen_ids"][: tg.cos.shape[0]])
        cl = tok.convert_ids_to_tokens(ex["rejected_ids"][: tg.cos.shape[1]])
        figs[stem] = plot_token_map(tg.cos.numpy(), cw, cl, title=f"pair {int(m['index'][j])}: cos "
                                    f"{m['cos'][j]:+.3f}, token inner products sum to G_wl")
    return figs
