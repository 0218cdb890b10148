"""`GroupEntanglementCallback`: group entanglement on a fixed probe set of rollouts, logged inside a
TRL `GRPOTrainer` run (the group counterpart of `EntanglementCallback`).

Probe rows are GRPO rollout rows (`prompt`, `completions` (G each, the same G for every row), `rewards`;
`entangle_sim.torch.rollouts`). Every `every_n_steps` optimizer steps (and once before training) the
callback measures, on the probe completions, their summed log-probs, the within-group Grams K and the
batch-level first-order prediction, and logs through the trainer (into `trainer_state.json`):

    entangle/group_logps_correct, entangle/group_logps_incorrect
        mean log-prob of the probe completions with advantage > 0 / < 0;
    entangle/group_pred_delta_correct, entangle/group_pred_delta_incorrect
        their mean first-order change over the next `every_n_steps` steps, predicted for plain SGD at the
        trainer's current learning rate on TRL's loss of the whole probe set as one micro-batch
        (delta = eta sum_j w_j <g_i, g_j> over all probe completions, cross-group terms included);
    entangle/group_frac_correct_fall, entangle/group_frac_incorrect_rise
        fraction of correct completions predicted to fall, of incorrect ones predicted to rise;
    entangle/group_effective_rank, entangle/group_top_eigen_frac
        mean over non-zero-variance probe groups of the effective rank (participation ratio) of
        diag(|w|)^1/2 K diag(|w|)^1/2 and of its largest eigenvalue's share;
    entangle/group_frac_zero_variance, entangle/group_wKw, entangle/group_eta;
    entangle/group_real_delta_correct, entangle/group_real_delta_incorrect
        at the next measurement: the realised change of the two means since the previous one.

The loss type and hyperparameters (`scale_rewards`, `max_completion_length`, `epsilon`, ...) are the
trainer's (`args`) unless given. The prediction is the SGD theory at the on-policy step: with Adam, or when
the training batches differ from the probe set, compare signs, not magnitudes. Measurements run in eval
mode, outside the trainer's autocast, in the parameters' own dtype (float32, or float64), on the
parameters with requires_grad (what the optimiser updates) by default.
"""
from __future__ import annotations

import logging

import numpy as np
import torch

from .callback import ProbeCallback
from .geometry import directional, select_parameters
from .rollouts import collate_group, group_logps, load_rollout_rows, predict_group, psd, tokenize_group

log = logging.getLogger("entangle_sim.torch")

# GRPOConfig fields the group loss reads that describe the probe, not the run's batching
_RUN_ONLY = ("num_items_in_batch", "num_processes", "gradient_accumulation_steps", "steps_per_generation", "train")


def collate_groups(exs: list[dict], pad: int) -> dict[str, torch.Tensor]:
    """All groups' completions one after another as one right-padded [sum G, S] batch."""
    parts = [collate_group(e, pad) for e in exs]
    S = max(p["input_ids"].shape[1] for p in parts)

    def padded(t, v):
        return torch.nn.functional.pad(t, (0, S - t.shape[1]), value=v)

    return {k: torch.cat([padded(p[k], pad if k == "input_ids" else 0) for p in parts]) for k in parts[0]}


def measure_probe(model, examples: list[dict], rewards, *, pad: int, loss_type: str, params: dict, eta: float,
                  subset="trainable", method: str = "auto") -> dict:
    """One measurement of the probe set (numbers the callback logs, without the `entangle/` prefix, plus
    per-completion arrays `logps`, `advantages`, `weights`, `delta`).

    examples: `tokenize_group` outputs (same G each); rewards [n_groups, G].
    """
    from .geometry import response_gram

    G = len(examples[0]["completion_ids"])
    if any(len(e["completion_ids"]) != G for e in examples):
        raise ValueError("every probe group must have the same number of completions G")
    r = np.asarray(rewards, float).ravel()
    lens = [len(c) for e in examples for c in e["completion_ids"]]
    batch = collate_groups(examples, pad)
    # TRL's weights of the probe set as one micro-batch (K = I here: only advantages and weights are used)
    base = predict_group(loss_type, r, lens, None, 1.0, num_generations=G, **params)
    w = np.asarray(base["weights"])
    A = np.asarray(base["advantages"])
    Kw = directional(model, batch, torch.as_tensor(w), subset=subset, method=method).double().numpy()
    delta = eta * Kw
    grams = response_gram(model, batch, groups=G, subset=subset, method=method)
    from ..group.predict import effective_rank, spectrum

    ranks, tops = [], []
    zero = np.asarray(base["zero_variance"]).reshape(-1)
    for k in range(len(examples)):
        if zero[k]:
            continue
        ev = spectrum(psd(grams[k]), w[k * G:(k + 1) * G])
        if ev.size and ev.sum() > 0:
            ranks.append(effective_rank(ev))
            tops.append(float(ev[0] / np.clip(ev, 0, None).sum()))
    lp = group_logps(model, batch)
    cor, inc = A > 0, A < 0

    def mean(x, m):
        return float(x[m].mean()) if m.any() else float("nan")

    return {"group_logps_correct": mean(lp, cor), "group_logps_incorrect": mean(lp, inc),
            "group_pred_delta_correct": mean(delta, cor), "group_pred_delta_incorrect": mean(delta, inc),
            "group_frac_correct_fall": mean((Kw < 0).astype(float), cor),   # sign of the direction, any eta
            "group_frac_incorrect_rise": mean((Kw > 0).astype(float), inc),
            "group_effective_rank": float(np.mean(ranks)) if ranks else float("nan"),
            "group_top_eigen_frac": float(np.mean(tops)) if tops else float("nan"),
            "group_frac_zero_variance": float(zero.mean()), "group_wKw": float(w @ Kw),
            "group_eta": float(eta),
            "logps": lp, "advantages": A, "weights": w, "delta": delta}


class GroupEntanglementCallback(ProbeCallback):
    """Log probe-set group entanglement every N steps inside `trl.GRPOTrainer` (see module docstring).

    probe_rows: rollout rows (list of dicts or JSON/JSONL path); loss_type: TRL's name (default: the
    trainer's `args.loss_type`); params: TRL hyperparameters overriding the trainer's; subset: parameter
    prefixes, "trainable" or None (default: requires_grad parameters); method: "auto" | "ghost" | "exact".
    """

    def __init__(self, probe_rows, every_n_steps: int = 10, subset=None, loss_type: str | None = None, *,
                 method: str = "auto", params: dict | None = None):
        super().__init__(every_n_steps)
        self.rows = load_rollout_rows(probe_rows)
        if len({len(r["completions"]) for r in self.rows}) != 1:
            raise ValueError("every probe row must have the same number of completions G (TRL's num_generations)")
        self.subset, self.loss_type, self.method = subset, loss_type, method
        self.params = dict(params or {})
        self.examples = None

    def _config(self, args):
        from ..group import losses as gl

        lt = self.loss_type or getattr(args, "loss_type", None) or "grpo"
        p = {}
        for name in gl.PARAMS:
            v = getattr(args, name, None)
            if name not in _RUN_ONLY and v is not None and isinstance(v, (bool, int, float, str)):
                p[name] = v
        p.update(self.params)
        gl.resolve(gl.check_loss_type(lt), **p)
        return lt, p

    def _measure(self, model, tokenizer, args, state, lr, optimizer=None):
        from .data import pad_token_id

        lt, p = self._config(args)
        if self.examples is None:
            from ..group import losses as gl

            mcl = gl.resolve(lt, **p)["max_completion_length"]
            self.examples = [tokenize_group(tokenizer, r, max_completion_length=mcl) for r in self.rows]
            self.pad = pad_token_id(tokenizer)
            subset = "trainable" if self.subset is None else self.subset
            n = sum(q.numel() for q in select_parameters(model, subset).values())
            log.info("GroupEntanglementCallback: measuring %d parameters (%s), outside autocast, eval mode", n,
                     "requires_grad" if self.subset is None else self.subset)
        m = measure_probe(model, self.examples, [r["rewards"] for r in self.rows], pad=self.pad, loss_type=lt,
                          params=p, eta=lr * self.every, subset="trainable" if self.subset is None else self.subset,
                          method=self.method)
        lp, A = m.pop("logps"), m.pop("advantages")
        for k in ("weights", "delta"):
            m.pop(k)
        logs = {f"entangle/{k}": v for k, v in m.items() if np.isfinite(v)}
        if self.last is not None:
            for name, mask in (("correct", A > 0), ("incorrect", A < 0)):
                if mask.any():
                    logs[f"entangle/group_real_delta_{name}"] = float((lp - self.last)[mask].mean())
        self.last = lp
        self.history.append({"step": state.global_step, **logs})
        self.pending = logs
