"""Mitigation runs: each method is a `train.StepPlugin` of the one trainer step (`train.make_step`),
run by the one run loop (`train.run`: one compiled `lax.scan`), recording theory vs realised changes."""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import geometry, losses
from ..train import StepPlugin, make_optimizer, make_step, run
from ..types import Array, PairBatch, PairState, Policy, PyTree
from .config import JACOBIAN_METHODS, MASK_METHODS, MitigationConfig, MitigationRecord
from .precondition import oracle_masks, adam_preconditioner


def _precond_vector(optimizer: str, opt_state, P: int, dtype):
    if optimizer in ("adam", "adamw"):
        return ravel_pytree(adam_preconditioner(opt_state))[0]
    return jnp.ones((P,), dtype)


def mitigation_plugin(cfg: MitigationConfig, policy: Policy, features=None) -> StepPlugin:
    """The `train.StepPlugin` of one mitigation method on a policy of FLAT parameters theta [P]
    (`features(theta, batch)` likewise): token weights (the R20 masks; the padding masks otherwise),
    the NLL term (method 'nll'), the per-pair / per-batch normalisation as an update transformation
    (R19), the mask parameters as trained state (learned / feature masks), and the records of
    `MitigationRecord`. The loss itself (the configured one, or DPOP for 'dpop': `cfg.effective_train`)
    with its resolved hyperparameters is the trainer's (`ctx.loss`, a `losses.ResolvedLoss`)."""
    method = cfg.method
    learned, feature = method == "learned_mask", method == "feature_mask"

    def token_weights(mp, th, batch):
        if method == "oracle_mask":
            return oracle_masks(batch)
        if learned:
            return jax.nn.sigmoid(mp[0]) * batch.chosen_mask, jax.nn.sigmoid(mp[1]) * batch.rejected_mask
        if feature:  # m_t = sigmoid(v . h_t + c), h_t the token's hidden state (stop-gradient: the mask gates)
            h_w, h_l = jax.lax.stop_gradient(features(th, batch))
            v, c0 = mp
            return (jax.nn.sigmoid(h_w @ v + c0) * batch.chosen_mask,
                    jax.nn.sigmoid(h_l @ v + c0) * batch.rejected_mask)
        return batch.chosen_mask, batch.rejected_mask

    def coefficients(ctx):
        """(a, b) with -grad_theta = sum_i a_i g~_w,i - b_i g~_l,i: the weighted incentives, or for
        the normalized methods the weights of the surrogate (stop-gradient norms)."""
        gw, gl = ctx.dloss
        d_w, d_l, w = -gw, gl, ctx.w
        if method not in JACOBIAN_METHODS:
            return w * d_w, w * d_l
        batch = ctx.batch
        s = jnp.ones_like(d_w) if cfg.weight == "unit" else ctx.loss.step_weight(ctx.pair_state(), d_w, d_l)
        Je = ctx.jacobian
        B = batch.size
        tiny = jnp.finfo(Je.dtype).tiny
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

    def record(ctx):
        batch, (m_w, m_l) = ctx.batch, ctx.weights
        B = batch.size
        lw, ll = policy.logps(ctx.params, batch)
        lw1, ll1 = policy.logps(ctx.new_params, batch)
        rec = dict(chosen_logps=lw, rejected_logps=ll, loss=ctx.per_pair, real_chosen=lw1 - lw,
                   real_rejected=ll1 - ll, mask_w=m_w, mask_l=m_l)
        zeros = jnp.zeros_like(lw)
        if not cfg.record:
            rec.update({k: zeros for k in MitigationRecord._fields if k not in rec})
            return MitigationRecord(**rec)
        a_c, b_c = ctx.coefficients if ctx.coefficients is not None else \
            jax.lax.stop_gradient(coefficients(ctx))
        Je = ctx.jacobian
        J = geometry.response_jacobian(policy.logps, ctx.params, batch) if method in MASK_METHODS else Je
        c = jnp.concatenate([a_c, -b_c])
        eta = ctx.lr
        Pv = _precond_vector(cfg.optimizer, ctx.new_opt_state, Je.shape[1], Je.dtype)
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
        lin = J @ ravel_pytree(ctx.updates)[0]
        rec.update(out, G_ww=full.G_ww, G_wl=full.G_wl, G_ll=full.G_ll,
                   Ge_ww=eff.G_ww, Ge_wl=eff.G_wl, Ge_ll=eff.G_ll, lin_chosen=lin[:B], lin_rejected=lin[B:])
        return MitigationRecord(**rec)

    def init(th, batch):
        dtype = ravel_pytree(th)[0].dtype
        if feature:   # v = 0, c = mask_init: starts at the same mask sigmoid(mask_init) as the free masks
            D = jax.eval_shape(lambda: features(th, batch))[0].shape[-1]
            return jnp.zeros((D,), dtype), jnp.asarray(cfg.mask_init, dtype)
        return (jnp.full(batch.chosen.shape, cfg.mask_init, dtype),
                jnp.full(batch.rejected.shape, cfg.mask_init, dtype))

    trains_mask = learned or feature
    return StepPlugin(
        init=init if trains_mask else None,
        token_weights=token_weights,
        extra_loss=(lambda lw, ll, batch: cfg.nll_alpha * (-lw / batch.chosen_len)) if method == "nll" else None,
        penalty=(lambda m_w, m_l: cfg.mask_l1 * (m_w.sum(-1) + m_l.sum(-1))) if trains_mask else None,
        state_lr=cfg.feature_lr if feature else cfg.mask_lr,   # plain SGD on mask logits u, or on (v, c)
        coefficients=coefficients if method in JACOBIAN_METHODS else None,
        record=record)


def _mitigation_run(policy: Policy, params0: PyTree, batch: PairBatch, cfg: MitigationConfig, features=None):
    """(step, theta0, state0, ref_tok, has_masks): the trainer's step (`train.make_step`) with
    `mitigation_plugin(cfg)` on flat parameters, in the form `train.run` takes. A plug-in's extra
    trained state (mask parameters) rides in the optimizer slot: state0 = opt_state, or
    (opt_state, mask parameters) when the plug-in has one."""
    if cfg.method == "feature_mask" and features is None:
        raise ValueError("method 'feature_mask' needs features(params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D])")
    theta0, unravel = ravel_pytree(params0)
    flat = Policy(policy.name, lambda key: ravel_pytree(policy.init(key))[0],
                  lambda th, bt: policy.token_logps(unravel(th), bt))
    flat_features = None if features is None else (lambda th, bt: features(unravel(th), bt))
    plugin = mitigation_plugin(cfg, flat, flat_features)
    inner = make_step(flat, cfg.effective_train, plugin=plugin)
    ref_tok = jax.lax.stop_gradient(flat.token_logps(theta0, batch))   # reference = the initial policy
    opt = make_optimizer(cfg.optimizer, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)
    state0 = opt.init(theta0) if plugin.init is None else (opt.init(theta0), plugin.init(theta0, batch))
    return inner, theta0, state0, ref_tok, plugin.init is not None


def make_mitigation_step(policy: Policy, params0: PyTree, batch: PairBatch, cfg: MitigationConfig,
                         features=None):
    """(init_state, step): one mitigation step as step(state, key) -> (state, MitigationRecord row), for
    stepping by hand; runs use `train.run` (`train_mitigation`). State = (theta_flat, mask parameters,
    opt_state); mask parameters = logits (u_w [B,T_w], u_l [B,T_l]) for the free masks, (v [D], c)
    for 'feature_mask' (needs `features(params, batch) -> (h_w [B,T_w,D], h_l [B,T_l,D])`, e.g.
    `setting_features`), constant `cfg.mask_init` masks for the other methods. See the package
    docstring for the records."""
    inner, theta0, state0, ref_tok, has_masks = _mitigation_run(policy, params0, batch, cfg, features)
    blank = (jnp.full(batch.chosen.shape, cfg.mask_init, theta0.dtype),
             jnp.full(batch.rejected.shape, cfg.mask_init, theta0.dtype))

    def init_state():
        return (theta0, state0[1], state0[0]) if has_masks else (theta0, blank, state0)

    def step(state, key):
        th, mp, opt_state = state
        if not has_masks:
            th1, opt1, rec = inner(th, opt_state, batch, ref_tok, key)
            return (th1, mp, opt1), rec
        th1, (opt1, mp1), rec = inner(th, (opt_state, mp), batch, ref_tok, key)
        return (th1, mp1, opt1), rec

    return init_state, step


def train_mitigation(policy: Policy, params: PyTree, batch: PairBatch, cfg: MitigationConfig, key: Array,
                     features=None) -> MitigationRecord:
    """One run of `train.run` (jitted). Returns [S, B] records (masks [S, B, T]).

    Reference = the initial policy (r = 0 at step 0), as in `train.train`. features: see
    `make_mitigation_step` (only 'feature_mask' uses it).
    """
    return _compiled_run(policy, params, batch, cfg, features)(key)


def _records(policy, params, batch, cfg, features, key):
    inner, theta0, state0, ref_tok, _ = _mitigation_run(policy, params, batch, cfg, features)
    return run(inner, theta0, state0, jax.random.split(key, cfg.steps), batch, reference=ref_tok)[2]


def _compiled_run(policy, params, batch, cfg, features=None):
    return jax.jit(lambda key: _records(policy, params, batch, cfg, features, key))


def train_per_pair(policy: Policy, params: PyTree, batch: PairBatch, cfg: MitigationConfig, key: Array,
                   features=None) -> MitigationRecord:
    """Each pair trained ALONE from the same initial params (vmapped over pairs, one compilation):
    the setting of the one-pair theory (no cross-pair terms). Returns records [B, S, 1]."""
    def one(ex):
        return _records(policy, params, jax.tree.map(lambda x: x[None], ex), cfg, features, key)

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
    resolved = losses.get(loss).bind(**dict(loss_params))
    flat, unravel = ravel_pytree(params)
    lp = lambda f: jnp.concatenate(policy.logps(unravel(f), batch))
    B = batch.size

    def L(f, ref):
        v = lp(f)
        return resolved.loss(PairState.of(v[:B], v[B:], reference=(ref[:B], ref[B:]), chosen_len=batch.chosen_len,
                                          rejected_len=batch.rejected_len)).mean()

    @jax.jit   # one compilation instead of many eager ones
    def first_step_scale(f):
        g = jax.grad(L)(f, jax.lax.stop_gradient(lp(f)))
        u = -jnp.sign(g) if optimizer in ("adam", "adamw") else -g
        return jnp.mean(jnp.abs(jax.jvp(lp, (f,), (u,))[1]))

    scale = float(first_step_scale(flat))
    if not np.isfinite(scale) or scale <= 0:
        raise ValueError("calibrate_lr: the baseline's first step does not move the log-probs")
    return target / scale
