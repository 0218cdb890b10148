"""Mitigations of gradient entanglement and the geometry of preconditioned / batched updates
(docs/theory.md §8 R19, R20).

Every method's plain-gradient update direction lies in the span of (effective) response gradients:

    -grad L = J~^T c,   c = [a; -b] in R^{2B},   J~ [2B, P] rows g~_w,i then g~_l,i

so every method is a plug-in of the one trainer step `train.make_step` (`mitigation_plugin`: token
weights = the masks, an extra loss term, an update transformation = the normalisation, mask
parameters as trained state) and `train_mitigation` records, per step and pair, with J [2B, P] the
FULL response gradients (rows g_w,i then g_l,i):

    G_ww, G_wl, G_ll         own-pair Gram of the full gradients                     (R3)
    Ge_ww, Ge_wl, Ge_ll      own-pair Gram of the effective gradients g~ (masked for R20)
    pair_pred_*              one-pair SGD theory:  eta (a_i <g_*,i, g~_w,i> - b_i <g_*,i, g~_l,i>)
    batch_pred_*             batch theory:        eta J J~^T c     (2B x 2B Gram, cross-pair terms)
    pc_pair_pred_*, pc_batch_pred_*   the same with the diagonal preconditioner P of the optimizer
                             state (Adam: 1/(sqrt(v_hat)+eps)); zeros for SGD.
    lin_*                    J . (actual update), first order of the real step (any optimizer)
    real_*                   realised change l(theta_{t+1}) - l(theta_t)

Methods (`METHODS`):

    baseline          the registered loss itself (e.g. DPO = 'sigmoid')
    normalized        R19 pairwise normalized PO: -grad = sum_i w_i s_i (g_w/|g_w| - g_l/|g_l|),
                      implemented as the surrogate  -sum_i w_i s_i (l_w,i / sg|g_w,i| - l_l,i / sg|g_l,i|)
                      (sg = stop_gradient; norms from the per-example Jacobian). Why a surrogate: it
                      is an ordinary differentiable loss, so it composes with every optax optimizer
                      (Adam then sees the normalized gradient, exactly what a user would run) and with
                      every policy, and jax.grad of it is checked against the formula in the tests.
                      s_i = -m'(z_i) = d_l / h'_l for margin-form losses (h'_l = -dz/dl_l; the NLL of
                      CPO-style losses sits on the chosen side only), (d_w + d_l)/2 otherwise; or 1.
    normalized_sq     counterexample variant g/|g|^2 (no guarantee; theory §8.1)
    normalized_batch  per-batch normalisation (theory §11.5): eta s_bar (u_w/|u_w| - u_l/|u_l|),
                      u_* = sum_i w_i s_i g_*,i; guarantees only the batch aggregate
    oracle_mask       R20 with m_t = 1 on tokens that differ between chosen and rejected, 0 elsewhere
    learned_mask      R20 with free per-token masks m = sigmoid(u), l1 penalty lambda sum m (SGD on u)
    feature_mask      R20 with m_t = sigmoid(v . h_t + c) from the hidden state h_t predicting token t
                      (theory §8.2; h_t stop-gradient, from `build_setting(..., with_features=True)`)
    dpop              comparator: DPOP loss (lambda_p = dpop_lambda) instead of the configured loss
    nll               comparator: configured loss + alpha * NLL(chosen) token mean (RPO / CPO style)

Per-pair losses are combined with weights w_i (1/b on the b pairs of the step's minibatch, 0
elsewhere), which is TRL's batch mean for every non batch-coupled loss; batch-coupled ones (aot,
sft, token-mean NLL totals) use the same per-pair mean form here.

Example:
    >>> import jax
    >>> from entangle_sim import data
    >>> gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 8, K=6, target_cos=0.9, norm_ratio=2.0)
    >>> cfg = MitigationConfig(method="normalized", lr=0.05, steps=30)
    >>> rec = train_mitigation(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(1))
    >>> float(summarize(rec)["pair_pred_ideal_fraction"])   # one-pair first order always ideal (R19)
    1.0
    >>> float(summarize(rec)["ideal_fraction"])   # the 8 pairs share parameters: cross-pair terms decide
    0.0
    >>> rec = train_per_pair(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(1))   # each pair alone

Comparison (`run_comparison`, CLI `entangle-sim mitigate`): every setting gets one lr per optimizer from
`calibrate_lr` (baseline's first step moves log-probs by 0.05 on average), shared by all methods;
instability of a method at that lr (DPOP) is reported in the 'diverged' / 'max_step_change' columns.

Modules: `config` (METHODS, MitigationConfig, MitigationRecord), `precondition` (oracle masks, Adam
preconditioner, batch-level first order; the Grams themselves are `geometry`'s), `trainer`
(mitigation_plugin, make_mitigation_step, train_mitigation, train_per_pair, timed_run,
calibrate_lr), `summary`,
`comparison` (settings, run_comparison, mask_sweep, format_table, run_with_mitigation, simulation_summary).
"""
from __future__ import annotations

from .config import (METHODS, JACOBIAN_METHODS, MASK_METHODS, MitigationConfig, MitigationRecord)  # noqa: F401
from .precondition import (oracle_masks, adam_preconditioner, preconditioned_gram, batch_gram,  # noqa: F401
                           batch_first_order, one_pair_first_order)
from .trainer import (mitigation_plugin, make_mitigation_step, train_mitigation, train_per_pair, timed_run, calibrate_lr)  # noqa: F401
from .summary import (summarize)  # noqa: F401
from .comparison import (SETTINGS, LR_TARGET, build_setting, COMPARISON_METHODS, run_comparison, mask_sweep,  # noqa: F401
                         TABLE_COLUMNS, format_table, run_with_mitigation, simulation_summary)
