"""AdamW optimiser state of a Trainer/TRL checkpoint (or a live optimiser), mapped to named parameters.

Adam's update of one parameter entry is  -lr m_hat / (sqrt(v_hat) + eps)  with
v_hat = exp_avg_sq / (1 - beta2^step): a diagonal preconditioner

    P = diag(1 / (sqrt(v_hat) + eps))

that the plain-SGD Gram <g_w, g_l> ignores. `load_optimizer_state(DIR, model)` reads DIR/optimizer.pt
as `transformers.Trainer._save_checkpoint` writes it (`torch.save(optimizer.state_dict())`) and maps
the checkpoint's parameter order to names the way `Trainer.create_optimizer` builds its two groups:
[decay parameters that require grad] then [the other parameters that require grad], each in
`model.named_parameters()` order (a single-group state is taken in plain `named_parameters` order
of the trainable parameters). Every state tensor's shape is checked against its parameter.

    st = load_optimizer_state("out/checkpoint-500", model)
    P = st.preconditioners()                  # {name: tensor shaped like the parameter}
    st.describe()                             # JSON for reports (source, step, betas, eps, lr, ...)

Errors are `OptimizerStateError` (a ValueError) with a one-line message: a missing file, a layout
this module does not read (DeepSpeed, FSDP, sharded), a state that is not Adam's, or a state that
does not match the model.
"""
from __future__ import annotations

import dataclasses
import math
import re
from pathlib import Path

import torch

OPTIMIZER_FILE = "optimizer.pt"  # transformers.trainer.OPTIMIZER_NAME


class OptimizerStateError(ValueError):
    """The optimiser state cannot be read or does not match the model (one-line message)."""


@dataclasses.dataclass
class AdamState:
    """Adam(W) state per named parameter (the order of the optimiser's groups).

    exp_avg / exp_avg_sq: tensors shaped like the parameter; step: Adam steps taken so far (t);
    betas, eps, lr, weight_decay: from the parameter's group (lr as last set by the scheduler).
    """

    names: list[str]
    exp_avg: dict[str, torch.Tensor]
    exp_avg_sq: dict[str, torch.Tensor]
    step: dict[str, float]
    betas: dict[str, tuple[float, float]]
    eps: dict[str, float]
    lr: dict[str, float]
    weight_decay: dict[str, float]
    source: str = "live optimiser"
    layout: str = "live"
    initial_lr: dict[str, float] = dataclasses.field(default_factory=dict)  # the scheduler's base lr, if saved

    def v_hat(self, name: str, dtype=torch.float64) -> torch.Tensor:
        """exp_avg_sq / (1 - beta2^step) (bias-corrected second moment)."""
        _, b2 = self.betas[name]
        return self.exp_avg_sq[name].to(dtype) / (1.0 - b2 ** self.step[name])

    def preconditioner(self, name: str, dtype=torch.float64) -> torch.Tensor:
        """P = 1 / (sqrt(v_hat) + eps), shaped like the parameter (torch.optim.Adam's denominator)."""
        return 1.0 / (self.v_hat(name, dtype).sqrt() + self.eps[name])

    def preconditioners(self, names=None, dtype=torch.float64) -> dict[str, torch.Tensor]:
        """{name: P} for `names` (default: every parameter of the state)."""
        names = self.names if names is None else names
        missing = [n for n in names if n not in self.exp_avg_sq]
        if missing:
            raise OptimizerStateError(f"the optimiser state has no entry for parameter {missing[0]!r} "
                                      f"({len(missing)} missing; measure the trainable parameters only)")
        return {n: self.preconditioner(n, dtype) for n in names}

    def describe(self) -> dict:
        """JSON-ready summary (the first parameter's hyperparameters and whether all agree)."""
        n0 = self.names[0]
        uniq = lambda d: len({repr(v) for v in d.values()}) == 1  # noqa: E731
        return {"source": self.source, "layout": self.layout, "n_parameters": len(self.names),
                "n_entries": int(sum(v.numel() for v in self.exp_avg_sq.values())),
                "step": self.step[n0], "betas": list(self.betas[n0]), "eps": self.eps[n0], "lr": self.lr[n0],
                "initial_lr": self.initial_lr.get(n0),
                "weight_decay": sorted({float(w) for w in self.weight_decay.values()}),
                "uniform": bool(uniq(self.step) and uniq(self.betas) and uniq(self.eps) and uniq(self.lr)),
                "preconditioner": "P = 1/(sqrt(exp_avg_sq / (1 - beta2^step)) + eps)"}


# ----------------------------------------------------------------------------------------------
# parameter order
# ----------------------------------------------------------------------------------------------
_NO_DECAY = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def decay_parameter_names(model) -> set[str]:
    """Names `Trainer.get_decay_parameter_names` gives weight decay (transformers' own helper)."""
    try:
        from transformers import Trainer
        return set(Trainer.get_decay_parameter_names(None, model))  # uses no instance state
    except Exception:  # a transformers whose method needs the instance: the same rule, by hand
        from transformers.trainer_pt_utils import get_parameter_names
        return set(get_parameter_names(model, [torch.nn.LayerNorm], _NO_DECAY))


def trainer_groups(model) -> list[list[str]]:
    """Parameter names of `Trainer.create_optimizer`'s two groups, in the optimiser's order."""
    decay = decay_parameter_names(model)
    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [[n for n, _ in named if n in decay], [n for n, _ in named if n not in decay]]


# ----------------------------------------------------------------------------------------------
# reading
# ----------------------------------------------------------------------------------------------
def _float(x) -> float:
    return float(x.item() if torch.is_tensor(x) else x)


def from_state_dict(sd, model, *, source: str = "state dict") -> AdamState:
    """Map an Adam(W) `optimizer.state_dict()` to the model's named parameters (see the module doc)."""
    if not isinstance(sd, dict) or "state" not in sd or "param_groups" not in sd:
        keys = list(sd)[:5] if isinstance(sd, dict) else type(sd).__name__
        raise OptimizerStateError(f"{source}: unknown optimiser layout (expected a torch optimizer state_dict "
                                  f"with 'state' and 'param_groups', got {keys})")
    groups = sd["param_groups"]
    named = dict(model.named_parameters())
    sizes = [len(g.get("params", [])) for g in groups]
    if len(groups) == 2:
        order, layout = trainer_groups(model), "transformers.Trainer (decay, no-decay)"
    elif len(groups) == 1:
        order, layout = [[n for n, p in model.named_parameters() if p.requires_grad]], "one group"
    else:
        raise OptimizerStateError(f"{source}: unknown optimiser layout ({len(groups)} parameter groups; this "
                                  "reads transformers.Trainer's two groups or a single group)")
    if [len(o) for o in order] != sizes:
        raise OptimizerStateError(
            f"{source}: the optimiser holds {sum(sizes)} parameter tensors in groups of {sizes}, the model has "
            f"{sum(len(o) for o in order)} trainable ones in groups of {[len(o) for o in order]} "
            "(another model, or other trainable parameters, e.g. LoRA?)")
    st = AdamState([], {}, {}, {}, {}, {}, {}, {}, source=source, layout=layout)
    for g, names in zip(groups, order):
        if g.get("amsgrad") or g.get("maximize"):
            raise OptimizerStateError(f"{source}: amsgrad/maximize Adam states are not supported")
        if "betas" not in g or "eps" not in g:
            raise OptimizerStateError(f"{source}: not an Adam optimiser (group keys {sorted(k for k in g if k != 'params')})")
        b1, b2 = (_float(b) for b in g["betas"])
        for idx, name in zip(g["params"], names):
            s = sd["state"].get(idx)
            if s is None:
                raise OptimizerStateError(f"{source}: no state for parameter {name!r} (never stepped?)")
            if "exp_avg_sq" not in s or "exp_avg" not in s or "step" not in s:
                raise OptimizerStateError(f"{source}: not an Adam state (keys {sorted(s)} for {name!r})")
            p = named[name]
            if tuple(s["exp_avg_sq"].shape) != tuple(p.shape) or tuple(s["exp_avg"].shape) != tuple(p.shape):
                raise OptimizerStateError(f"{source}: state of {name!r} has shape {tuple(s['exp_avg_sq'].shape)}, "
                                          f"the parameter {tuple(p.shape)} (another model?)")
            step = _float(s["step"])
            if not step >= 1 or not math.isfinite(step):
                raise OptimizerStateError(f"{source}: parameter {name!r} has step {step} (needs >= 1)")
            st.names.append(name)
            st.exp_avg[name] = s["exp_avg"].detach()
            st.exp_avg_sq[name] = s["exp_avg_sq"].detach()
            st.step[name] = step
            st.betas[name] = (b1, b2)
            st.eps[name] = _float(g["eps"])
            st.lr[name] = _float(g.get("lr", float("nan")))
            st.weight_decay[name] = _float(g.get("weight_decay", 0.0))
            if "initial_lr" in g:
                st.initial_lr[name] = _float(g["initial_lr"])
    if not st.names:
        raise OptimizerStateError(f"{source}: the optimiser state holds no parameter")
    return st


def from_optimizer(optimizer, model, *, copy: bool = True) -> AdamState:
    """The state of a live `torch.optim.Adam`/`AdamW` (e.g. `trainer.optimizer`; accelerate's
    wrapper is unwrapped) mapped to `model`'s names by identity of the parameter tensors.

    copy=True snapshots the moments (the optimiser updates its tensors in place at its next step);
    copy=False shares them (no extra memory; use the state before the optimiser steps again)."""
    opt = getattr(optimizer, "optimizer", optimizer)  # accelerate's AcceleratedOptimizer
    if not isinstance(opt, torch.optim.Adam):
        raise OptimizerStateError(f"live optimiser: {type(opt).__name__} is not torch.optim.Adam/AdamW")
    names = {p: n for n, p in model.named_parameters()}
    st = AdamState([], {}, {}, {}, {}, {}, {}, {}, source="live optimiser", layout="live")
    for g in opt.param_groups:
        if g.get("amsgrad") or g.get("maximize"):
            raise OptimizerStateError("live optimiser: amsgrad/maximize Adam states are not supported")
        for p in g["params"]:
            if p not in names:
                raise OptimizerStateError("live optimiser: holds a parameter that is not the model's")
            s = opt.state.get(p)
            if not s or "exp_avg_sq" not in s:
                continue  # not stepped yet (no gradient so far): no preconditioner for it
            n = names[p]
            st.names.append(n)
            st.exp_avg[n] = s["exp_avg"].detach().clone() if copy else s["exp_avg"].detach()
            st.exp_avg_sq[n] = s["exp_avg_sq"].detach().clone() if copy else s["exp_avg_sq"].detach()
            st.step[n] = _float(s["step"])
            st.betas[n] = tuple(_float(b) for b in g["betas"])
            st.eps[n] = _float(g["eps"])
            st.lr[n] = _float(g["lr"])
            st.weight_decay[n] = _float(g.get("weight_decay", 0.0))
            if "initial_lr" in g:
                st.initial_lr[n] = _float(g["initial_lr"])
    if not st.names:
        raise OptimizerStateError("live optimiser: no parameter has an Adam state yet (take a step first)")
    return st


def load_optimizer_state(path, model) -> AdamState:
    """Read a checkpoint folder's `optimizer.pt` (or the file itself) and map it to `model`'s names.

    The model must have the same trainable parameters as the one that was trained (e.g. the same
    LoRA adapters), so that the checkpoint's parameter order can be matched; shapes are verified.
    """
    path = Path(path)
    if path.is_dir():
        f = path / OPTIMIZER_FILE
        if not f.is_file():
            if any(path.glob("global_step*")):
                raise OptimizerStateError(f"{path}: a DeepSpeed checkpoint (global_step*/); its sharded optimiser "
                                          "state is not read here (save with the plain Trainer or pass the live optimiser)")
            if any(path.glob("optimizer_*")) or any(path.glob(f"{OPTIMIZER_FILE}_*")) or any(path.glob("rank*-of-*")):
                raise OptimizerStateError(f"{path}: a sharded (FSDP / XLA / model-parallel) optimiser state; "
                                          "not read here")
            raise OptimizerStateError(f"{path}: no {OPTIMIZER_FILE} (a checkpoint folder written by "
                                      "transformers.Trainer, e.g. out/checkpoint-500)")
    elif path.is_file():
        f = path
    else:
        raise OptimizerStateError(f"optimizer state not found: {path}")
    try:
        sd = torch.load(f, map_location="cpu", weights_only=True)
    except Exception as e:  # pickle errors, truncated files, non-tensor payloads
        msg = re.sub(r"\s+", " ", str(e)).strip()[:160]
        raise OptimizerStateError(f"{f}: cannot read the optimiser state ({type(e).__name__}: {msg})") from None
    name = path.name if path.is_dir() else f"{path.parent.name}/{path.name}"
    return from_state_dict(sd, model, source=name)
