"""The mitigation methods and the configuration / records of one mitigation run."""
from __future__ import annotations

import dataclasses
from typing import NamedTuple


from ..train import TrainConfig
from ..types import Array


METHODS = ("baseline", "normalized", "normalized_sq", "normalized_batch", "oracle_mask", "learned_mask",
           "feature_mask", "dpop", "nll")


JACOBIAN_METHODS = ("normalized", "normalized_sq", "normalized_batch")


MASK_METHODS = ("oracle_mask", "learned_mask", "feature_mask")


# The TrainConfig fields a MitigationConfig also takes as keywords (and reads back as properties).
TRAIN_FIELDS = ("loss", "loss_params", "optimizer", "lr", "steps", "batch_size", "momentum", "weight_decay",
                "record")


@dataclasses.dataclass(frozen=True, init=False)
class MitigationConfig:
    """One mitigation run (frozen, hashable): a mitigation method on top of a `TrainConfig`.

    method: one of METHODS. train: the run's TrainConfig (loss, loss_params, optimizer, lr, steps,
    batch_size, record, ...); each of its fields is also a keyword of the constructor and a property,
    e.g. MitigationConfig(method="nll", lr=0.05).lr == 0.05 (record: per-step Jacobians / Grams /
    predictions; False: log-probs only, for timing).
    weight: 'step' (s = -m'(z)) or 'unit' (s = 1) for the normalized methods.
    nll_alpha: NLL weight of method 'nll'. dpop_lambda: lambda_p of method 'dpop'.
    mask_l1, mask_lr, mask_init: l1 weight, SGD step on mask logits u, initial u (learned_mask);
    feature_lr: SGD step on (v, c) of feature_mask (m_t = sigmoid(v . h_t + c); same mask_l1, mask_init).
    """

    method: str = "baseline"
    train: TrainConfig = TrainConfig()
    weight: str = "step"
    nll_alpha: float = 1.0
    dpop_lambda: float = 50.0
    # R20 learned-mask defaults, from the sweep on lastlayer-long (40 steps, calibrated lr, float64;
    # reproduce with `mask_sweep()`, which returns the grid rows). The l1 gradient on a mask logit is
    # w_i l1 sigmoid'(u) ~ (1/8)(0.01)(0.1) = 1e-4 per step, so mask_lr ~ 1e3 is what moves a logit by
    # O(1) in tens of steps; the old (l1 0.02, lr 5) moved it by ~1e-3 in total and the masks stayed at
    # sigmoid(2) = 0.88. Free masks: (0.01, 3000) is the only grid point where the mean mask on shared
    # tokens fell below 0.2 while the contrastive tokens kept a higher mask (0.22 vs 0.14); larger l1
    # kills the contrastive token too (its DPO pull is beta s |r_t| ~ 0.05 |r_t|). Feature mask: its
    # (v, c) gradient sums over all tokens and features, hence its own step; 3.0 gives shared 0.02 vs
    # contrastive 0.07, larger steps collapse every mask. Neither reaches the oracle (1 / 0) on
    # lastlayer-long; on transformer-long the same defaults give ~0.5 / ~0.0.
    mask_l1: float = 0.01
    mask_lr: float = 3000.0
    feature_lr: float = 3.0
    mask_init: float = 2.0

    def __init__(self, method: str = "baseline", train: TrainConfig | None = None, *, weight: str = "step",
                 nll_alpha: float = 1.0, dpop_lambda: float = 50.0, mask_l1: float = 0.01, mask_lr: float = 3000.0,
                 feature_lr: float = 3.0, mask_init: float = 2.0, **train_fields):
        unknown = set(train_fields) - set(TRAIN_FIELDS)
        if unknown:
            raise TypeError(f"MitigationConfig got unexpected keyword(s) {', '.join(sorted(unknown))}")
        # TrainConfig validates the shared fields (loss, optimizer, lr, steps, batch size, ...)
        train = dataclasses.replace(train or TrainConfig(), **train_fields) if train_fields else (train or TrainConfig())
        for name, value in dict(method=method, train=train, weight=weight, nll_alpha=nll_alpha,
                                dpop_lambda=dpop_lambda, mask_l1=mask_l1, mask_lr=mask_lr, feature_lr=feature_lr,
                                mask_init=mask_init).items():
            object.__setattr__(self, name, value)
        if self.method not in METHODS:
            raise ValueError(f"unknown mitigation {self.method!r}; valid: {', '.join(METHODS)}")
        if self.weight not in ("step", "unit"):
            raise ValueError(f"weight must be 'step' or 'unit', got {self.weight!r}")
        self.effective_train  # the effective loss's hyperparameters (DPOP's lambda) validated too
        if self.mask_l1 < 0 or self.mask_lr <= 0 or self.feature_lr <= 0 or self.nll_alpha < 0:
            raise ValueError("need mask_l1 >= 0, mask_lr > 0, feature_lr > 0, nll_alpha >= 0")

    loss = property(lambda self: self.train.loss, doc="TrainConfig.loss (the configured loss; see effective_loss)")
    loss_params = property(lambda self: self.train.loss_params, doc="TrainConfig.loss_params")
    optimizer = property(lambda self: self.train.optimizer, doc="TrainConfig.optimizer")
    lr = property(lambda self: self.train.lr, doc="TrainConfig.lr")
    steps = property(lambda self: self.train.steps, doc="TrainConfig.steps")
    batch_size = property(lambda self: self.train.batch_size, doc="TrainConfig.batch_size")
    momentum = property(lambda self: self.train.momentum, doc="TrainConfig.momentum")
    weight_decay = property(lambda self: self.train.weight_decay, doc="TrainConfig.weight_decay")
    record = property(lambda self: self.train.record, doc="TrainConfig.record")

    @property
    def effective_train(self) -> TrainConfig:
        """The trainer's configuration of this run: `train` with the effective loss (DPOP for 'dpop')."""
        return dataclasses.replace(self.train, loss=self.effective_loss, loss_params=self.effective_loss_params)

    @property
    def effective_loss(self) -> str:
        return "dpop" if self.method == "dpop" else self.loss

    @property
    def effective_loss_params(self) -> tuple:
        if self.method == "dpop":
            beta = dict(self.loss_params).get("beta", 0.1)
            return (("beta", beta), ("dpop_lambda", self.dpop_lambda))
        return self.loss_params

    @classmethod
    def from_train_config(cls, cfg: TrainConfig, method: str, **kw) -> "MitigationConfig":
        """The mitigation run of a TrainConfig (its loss, optimizer, lr, steps, batch size, ...)."""
        return cls(method=method, train=cfg, **kw)


class MitigationRecord(NamedTuple):
    """Per-step, per-pair records, each [S, B] (see module docstring); masks [S, B, T]."""

    chosen_logps: Array
    rejected_logps: Array
    loss: Array
    G_ww: Array
    G_wl: Array
    G_ll: Array
    Ge_ww: Array
    Ge_wl: Array
    Ge_ll: Array
    pair_pred_chosen: Array
    pair_pred_rejected: Array
    batch_pred_chosen: Array
    batch_pred_rejected: Array
    pc_pair_pred_chosen: Array
    pc_pair_pred_rejected: Array
    pc_batch_pred_chosen: Array
    pc_batch_pred_rejected: Array
    lin_chosen: Array
    lin_rejected: Array
    real_chosen: Array
    real_rejected: Array
    mask_w: Array
    mask_l: Array
