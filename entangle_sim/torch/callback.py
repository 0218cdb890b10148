"""`EntanglementCallback`: gradient entanglement on a fixed probe set, logged inside a TRL run.

Every `every_n_steps` optimizer steps (and once before training) the callback measures, on the probe
rows, the chosen/rejected log-probs and the per-pair Gram, and logs through the trainer's own `log`
(so the values land in `trainer_state.json`, and in TensorBoard / W&B when the callback runs first,
see `attach`):

    entangle/cos_mean, entangle/rho_w_mean, entangle/rho_l_mean, entangle/rho_mean,
    entangle/frac_rho_le_1           geometry of the probe pairs
    entangle/logps_chosen, entangle/logps_rejected     probe means
    entangle/pred_delta_chosen, entangle/pred_delta_rejected
        first-order change of the probe means over the next `every_n_steps` steps, predicted for
        plain SGD at the trainer's current learning rate on the mean loss over the probe pairs
        (the batch-level prediction, full probe Gram);
    entangle/pred_delta_chosen_adam, entangle/pred_delta_rejected_adam
        when the trainer's optimiser is a torch AdamW with a state (from the first step on): the same
        prediction for `every_n_steps` AdamW steps of the live optimiser on the probe batch
        (`adam.callback_metrics`: P = diag(1/(sqrt(v_hat) + eps)) of the current state, momentum and
        weight decay included, v frozen; first order);
    entangle/real_delta_chosen, entangle/real_delta_rejected
        at the next measurement: the realised change since the previous one;
    entangle/pred_regime, entangle/real_regime   regime codes (`entangle_sim.regimes.REGIMES`).

The reference log-probs are the probe log-probs before training (TRL's default reference is the
initial policy). The prediction is the SGD theory: with Adam or when the training batches differ from
the probe set, compare signs and regimes, not magnitudes.

What is measured is what the optimiser updates: by default the parameters with requires_grad (the
adapters under PEFT). Measurements run in eval mode and outside the trainer's autocast (TRL's DPOConfig
turns bf16 autocast on by default), in the parameters' own dtype (float32, or float64), so small
realised changes are not rounded away; the callback says so once in its log (logger
"entangle_sim.torch") and in every `history` entry ("dtype").
"""
from __future__ import annotations

import logging

import numpy as np
from transformers import TrainerCallback

from .. import regimes
from . import theory
from .data import load_preference_rows, pad_token_id, tokenize_rows
from .session import MeasurementSession

log = logging.getLogger("entangle_sim.torch")


class ProbeCallback(TrainerCallback):
    """What the probe-set callbacks share (`EntanglementCallback`, `GroupEntanglementCallback`): measure
    every N steps through the subclass's `_measure(model, tokenizer, args, state, lr, optimizer)` (which
    sets `self.pending`), a baseline entry before the first step, and the values logged with the
    trainer's next log call (and in `state.log_history`, where `analyze-log` reads them)."""

    def __init__(self, every_n_steps: int):
        if every_n_steps < 1:
            raise ValueError("every_n_steps must be >= 1")
        self.every = every_n_steps
        self.last = None
        self.pending: dict = {}
        self.history: list[dict] = []

    def attach(self, trainer):
        """Put this callback first, so reporting integrations (TensorBoard, W&B) see its values."""
        trainer.callback_handler.callbacks.insert(0, self)
        return self

    @staticmethod
    def _lr(args, lr_scheduler):
        if lr_scheduler is not None:
            try:
                return float(lr_scheduler.get_last_lr()[0])
            except Exception:  # schedulers without get_last_lr: fall back to the configured rate
                pass
        return float(args.learning_rate)

    def _tokenizer(self, kwargs):
        tok = kwargs.get("processing_class") or kwargs.get("tokenizer")
        if tok is not None and not hasattr(tok, "eos_token") and hasattr(tok, "tokenizer"):
            tok = tok.tokenizer  # a processor wrapping a tokenizer
        if tok is None:
            raise ValueError(f"{type(self).__name__} needs the trainer's tokenizer (processing_class)")
        return tok

    # -- events
    def on_train_begin(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        self._measure(model, self._tokenizer(kwargs), args, state, self._lr(args, lr_scheduler),
                      kwargs.get("optimizer"))
        # No trainer log call happens before the first step: record the baseline as its own entry.
        state.log_history.append({**self.pending, "step": state.global_step})
        self.pending = {}

    def on_step_end(self, args, state, control, model=None, lr_scheduler=None, **kwargs):
        if state.global_step % self.every == 0:
            self._measure(model, self._tokenizer(kwargs), args, state, self._lr(args, lr_scheduler),
                          kwargs.get("optimizer"))
            control.should_log = True
        return control

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not self.pending:
            return
        if logs is not None:
            logs.update(self.pending)
        # The trainer appended its copy of `logs` to log_history before calling us: add ours there too.
        if state.log_history and state.log_history[-1].get("step") == state.global_step:
            state.log_history[-1].update(self.pending)
        self.pending = {}


class EntanglementCallback(ProbeCallback):
    """Log probe-set entanglement every N steps (see module docstring).

    probe_rows: TRL-format rows (list of dicts, JSON/JSONL path or `datasets.Dataset`);
    subset: parameter prefixes, "trainable" or None (default: the parameters with requires_grad, i.e.
    what the optimiser updates; LoRA-only under PEFT); method: "auto" | "ghost" | "exact"; loss: registry name
    (default: the trainer's `loss_type`, else "sigmoid"), hyperparameters from the trainer's args
    (`beta`) unless given in `loss_kwargs`.
    """

    def __init__(self, probe_rows, every_n_steps: int = 10, subset=None, loss: str | None = None, *,
                 method: str = "auto", batch_size: int = 8, loss_kwargs: dict | None = None):
        super().__init__(every_n_steps)
        self.rows = load_preference_rows(probe_rows)
        self.subset = subset
        self.loss = loss
        self.method = method
        self.batch_size = batch_size
        self.loss_kwargs = dict(loss_kwargs or {})
        self.examples = None
        self.session = None
        self.ref = None        # self.last: (logps_chosen [B], logps_rejected [B]) at the previous measurement

    # -- helpers
    def _loss_name(self, args):
        if self.loss is not None:
            return self.loss
        lt = getattr(args, "loss_type", None)
        if isinstance(lt, (list, tuple)):
            if len(lt) != 1:
                raise ValueError("several TRL loss types: pass loss= explicitly")
            lt = lt[0]
        return lt or "sigmoid"

    def _hp(self, name, args):
        spec = theory.loss_spec(name)
        hp = {}
        for h in spec.hypers:
            if h.name in self.loss_kwargs:
                hp[h.name] = self.loss_kwargs[h.name]
            elif not h.structural and isinstance(getattr(args, h.name, None), (int, float)):
                hp[h.name] = getattr(args, h.name)
        return hp

    def _measure(self, model, tokenizer, args, state, lr, optimizer=None):
        max_length = getattr(args, "max_length", 1024)
        if self.examples is None:
            self.examples = tokenize_rows(tokenizer, self.rows, max_length=max_length)
            self.pad = pad_token_id(tokenizer)
        if self.session is None or self.session.model is not model:
            self.session = MeasurementSession(model, pad_token_id=self.pad,
                                              subset="trainable" if self.subset is None else self.subset,
                                              method=self.method, batch_size=self.batch_size,
                                              max_length=max_length)
            log.info("EntanglementCallback: measuring %d parameters (%s) in %s, outside autocast, eval mode",
                     self.session.n_parameters, "requires_grad" if self.subset is None else self.subset,
                     self.session.dtype)
        s = self.session
        m = s.measure(self.examples)
        if self.ref is None:
            self.ref = (m["chosen_logps"].copy(), m["rejected_logps"].copy())
        name = self._loss_name(args)
        hp = self._hp(name, args)
        th = theory.evaluate(name, **{k: m[k] for k in ("chosen_logps", "rejected_logps", "chosen_len",
                                                        "rejected_len", "G_ww", "G_wl", "G_ll", "prompt_len")},
                             ref_chosen_logps=self.ref[0], ref_rejected_logps=self.ref[1], **hp)
        B = len(self.examples)
        eta = lr * self.every
        dw, dl = s.predict(self.examples, th["d_w"] / B, th["d_l"] / B)
        pc, pr = eta * float(dw.mean()), eta * float(dl.mean())
        logs = {
            "entangle/cos_mean": float(m["cos"].mean()),
            "entangle/rho_w_mean": float(m["rho_w"].mean()),
            "entangle/rho_l_mean": float(m["rho_l"].mean()),
            "entangle/rho_mean": float(m["rho"].mean()),
            "entangle/frac_rho_le_1": float((m["rho"] <= 1).mean()),
            "entangle/logps_chosen": float(m["chosen_logps"].mean()),
            "entangle/logps_rejected": float(m["rejected_logps"].mean()),
            "entangle/pred_delta_chosen": pc,
            "entangle/pred_delta_rejected": pr,
            "entangle/pred_regime": int(regimes.classify(np.array(pc), np.array(pr))),
            "entangle/eta": float(eta),
        }
        logs.update(self._adam(model, optimizer, th["d_w"] / B, th["d_l"] / B, lr, max_length))
        if self.last is not None:
            rc = float(m["chosen_logps"].mean() - self.last[0].mean())
            rr = float(m["rejected_logps"].mean() - self.last[1].mean())
            logs.update({"entangle/real_delta_chosen": rc, "entangle/real_delta_rejected": rr,
                         "entangle/real_regime": int(regimes.classify(np.array(rc), np.array(rr)))})
        self.last = (m["chosen_logps"], m["rejected_logps"])
        self.history.append({"step": state.global_step, "dtype": s.dtype, **logs})
        self.pending = logs

    def _adam(self, model, optimizer, c_w, c_l, lr, max_length) -> dict:
        """The _adam keys from the live optimiser (every_n_steps x one AdamW step), or {} when the
        optimiser is not an AdamW or has no state yet (before the first step)."""
        import torch

        from .adam import callback_metrics
        from .optim_state import OptimizerStateError

        opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
        if not isinstance(opt, torch.optim.AdamW):
            return {}
        try:
            r = callback_metrics(model, self.examples, self.pad, opt, c_w, c_l, lr=lr,
                                 subset=self.session.subset, max_length=max_length)
        except OptimizerStateError:  # no Adam state yet: nothing to precondition with
            return {}
        return {k: self.every * v for k, v in r.items()}
