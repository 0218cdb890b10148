"""Registry of margin-based preference losses.

Every loss is written ONCE, as a builder `build(v, F, **hp)` over a math backend `F`:
with `F = JAX` it is the JAX per-pair loss, with `F = SYM` it is the SymPy expression that the
symbolic engine differentiates. One source of truth, two backends; the tests prove the SymPy
derivatives equal `jax.grad` and finite differences, and match reference formulas.

TRL equivalence: each entry with a `trl` equivalent follows the current TRL line (1.10-1.16;
`trl_version` says so) and is checked against TRL 1.16.0's own loss code (value and both
incentives, per pair and batch, float64). Changes from TRL 1.9 (not kept as variants): the
f-divergence score maps keep their constants (1 - e^-r, log 2 + log sigma(r),
(e^{(a-1)r} - 1)/(a-1)), which matter in the length-normalised `ipo` / `sigmoid_norm`;
`nca_pair`, `bco_pair`, `sppo_hard`, `apo_down` use raw log-ratios, and they, `aot`,
`aot_unpaired` and `apo_zero` refuse any f-divergence but reverse KL (TRL raises too). Every
path (JAX, traced JAX, SymPy) falls back to reverse KL when |a - 1| < 1e-6. Conventions: KTO
is a mean over rows in TRL (`reduction="row_mean"`; the default `pair_sum` is twice that);
ORPO's batch NLL is one token mean over all chosen prompt+completion tokens; TRL evaluates
alpha-divergence scores (it cannot run them in float64) and ORPO's odds ratio in float32, the
registry in the input dtype. TPO (`tpo*`): TRL's contrastive term; the gold-response NLL needs
a third response and is not modelled (see the TPO section).

Conventions (TRL): `chosen_logps` / `rejected_logps` are SUMMED completion log-probs `l_w`, `l_l`;
`ref_*` the reference model's; `chosen_len` / `rejected_len` the completion token counts `n_w`,
`n_l` (>= 1). A per-pair loss is the loss of a batch holding that pair alone; `LossSpec.batch`
gives TRL's total for a batch (the mean of per-pair losses, except the batch-coupled `aot`,
`aot_unpaired`, `sft` and the token-mean NLL terms of CPO/RRHF/`simpo`).

Example:
    >>> from entangle_sim import losses
    >>> dpo = losses.get("sigmoid")            # DPOTrainer:sigmoid, beta=0.1
    >>> float(dpo(-10.0, -12.0, -11.0, -11.0, beta=0.1))   # -log sigma(0.1 * 2)
    0.598138...

Modules: `base` (backends, `Hyper`, score maps), `spec` (`LossSpec`, `ResolvedLoss`), `registry`,
the built-in families `dpo`, `cpo` (with ORPO), `kto` (with TPO), `extra` (official code, DPO-Shift,
token-level modifiers) and `user` (`define`). Every public name is importable from here.

A loss is resolved once, `losses.get(name).bind(**hp)`, and then evaluated on a `PairState`:
    >>> from entangle_sim.types import PairState
    >>> dpo = losses.get("sigmoid").bind(beta=0.1)
    >>> round(float(dpo.loss(PairState.of(-10.0, -12.0, reference=(-11.0, -11.0)))), 6)
    0.598139
"""
from __future__ import annotations

from ..types import PairState  # noqa: F401 - the pair variables every ResolvedLoss method takes
from .base import (ALPHA_CLAMP, ALPHA_PO, CPO_ALPHA, EPS, F_DIVERGENCE_LOSSES, F_DIVERGENCES, FALPHA,  # noqa: F401
                   FDIV, FDIV_RKL, JAX, SYM, TRL_SEMANTICS, TRL_TESTED, Hyper, PairVars, score)
from .spec import LossSpec, Prediction, ResolvedLoss  # noqa: F401
from .registry import aliases, get, incentives, names, register, unregister  # noqa: F401
# the built-in losses, registered in this order (the order of `names()`)
from . import dpo, cpo, kto, extra  # noqa: F401,E402
from .dpo import DISCOPOP_TAU, EXO_EPS  # noqa: F401
from .cpo import SIMPO_GAMMA  # noqa: F401
from .kto import KTO_H, KTO_REDUCTION, TPO_GAMMA, TPO_NOTE  # noqa: F401
from .extra import SHIFT_LAMBDA, ld_logps, wpo_weight  # noqa: F401
from .user import LossDefinitionError, define, undefine, user_names  # noqa: F401
