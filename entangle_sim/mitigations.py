"""Mitigations of gradient entanglement and the geometry of preconditioned / batched updates
(docs/theory.md §8 R19, R20).

Every method's plain-gradient update direction lies in the span of (effective) response gradients:

    -grad L = J~^T c,   c = [a; -b] in R^{2B},   J~ [2B, P] rows g~_w,i then g~_l,i

so one trainer (`train_mitigation`) records, per step and pair, with J [2B, P] the FULL response
gradients (rows g_w,i then g_l,i):

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
"""
from __future__ import annotations

import dataclasses
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import geometry, losses, regimes
from .train import OPTIMIZERS, TrainConfig, make_optimizer
from .types import Array, PairBatch, Policy, PyTree

METHODS = ("baseline", "normalized", "normalized_sq", "normalized_batch", "oracle_mask", "learned_mask",
           "feature_mask", "dpop", "nll")
_JACOBIAN_METHODS = ("normalized", "normalized_sq", "normalized_batch")
_MASK_METHODS = ("oracle_mask", "learned_mask", "feature_mask")


@dataclasses.dataclass(frozen=True)
class MitigationConfig:
    """One mitigation run (frozen, hashable).

    method: one of METHODS. loss / loss_params / optimizer / lr / steps / batch_size: as TrainConfig.
    weight: 'step' (s = -m'(z)) or 'unit' (s = 1) for the normalized methods.
    nll_alpha: NLL weight of method 'nll'. dpop_lambda: lambda_p of method 'dpop'.
    mask_l1, mask_lr, mask_init: l1 weight, SGD step on mask logits u, initial u (learned_mask);
    feature_lr: SGD step on (v, c) of feature_mask (m_t = sigmoid(v . h_t + c); same mask_l1, mask_init).
    record: per-step Jacobians / Grams / predictions (False: log-probs only, for timing).
    """

    method: str = "baseline"
    loss: str = "sigmoid"
    loss_params: tuple = ()
    optimizer: str = "sgd"
    lr: float = 0.1
    steps: int = 100
    batch_size: int = 0
    weight: str = "step"
    nll_alpha: float = 1.0
    dpop_lambda: float = 50.0
    # R20 learned-mask defaults, from the sweep on lastlayer-long (40 steps, calibrated lr, float64;
    # reproduce with `mask_sweep()`; table in the issue-5 report). The l1 gradient on a mask logit is
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
    record: bool = True

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"unknown mitigation {self.method!r}; valid: {', '.join(METHODS)}")
        if self.weight not in ("step", "unit"):
            raise ValueError(f"weight must be 'step' or 'unit', got {self.weight!r}")
        TrainConfig(loss=self.effective_loss, loss_params=self.effective_loss_params, optimizer=self.optimizer,
                    lr=self.lr, steps=self.steps, batch_size=self.batch_size)  # validates the shared fields
        if self.mask_l1 < 0 or self.mask_lr <= 0 or self.feature_lr <= 0 or self.nll_alpha < 0:
            raise ValueError("need mask_l1 >= 0, mask_lr > 0, feature_lr > 0, nll_alpha >= 0")

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
        """The mitigation run matching a TrainConfig (loss, optimizer, lr, steps, batch size)."""
        return cls(method=method, loss=cfg.loss, loss_params=cfg.loss_params, optimizer=cfg.optimizer,
                   lr=cfg.lr, steps=cfg.steps, batch_size=cfg.batch_size, **kw)


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


# ----------------------------------------------------------------------------------------------
# masks (R20)
# ----------------------------------------------------------------------------------------------
@jax.jit
def oracle_masks(batch: PairBatch) -> tuple[Array, Array]:
    """R20 oracle masks (m_w [B, T_w], m_l [B, T_l]): 1 on real tokens that differ from the other
    response at the same position (or have no counterpart), 0 on shared tokens and padding.

    >>> from entangle_sim import data
    >>> m_w, m_l = oracle_masks(data.shared_suffix(jax.random.PRNGKey(0), 4, K=8, L=3))
    >>> m_w[0].tolist()
    [1.0, 0.0, 0.0, 0.0]
    """
    Tw, Tl = batch.chosen.shape[1], batch.rejected.shape[1]
    T = max(Tw, Tl)
    pad = lambda y, m: (jnp.pad(y, ((0, 0), (0, T - y.shape[1])), constant_values=-1),
                        jnp.pad(m, ((0, 0), (0, T - m.shape[1]))))
    yw, mw = pad(batch.chosen, batch.chosen_mask)
    yl, ml = pad(batch.rejected, batch.rejected_mask)
    same = (yw == yl) & (mw > 0) & (ml > 0)
    return (jnp.where(same, 0.0, mw)[:, :Tw].astype(batch.chosen_mask.dtype),
            jnp.where(same, 0.0, ml)[:, :Tl].astype(batch.rejected_mask.dtype))


# ----------------------------------------------------------------------------------------------
# preconditioned geometry
# ----------------------------------------------------------------------------------------------
def _find_adam_state(opt_state):
    found = []

    def visit(x):
        if isinstance(x, optax.ScaleByAdamState):
            found.append(x)
            return
        if isinstance(x, (tuple, list)):
            for y in x:
                visit(y)
        elif hasattr(x, "_fields"):
            for y in x:
                visit(y)
        elif isinstance(x, dict):
            for y in x.values():
                visit(y)

    visit(opt_state)
    return found[0] if found else None


def adam_preconditioner(opt_state, eps: float | None = None, *, b2: float | None = None) -> PyTree:
    """Diagonal preconditioner P = 1 / (sqrt(nu_hat) + eps) of an optax Adam/AdamW state (a pytree
    like params). nu_hat = nu / (1 - b2^count) is the bias-corrected second moment.

    Adam's update is -lr * mu_hat * P, so with mu_hat -> grad (b1 = 0 or the first step) it is the
    preconditioned step delta_theta = -lr P grad L of the preconditioning extension. eps / b2 default to the
    values stored by `optax.inject_hyperparams` (else 1e-8 / 0.999). Sign descent is the limit
    nu = grad^2, eps -> 0 (P = 1/|grad|).

    >>> P = adam_preconditioner(opt_state)  # doctest: +SKIP
    """
    st = _find_adam_state(opt_state)
    if st is None:
        raise ValueError("no optax ScaleByAdamState found in opt_state (use optimizer 'adam' or 'adamw')")
    hyper = getattr(opt_state, "hyperparams", {}) or {}
    eps = hyper.get("eps", 1e-8) if eps is None else eps
    b2 = hyper.get("b2", 0.999) if b2 is None else b2
    count = jnp.maximum(st.count, 1)
    corr = 1.0 - jnp.asarray(b2, jnp.result_type(float)) ** count
    return jax.tree.map(lambda nu: 1.0 / (jnp.sqrt(nu / corr) + eps), st.nu)


# The Grams themselves live in geometry (one implementation); re-exported here for callers of the
# mitigation API.
preconditioned_gram = geometry.preconditioned_gram
batch_gram = geometry.batch_gram


def batch_first_order(G: Array, dL_dl: Array, eta) -> Array:
    """delta_l [2B] = -eta G dL/dl (batch-level first order; G from `batch_gram`)."""
    return -eta * G @ dL_dl


def one_pair_first_order(G: Array, dL_dl: Array, eta) -> Array:
    """The per-pair theory: the same product with every cross-pair block of G zeroed."""
    B = G.shape[0] // 2
    pair = jnp.concatenate([jnp.arange(B), jnp.arange(B)])
    return -eta * jnp.where(pair[:, None] == pair[None, :], G, 0.0) @ dL_dl


# ----------------------------------------------------------------------------------------------
# the trainer
# ----------------------------------------------------------------------------------------------
def _step_weight(spec, hp, lw, ll, rw, rl, nw, nl, d_w, d_l):
    """s_i = -m'(z_i) = d_l / h'_l (margin-form losses), else (d_w + d_l) / 2."""
    if spec.margin is None:
        return 0.5 * (d_w + d_l)

    def z(a, c):
        v = losses.PairVars(chosen_logps=a, rejected_logps=c, ref_chosen_logps=rw, ref_rejected_logps=rl,
                            chosen_len=nw, rejected_len=nl, prompt_logps=jnp.zeros_like(a),
                            prompt_len=jnp.zeros_like(a))
        return spec.margin(v, losses.JAX, **hp).sum()

    hl = -jax.grad(z, argnums=1)(lw, ll)
    return jnp.where(hl != 0, d_l / jnp.where(hl != 0, hl, 1.0), 0.5 * (d_w + d_l))


def _precond_vector(cfg: MitigationConfig, opt_state, P: int, dtype):
    if cfg.optimizer in ("adam", "adamw"):
        return ravel_pytree(adam_preconditioner(opt_state))[0]
    return jnp.ones((P,), dtype)


def make_mitigation_step(policy: Policy, params0: PyTree, batch: PairBatch, cfg: MitigationConfig,
                         features=None):
    """(init_state, step): step(state, key) -> (state, MitigationRecord row). State = (theta_flat,
    mask parameters, opt_state); mask parameters = logits (u_w [B,T_w], u_l [B,T_l]) for the free masks,
    (v [D], c) for 'feature_mask' (needs `features(params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D])`,
    e.g. `setting_features`). See module docstring for the records."""
    spec = losses.get(cfg.effective_loss)
    hp = spec.resolve(**dict(cfg.effective_loss_params))
    B = batch.size
    b = B if cfg.batch_size in (0, None) or cfg.batch_size >= B else cfg.batch_size
    nw, nl = batch.chosen_len, batch.rejected_len
    theta0, unravel = ravel_pytree(params0)
    n_par = theta0.shape[0]
    dtype = theta0.dtype
    tok = lambda th: policy.token_logps(unravel(th), batch)
    ref_tw, ref_tl = jax.lax.stop_gradient(tok(theta0))
    om_w, om_l = oracle_masks(batch)
    opt = make_optimizer(cfg.optimizer, cfg.lr)
    method = cfg.method
    learned = method == "learned_mask"
    feature = method == "feature_mask"
    trains_mask = learned or feature

    if feature and features is None:
        raise ValueError("method 'feature_mask' needs features(params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D])")

    def masks(mp, th):
        if method == "oracle_mask":
            return om_w, om_l
        if learned:
            return jax.nn.sigmoid(mp[0]) * batch.chosen_mask, jax.nn.sigmoid(mp[1]) * batch.rejected_mask
        if feature:  # m_t = sigmoid(v . h_t + c), h_t the token's hidden state (stop-gradient: the mask gates)
            h_w, h_l = jax.lax.stop_gradient(features(unravel(th), batch))
            v, c0 = mp
            return (jax.nn.sigmoid(h_w @ v + c0) * batch.chosen_mask,
                    jax.nn.sigmoid(h_l @ v + c0) * batch.rejected_mask)
        return batch.chosen_mask, batch.rejected_mask

    def eff_logps(th, m_w, m_l):
        tw, tl = tok(th)
        return (m_w * tw).sum(-1), (m_l * tl).sum(-1)

    def per_pair(lw, ll, m_w, m_l):
        rw, rl = (m_w * ref_tw).sum(-1), (m_l * ref_tl).sum(-1)
        L = spec(lw, ll, rw, rl, nw, nl, **hp)
        if method == "nll":
            L = L + cfg.nll_alpha * (-lw / nw)
        return L, rw, rl

    def objective(th, mp, w, th_mask):
        m_w, m_l = masks(mp, th_mask)
        lw, ll = eff_logps(th, m_w, m_l)
        L = (w * per_pair(lw, ll, m_w, m_l)[0]).sum()
        if trains_mask:
            L = L + cfg.mask_l1 * (w * (m_w.sum(-1) + m_l.sum(-1))).sum()
        return L

    def coefficients(lw_e, ll_e, m_w, m_l, w, Je):
        """(a, b) with -grad_theta = sum_i a_i g~_w,i - b_i g~_l,i (and, for the normalized methods,
        the stop-gradient weights of the surrogate)."""
        gw, gl = jax.grad(lambda x, y: per_pair(x, y, m_w, m_l)[0].sum(), argnums=(0, 1))(lw_e, ll_e)
        d_w, d_l = -gw, gl
        if method not in _JACOBIAN_METHODS:
            return w * d_w, w * d_l
        _, rw, rl = per_pair(lw_e, ll_e, m_w, m_l)
        s = jnp.ones_like(d_w) if cfg.weight == "unit" else _step_weight(spec, hp, lw_e, ll_e, rw, rl, nw, nl, d_w, d_l)
        tiny = jnp.finfo(dtype).tiny
        Jw, Jl = Je[:B], Je[B:]
        sq_w, sq_l = (Jw * Jw).sum(1), (Jl * Jl).sum(1)
        if method == "normalized":
            return w * s / jnp.sqrt(jnp.maximum(sq_w, tiny)), w * s / jnp.sqrt(jnp.maximum(sq_l, tiny))
        if method == "normalized_sq":
            return w * s / jnp.maximum(sq_w, tiny), w * s / jnp.maximum(sq_l, tiny)
        # normalized_batch
        u_w, u_l = Jw.T @ (w * s), Jl.T @ (w * s)
        s_bar = (w * s).sum()
        return (s_bar * w * s / jnp.maximum(jnp.linalg.norm(u_w), tiny),
                s_bar * w * s / jnp.maximum(jnp.linalg.norm(u_l), tiny))

    def jac(th, m_w, m_l):
        return geometry.response_jacobian(lambda t, _: eff_logps(t, m_w, m_l), th, batch)

    def init_state():
        Tw, Tl = batch.chosen.shape[1], batch.rejected.shape[1]
        if feature:   # v = 0, c = mask_init: starts at the same mask sigmoid(mask_init) as the free masks
            D = jax.eval_shape(lambda: features(params0, batch))[0].shape[-1]
            mp = (jnp.zeros((D,), dtype), jnp.asarray(cfg.mask_init, dtype))
        else:
            mp = (jnp.full((B, Tw), cfg.mask_init, dtype), jnp.full((B, Tl), cfg.mask_init, dtype))
        return theta0, mp, opt.init(theta0)

    def step(state, key):
        th, mp, opt_state = state
        idx = jax.random.choice(key, B, (b,), replace=False) if b < B else jnp.arange(B)
        w = jnp.zeros((B,), dtype).at[idx].set(1.0 / b)
        m_w, m_l = jax.lax.stop_gradient(masks(mp, th))
        need_jac = cfg.record or method in _JACOBIAN_METHODS
        lw_e, ll_e = eff_logps(th, m_w, m_l)
        Je = jac(th, m_w, m_l) if need_jac else None
        if method in _JACOBIAN_METHODS:
            a, bb = jax.lax.stop_gradient(coefficients(lw_e, ll_e, m_w, m_l, w, Je))

            def surrogate(t):  # R19: -sum_i s_i (l_w / sg|g_w| - l_l / sg|g_l|) (weights folded into a, b)
                x, y = eff_logps(t, m_w, m_l)
                return -(a * x - bb * y).sum()

            g_th = jax.grad(surrogate)(th)
            g_mp = None
        else:
            g_th, g_mp = jax.grad(objective, argnums=(0, 1))(th, mp, w, th)
        updates, new_opt_state = opt.update(g_th, opt_state, th)
        th1 = optax.apply_updates(th, updates)
        if trains_mask:   # plain SGD on the mask parameters (logits u, or (v, c) of the feature mask)
            mlr = cfg.feature_lr if feature else cfg.mask_lr
            mp = jax.tree.map(lambda x, g: x - mlr * g, mp, g_mp)
        tw, tl = tok(th)
        lw, ll = tw.sum(-1), tl.sum(-1)
        tw1, tl1 = tok(th1)
        loss_val = per_pair(lw_e, ll_e, m_w, m_l)[0]
        zeros = jnp.zeros_like(lw)
        rec = dict(chosen_logps=lw, rejected_logps=ll, loss=loss_val, real_chosen=tw1.sum(-1) - lw,
                   real_rejected=tl1.sum(-1) - ll, mask_w=m_w, mask_l=m_l)
        if not cfg.record:
            rec.update({k: zeros for k in MitigationRecord._fields if k not in rec})
            return (th1, mp, new_opt_state), MitigationRecord(**rec)
        if method in _JACOBIAN_METHODS:
            a_c, b_c = a, bb
        else:
            a_c, b_c = jax.lax.stop_gradient(coefficients(lw_e, ll_e, m_w, m_l, w, Je))
        J = jac(th, jnp.ones_like(m_w) * batch.chosen_mask, jnp.ones_like(m_l) * batch.rejected_mask) \
            if method in _MASK_METHODS else Je
        c = jnp.concatenate([a_c, -b_c])
        eta = cfg.lr
        Pv = _precond_vector(cfg, new_opt_state, n_par, dtype)
        own = jnp.concatenate([jnp.arange(B), jnp.arange(B)])
        same = own[:, None] == own[None, :]
        out = {}
        for tag, G in (("", geometry.jacobian_batch_gram(J, Je)), ("pc_", geometry.jacobian_batch_gram(J, Je, Pv))):
            bp = eta * G @ c
            pp = eta * jnp.where(same, G, 0.0) @ c
            out[tag + "batch_pred_chosen"], out[tag + "batch_pred_rejected"] = bp[:B], bp[B:]
            out[tag + "pair_pred_chosen"], out[tag + "pair_pred_rejected"] = pp[:B], pp[B:]
        if cfg.optimizer not in ("adam", "adamw"):
            out.update({k: zeros for k in out if k.startswith("pc_")})
        full, eff = geometry.jacobian_pair_gram(J), geometry.jacobian_pair_gram(Je)
        lin = J @ updates
        rec.update(out, G_ww=full.G_ww, G_wl=full.G_wl, G_ll=full.G_ll,
                   Ge_ww=eff.G_ww, Ge_wl=eff.G_wl, Ge_ll=eff.G_ll, lin_chosen=lin[:B], lin_rejected=lin[B:])
        return (th1, mp, new_opt_state), MitigationRecord(**rec)

    return init_state, step


def train_mitigation(policy: Policy, params: PyTree, batch: PairBatch, cfg: MitigationConfig, key: Array,
                     features=None) -> MitigationRecord:
    """One run as a single `lax.scan` (jitted). Returns [S, B] records (masks [S, B, T]).

    Reference = the initial policy (r = 0 at step 0), as in `train.train`. features: see
    `make_mitigation_step` (only 'feature_mask' uses it).
    """
    return _compiled_run(policy, params, batch, cfg, features)(key)


def _compiled_run(policy, params, batch, cfg, features=None):
    init_state, step = make_mitigation_step(policy, params, batch, cfg, features)

    @jax.jit
    def run(key):
        state = init_state()
        _, rec = jax.lax.scan(step, state, jax.random.split(key, cfg.steps))
        return rec

    return run


def train_per_pair(policy: Policy, params: PyTree, batch: PairBatch, cfg: MitigationConfig, key: Array,
                   features=None) -> MitigationRecord:
    """Each pair trained ALONE from the same initial params (vmapped over pairs, one compilation):
    the setting of the one-pair theory (no cross-pair terms). Returns records [B, S, 1]."""
    def one(ex):
        sub = jax.tree.map(lambda x: x[None], ex)
        init_state, step = make_mitigation_step(policy, params, sub, cfg, features)
        return jax.lax.scan(step, init_state(), jax.random.split(key, cfg.steps))[1]

    return jax.jit(jax.vmap(one))(batch)


def timed_run(policy: Policy, params: PyTree, batch: PairBatch, cfg: MitigationConfig, key: Array,
              features=None, repeats: int = 1) -> tuple[MitigationRecord, float]:
    """(records, wall seconds per step of the compiled run, compile time excluded; the minimum over
    `repeats` executions, which is the least noisy estimate on shared cores)."""
    run = _compiled_run(policy, params, batch, cfg, features).lower(key).compile()
    best = float("inf")
    for _ in range(max(1, repeats)):
        t0 = time.perf_counter()
        rec = jax.block_until_ready(run(key))
        best = min(best, time.perf_counter() - t0)
    return rec, best / cfg.steps


def calibrate_lr(policy: Policy, params: PyTree, batch: PairBatch, *, optimizer: str = "sgd", target: float = 0.05,
                 loss: str = "sigmoid", loss_params: tuple = ()) -> float:
    """Step size rule of the comparison ('auto'): the lr at which the FIRST step of the plain loss
    (baseline DPO by default), to first order, changes the response log-probs by `target` on average:

        lr = target / mean_{i, y in {w, l}} |<g_y,i, u>|,   u = -grad L (sgd, momentum),
                                                            u = -sign(grad L) (adam/adamw: first step, eps -> 0)

    Why: the toy settings and the transformer have gradient scales that differ by orders of magnitude,
    so one lr is either negligible on one or explosive on another (the transformer at lr 0.5 moved
    log-probs by ~10 per step and DPOP overflowed). Calibrating on the BASELINE, once per (setting,
    optimizer), and giving every method that same lr keeps the comparison fair: a method that moves
    log-probs by far more per step than the baseline (DPOP, whose gradient is (1 + lambda_p) x larger
    once r_w < 0) shows that as instability in the table instead of being hidden by its own lr.
    target 0.05 puts a step at O(0.01-0.1) per log-prob (first order stays accurate; 40 steps move
    log-probs by O(1)).
    """
    spec = losses.get(loss)
    hp = spec.resolve(**dict(loss_params))
    flat, unravel = ravel_pytree(params)
    lp = lambda f: jnp.concatenate(policy.logps(unravel(f), batch))
    B = batch.size
    def L(f, ref):
        v = lp(f)
        return spec(v[:B], v[B:], ref[:B], ref[B:], batch.chosen_len, batch.rejected_len, **hp).mean()

    @jax.jit   # one compilation instead of many eager ones
    def first_step_scale(f):
        g = jax.grad(L)(f, jax.lax.stop_gradient(lp(f)))
        u = -jnp.sign(g) if optimizer in ("adam", "adamw") else -g
        return jnp.mean(jnp.abs(jax.jvp(lp, (f,), (u,))[1]))

    scale = float(first_step_scale(flat))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("calibrate_lr: the baseline's first step does not move the log-probs")
    return target / scale


# ----------------------------------------------------------------------------------------------
# summaries
# ----------------------------------------------------------------------------------------------
def _flip(a_w, a_l, b_w, b_l) -> np.ndarray:
    return regimes.classify(np.asarray(a_w), np.asarray(a_l)) != regimes.classify(np.asarray(b_w), np.asarray(b_l))


def _sign_agree(pw, pl, rw, rl, lw, ll) -> tuple[float, int]:
    eps = np.finfo(np.asarray(pw).dtype).eps
    agree = total = 0
    for p, r, lev in ((pw, rw, lw), (pl, rl, ll)):
        p, r = np.asarray(p), np.asarray(r)
        sel = np.abs(p) > 100 * eps * (1 + np.abs(np.asarray(lev)))
        agree += int((np.sign(p[sel]) == np.sign(r[sel])).sum())
        total += int(sel.sum())
    return (agree / total if total else float("nan")), total


def summarize(rec: MitigationRecord, batch: PairBatch | None = None) -> dict[str, Any]:
    """Plain-float statistics of one run ([S, B] records).

    ideal_fraction            realised (step, pair) changes with chosen up and rejected down
    delta_chosen/_rejected    mean over pairs of l(final) - l(initial)
    preference_accuracy       fraction of pairs with r_w > r_l at the end (TRL rewards/accuracies;
                              r = l - l_init; reference = initial policy)
    rho_first / rho_last, rho_eff_first / rho_eff_last     mean over pairs of rho (full / effective
                              gradients; R20 changes the effective one)
    pair_pred_ideal_fraction  one-pair SGD theory in the ideal regime (R19: 1.0)
    batch_vs_pair_flip        fraction of (step, pair) whose batch-level predicted regime differs
                              from the one-pair prediction (item 5)
    sgd_vs_precond_flip       fraction whose one-pair regime with P differs from the SGD one (item 4;
                              NaN without an Adam preconditioner)
    sign_agreement_lin / _batch_pred / _pc_batch_pred / _pc_pair_pred   realised vs predicted signs
    diverged                  some log-prob became non-finite or a single step moved one by > 50 nats
    max_step_change           max over (step, pair, response) of |realised one-step change| (finite ones)
    mask_fraction_last        mean final mask over all real tokens
    mask_on_oracle / mask_off_oracle   (with `batch`) mean final mask on the tokens the oracle keeps
                              (contrastive) / drops (shared); a mask is 'sparse like the oracle' when
                              off -> 0 while on stays large
    """
    t = jax.tree.map(np.asarray, rec)
    out: dict[str, Any] = {}
    steps_abs = np.abs(np.concatenate([t.real_chosen.ravel(), t.real_rejected.ravel()]))
    finite = bool(np.all(np.isfinite(steps_abs)) and np.all(np.isfinite(t.chosen_logps))
                  and np.all(np.isfinite(t.rejected_logps)))
    out["max_step_change"] = float(np.max(steps_abs[np.isfinite(steps_abs)])) if np.any(np.isfinite(steps_abs)) \
        else float("nan")
    out["diverged"] = bool(not finite or out["max_step_change"] > 50.0)
    codes = regimes.classify(t.real_chosen, t.real_rejected)
    out["ideal_fraction"] = float(np.mean(codes == regimes.CHOSEN_UP_REJECTED_DOWN))
    out["regime_fractions"] = regimes.fractions(codes)
    fw = t.chosen_logps[-1] + t.real_chosen[-1]
    fl = t.rejected_logps[-1] + t.real_rejected[-1]
    out["delta_chosen"] = float(np.mean(fw - t.chosen_logps[0]))
    out["delta_rejected"] = float(np.mean(fl - t.rejected_logps[0]))
    out["preference_accuracy"] = float(np.mean((fw - t.chosen_logps[0]) > (fl - t.rejected_logps[0])))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = np.maximum(t.G_wl / t.G_ww, t.G_wl / t.G_ll)
        rho_e = np.maximum(t.Ge_wl / t.Ge_ww, t.Ge_wl / t.Ge_ll)
    out["rho_first"], out["rho_last"] = float(np.nanmean(rho[0])), float(np.nanmean(rho[-1]))
    out["rho_eff_first"], out["rho_eff_last"] = float(np.nanmean(rho_e[0])), float(np.nanmean(rho_e[-1]))
    pp = regimes.classify(t.pair_pred_chosen, t.pair_pred_rejected)
    out["pair_pred_ideal_fraction"] = float(np.mean(pp == regimes.CHOSEN_UP_REJECTED_DOWN))
    out["batch_vs_pair_flip"] = float(np.mean(_flip(t.pair_pred_chosen, t.pair_pred_rejected,
                                                     t.batch_pred_chosen, t.batch_pred_rejected)))
    has_pc = bool(np.any(t.pc_pair_pred_chosen != 0))
    out["sgd_vs_precond_flip"] = float(np.mean(_flip(t.pair_pred_chosen, t.pair_pred_rejected, t.pc_pair_pred_chosen,
                                                      t.pc_pair_pred_rejected))) if has_pc else float("nan")
    for name, pw, pl in (("lin", t.lin_chosen, t.lin_rejected), ("batch_pred", t.batch_pred_chosen, t.batch_pred_rejected),
                         ("pair_pred", t.pair_pred_chosen, t.pair_pred_rejected),
                         ("pc_batch_pred", t.pc_batch_pred_chosen, t.pc_batch_pred_rejected),
                         ("pc_pair_pred", t.pc_pair_pred_chosen, t.pc_pair_pred_rejected)):
        if name.startswith("pc_") and not has_pc:
            out["sign_agreement_" + name] = float("nan")
            continue
        out["sign_agreement_" + name] = _sign_agree(pw, pl, t.real_chosen, t.real_rejected, t.chosen_logps,
                                                    t.rejected_logps)[0]
    if batch is not None:
        real = np.concatenate([np.asarray(batch.chosen_mask).ravel(), np.asarray(batch.rejected_mask).ravel()]) > 0
        om = np.concatenate([np.asarray(x).ravel() for x in oracle_masks(batch)]) > 0
        last = np.concatenate([t.mask_w[-1].ravel(), t.mask_l[-1].ravel()])
        out["mask_fraction_last"] = float(np.mean(last[real]))
        out["mask_on_oracle"] = float(np.mean(last[real & om])) if np.any(real & om) else float("nan")
        out["mask_off_oracle"] = float(np.mean(last[real & ~om])) if np.any(real & ~om) else float("nan")
    else:
        out["mask_fraction_last"] = float(np.mean(np.concatenate([t.mask_w[-1].ravel(), t.mask_l[-1].ravel()])))
    return out


# ----------------------------------------------------------------------------------------------
# settings and the comparison runner (item 6)
# ----------------------------------------------------------------------------------------------
SETTINGS = ("tabular", "linear", "lastlayer-1t", "lastlayer-short", "lastlayer-long", "transformer-long")
LR_TARGET = 0.05     # calibrate_lr target: mean first-step |Delta log-prob| of the baseline


def build_setting(name: str, key: Array, *, pairs: int = 8, sft_steps: int = 150, with_features: bool = False):
    """(policy, params, batch) of a comparison setting; with_features=True appends `features`
    (params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D]), the hidden state that predicts each response
    token (the h_t of theory §8.2's m_t = sigmoid(v . h_t)), or None where there is none (tabular, linear).

    tabular           softmax bandit, geometry pairs cos = -0.3, |g_l|/|g_w| = 1.5 (R15: always Case 1)
    linear            linear-softmax geometry pairs cos = 0.9, ratio 2 (R7: 'both down' under DPO)
    lastlayer-*       Setting A, K = 8, d = 8, prompt 2: '1t' (R15), shared suffix L = 4 / 16 (R17)
    transformer-long  tiny decoder (1 layer, d_model 32) on the sentiment task, long suffix (16),
                      after `sft_steps` Adam SFT steps on "prompt -> label word + suffix"
    """
    from . import data
    from .policies import lastlayer

    feats = None
    if name == "tabular":
        gp = data.geometry_pairs(key, "softmax", pairs, K=6, target_cos=-0.3, norm_ratio=1.5)
        out = gp.policy(), gp.params, gp.batch
    elif name == "linear":
        gp = data.geometry_pairs(key, "linear", pairs, K=6, target_cos=0.9, norm_ratio=2.0, d=4)
        out = gp.policy(), gp.params, gp.batch
    elif name.startswith("lastlayer-") and name.split("-", 1)[1] in ("1t", "short", "long"):
        k_data, k_init = jax.random.split(key)
        kind = name.split("-", 1)[1]
        if kind == "1t":
            batch = data.one_token(k_data, pairs, K=8, prompt_len=2)
        else:
            batch = data.shared_suffix(k_data, pairs, K=8, prompt_len=2, L=4 if kind == "short" else 16)
        lcfg = lastlayer.LastLayerConfig(K=8, d=8)
        pol = lastlayer.make(lcfg)
        out = pol, pol.init(k_init), batch

        def feats(p, bt):
            fp = lastlayer.features_and_probs(lcfg, p, bt)
            return fp.h_w, fp.h_l
    elif name == "transformer-long":
        *out, feats = _transformer_setting(key, pairs, sft_steps)
        out = tuple(out)
    else:
        raise ValueError(f"unknown setting {name!r}; valid: {', '.join(SETTINGS)}")
    return (*out, feats) if with_features else out


def _transformer_setting(key, pairs, sft_steps, mode="long"):
    from . import sentiment
    from .policies import transformer

    scfg = sentiment.SentimentConfig(mode=mode, prompt_len=6, short_len=4, long_len=16, n_pos_words=4,
                                     n_neg_words=4, n_neutral=8, n_suffix_vocab=12)
    tcfg = transformer.TransformerConfig(vocab=scfg.vocab_size, d_model=32, n_layers=1, n_heads=2,
                                         max_len=scfg.prompt_len + scfg.T)
    pol = transformer.make(tcfg)
    k_init, k_sft, k_pairs = jax.random.split(key, 3)
    params = pol.init(k_init)
    opt = optax.adam(3e-3)

    def sft_loss(p, k):
        d = sentiment.sft_data(scfg, k, 32)
        tok = jax.vmap(lambda x, y, m: transformer.sequence_token_logps(tcfg, p, x, y, m))(
            d.prompt, d.response, d.response_mask)
        return -tok.sum() / d.response_mask.sum()

    @jax.jit
    def sft(p):
        def body(carry, k):
            p, s = carry
            g = jax.grad(sft_loss)(p, k)
            u, s = opt.update(g, s, p)
            return (optax.apply_updates(p, u), s), None
        return jax.lax.scan(body, (p, opt.init(p)), jax.random.split(k_sft, sft_steps))[0][0]

    if sft_steps > 0:
        params = sft(params)

    def feats(p, bt):   # final (layer-normed) hidden state at the positions predicting each response token
        one = lambda x, y, m: transformer._apply(tcfg, p, x, y, m, None)[2]
        return (jax.vmap(one)(bt.prompt, bt.chosen, bt.chosen_mask),
                jax.vmap(one)(bt.prompt, bt.rejected, bt.rejected_mask))

    return pol, params, sentiment.preference_pairs(scfg, k_pairs, pairs), feats


COMPARISON_METHODS = ("baseline", "normalized", "normalized_batch", "oracle_mask", "learned_mask", "feature_mask",
                      "dpop", "nll")


def run_comparison(settings=SETTINGS, methods=COMPARISON_METHODS, *, steps: int = 40, pairs: int = 8,
                   seed: int = 0, optimizer: str = "sgd", lr: dict | float | None = None, loss: str = "sigmoid",
                   loss_params: tuple = (), sft_steps: int = 150, lr_target: float = LR_TARGET,
                   keep_records: bool = False, progress=None, **method_kw) -> dict[str, Any]:
    """Method x setting comparison. Returns {'rows': [...], 'records': {...}}; each row:
    setting, method, optimizer, lr, lr_rule, ideal_fraction, delta_chosen, delta_rejected,
    preference_accuracy, sec_per_step (compiled, recorded step; min of 2 runs), rho/rho_eff,
    batch_vs_pair_flip, sgd_vs_precond_flip, sign agreements, diverged, max_step_change, mask stats.

    lr: None = `calibrate_lr` per (setting, optimizer) on the baseline, shared by every method (the
    documented rule; instability of a method at that lr is reported, not tuned away); a float = that
    lr everywhere; a dict = per setting. method_kw go to every MitigationConfig (e.g. mask_l1).
    'feature_mask' on a setting without hidden states (tabular, linear) gives a row with note 'n/a'.
    """
    rows, recs = [], {}
    key = jax.random.PRNGKey(seed)
    for si, setting in enumerate(settings):
        pol, params, batch, feats = build_setting(setting, jax.random.fold_in(key, si), pairs=pairs,
                                                  sft_steps=sft_steps, with_features=True)
        if lr is None:
            eta, rule = calibrate_lr(pol, params, batch, optimizer=optimizer, target=lr_target, loss=loss,
                                     loss_params=loss_params), f"auto(target={lr_target:g})"
        elif isinstance(lr, (int, float)):
            eta, rule = float(lr), "fixed"
        else:
            eta, rule = float(lr[setting]), "per-setting"
        for method in methods:
            base = {"setting": setting, "method": method, "optimizer": optimizer, "lr": float(eta), "lr_rule": rule}
            if method == "feature_mask" and feats is None:
                rows.append({**base, "note": "n/a (no hidden states)"})
                if progress:
                    progress(rows[-1])
                continue
            cfg = MitigationConfig(method=method, loss=loss, loss_params=loss_params, optimizer=optimizer,
                                   lr=float(eta), steps=steps, **method_kw)
            rec, sec = timed_run(pol, params, batch, cfg, jax.random.fold_in(key, 1000 + si), feats, repeats=2)
            s = summarize(rec, batch)
            row = {**base, "sec_per_step": sec, **{k: v for k, v in s.items() if k != "regime_fractions"}}
            rows.append(row)
            if keep_records:
                recs[(setting, method)] = jax.tree.map(np.asarray, rec)
            if progress:
                progress(row)
    return {"rows": rows, "records": recs}


def mask_sweep(setting: str = "lastlayer-long", methods=("learned_mask", "feature_mask"), *,
               grid=None, steps: int = 40, pairs: int = 8, seed: int = 0, progress=None) -> list[dict]:
    """The R20 mask sweep behind the MitigationConfig defaults: for each method and (mask_l1, step) in
    `grid[method]` one run on `setting` at the calibrated lr (same keys as `run_comparison`), plus the
    baseline and oracle rows. Rows: method, mask_l1, mask_step, mask_on_oracle, mask_off_oracle,
    ideal_fraction, delta_chosen, delta_rejected, preference_accuracy, rho_eff_last."""
    grid = grid or {"learned_mask": [(l1, lr) for l1 in (0.003, 0.01, 0.03, 0.1) for lr in (100.0, 1000.0, 3000.0)],
                    "feature_mask": [(l1, lr) for l1 in (0.001, 0.003, 0.01, 0.03) for lr in (0.3, 1.0, 3.0)]}
    si = SETTINGS.index(setting)
    key = jax.random.PRNGKey(seed)
    pol, params, batch, feats = build_setting(setting, jax.random.fold_in(key, si), pairs=pairs, with_features=True)
    eta = calibrate_lr(pol, params, batch)
    runs = [("baseline", None, None), ("oracle_mask", None, None)]
    runs += [(m, l1, lr) for m in methods for l1, lr in grid[m]]
    rows = []
    for m, l1, lr in runs:
        kw = {} if l1 is None else {"mask_l1": l1, ("feature_lr" if m == "feature_mask" else "mask_lr"): lr}
        rec = train_mitigation(pol, params, batch, MitigationConfig(method=m, lr=eta, steps=steps, **kw),
                               jax.random.fold_in(key, 1000 + si), feats)
        s = summarize(rec, batch)
        row = {"setting": setting, "method": m, "mask_l1": l1, "mask_step": lr, "lr": eta,
               **{k: s[k] for k in ("mask_on_oracle", "mask_off_oracle", "ideal_fraction", "delta_chosen",
                                    "delta_rejected", "preference_accuracy", "rho_eff_last")}}
        rows.append(row)
        if progress:
            progress(row)
    return rows


TABLE_COLUMNS = (("setting", "{}"), ("method", "{}"), ("optimizer", "{}"), ("lr", "{:.3g}"),
                 ("ideal_fraction", "{:.3f}"), ("delta_chosen", "{:+.3f}"), ("delta_rejected", "{:+.3f}"),
                 ("preference_accuracy", "{:.2f}"), ("sec_per_step", "{:.2e}"), ("rho_first", "{:.2f}"),
                 ("rho_eff_first", "{:.2f}"), ("rho_eff_last", "{:.2f}"), ("batch_vs_pair_flip", "{:.3f}"),
                 ("sgd_vs_precond_flip", "{:.3f}"), ("sign_agreement_pc_pair_pred", "{:.3f}"),
                 ("diverged", "{}"), ("max_step_change", "{:.3g}"), ("mask_on_oracle", "{:.2f}"),
                 ("mask_off_oracle", "{:.2f}"), ("note", "{}"))


def format_table(rows, columns=TABLE_COLUMNS) -> str:
    """Markdown table of comparison rows."""
    head = "| " + " | ".join(c for c, _ in columns) + " |"
    sep = "|" + "|".join("---" for _ in columns) + "|"
    body = ["| " + " | ".join(f.format(r[c]) if r.get(c) is not None else "" for c, f in columns) + " |"
            for r in rows]
    return "\n".join([head, sep, *body])


def run_with_mitigation(policy: Policy, params: PyTree, batch: PairBatch, cfg: TrainConfig, mitigation: str,
                        key: Array, **kw) -> tuple[MitigationRecord, dict[str, Any]]:
    """Hook for `entangle-sim simulate --mitigation NAME`: run `cfg` (loss, optimizer, lr, steps,
    batch size) with a mitigation and return (records [S, B], summary dict). mitigation 'none' or
    'baseline' is the plain loss; kw go to MitigationConfig (weight, nll_alpha, mask_l1, ...).

    >>> rec, summary = run_with_mitigation(pol, params, batch, TrainConfig(lr=0.05, steps=50), "normalized", key)  # doctest: +SKIP
    """
    method = "baseline" if mitigation in (None, "none") else mitigation
    mcfg = MitigationConfig.from_train_config(cfg, method, **kw)
    rec = train_mitigation(policy, params, batch, mcfg, key)
    return rec, summarize(rec)
