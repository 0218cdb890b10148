"""The mitigation trainer: one compiled `lax.scan` per run recording theory vs realised changes."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from .. import geometry, losses
from ..train import make_optimizer
from ..types import Array, PairBatch, Policy, PyTree
from .config import JACOBIAN_METHODS, MASK_METHODS, MitigationConfig, MitigationRecord
from .precondition import oracle_masks, adam_preconditioner


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
        if method not in JACOBIAN_METHODS:
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
        need_jac = cfg.record or method in JACOBIAN_METHODS
        lw_e, ll_e = eff_logps(th, m_w, m_l)
        Je = jac(th, m_w, m_l) if need_jac else None
        if method in JACOBIAN_METHODS:
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
        if method in JACOBIAN_METHODS:
            a_c, b_c = a, bb
        else:
            a_c, b_c = jax.lax.stop_gradient(coefficients(lw_e, ll_e, m_w, m_l, w, Je))
        J = jac(th, jnp.ones_like(m_w) * batch.chosen_mask, jnp.ones_like(m_l) * batch.rejected_mask) \
            if method in MASK_METHODS else Je
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
