"""Group losses in the package's one trainer (`train.make_step`), toy groups, and a mitigation.

A group of G rollouts of one prompt is carried as a `PairBatch` whose chosen side holds the rollouts
(the rejected side repeats them and is unused); `group_plugin` is the `StepPlugin` whose
`sequence_loss` is the TRL group loss (`group.losses.group_loss`, on-policy: ratio 1 every step, as
TRL with num_iterations = 1) and whose record holds, per step and rollout,

    logps [G]     log-probs before the step
    pred  [G]     the group theory's first order eta K w (w: `rollout_weights`, K: Gram of the rollouts)
    lin   [G]     the first order of the actual update, J dtheta (any optimizer, any token weights)
    real  [G]     realised change l(theta+) - l(theta)
    K [G, G], w [G]

`lld_toy` builds a small softmax sequence LM and a group where a correct rollout shares its tokens
with two incorrect ones: at the shared tokens the incorrect rollouts' negative weight outweighs the
correct one's positive weight, so the correct rollout falls ("lazy likelihood displacement", the
symptom Deng et al. report; this toy and its explanation are this project's).

`shared_token_weights` is this project's mitigation (NTHR-style in spirit, not Deng et al.'s formula):
on incorrect rollouts (A_i < 0) it scales by (1 - strength) the loss of every token whose gradient has
a positive inner product with some correct rollout's gradient, so that no incorrect token pushes a
correct rollout down at first order.

Example:
    >>> toy = lld_toy()                                           # doctest: +SKIP
    >>> rec = run(toy, "dapo", lr=0.05, steps=1)                  # doctest: +SKIP
    >>> bool(rec.real[0, 0] < 0)   # the correct rollout sharing tokens with incorrect ones falls  # doctest: +SKIP
    True
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.flatten_util import ravel_pytree

from .. import train
from ..policies import lastlayer
from ..types import Array, PairBatch, Policy, PyTree
from . import losses as gl


class GroupRecord(NamedTuple):
    """Per-step records of a group run ([S, G], K [S, G, G]); see module docstring."""

    logps: Array
    pred: Array
    lin: Array
    real: Array
    K: Array
    w: Array


class GroupToy(NamedTuple):
    """A policy, its parameters, a group (PairBatch, rollouts on the chosen side) and its rewards."""

    policy: Policy
    params: PyTree
    batch: PairBatch
    rewards: np.ndarray
    labels: tuple


def group_batch(prompt, rollouts) -> PairBatch:
    """PairBatch of G rollouts of one prompt: prompt [P] tokens, rollouts: G token lists (right-padded)."""
    G, T = len(rollouts), max(len(r) for r in rollouts)
    toks = np.zeros((G, T), np.int32)
    mask = np.zeros((G, T))
    for i, r in enumerate(rollouts):
        toks[i, :len(r)] = r
        mask[i, :len(r)] = 1.0
    pr = jnp.asarray(np.tile(np.asarray(prompt, np.int32), (G, 1)))
    m = jnp.asarray(mask, jnp.result_type(float))
    return PairBatch(pr, jnp.asarray(toks), jnp.asarray(toks), m, m)


def lld_toy(seed: int = 0, *, K: int = 12, d: int = 16) -> GroupToy:
    """Four rollouts of prompt [0] under a softmax LM (`policies.lastlayer`, decay 0: the context is
    the previous token), rewards (1, 1, 0, 0):

        0 correct   [1, 2, 3, 4]     shares its first three tokens with both incorrect rollouts
        1 correct   [5, 6, 7, 4]     shares only its answer token 4 (in another context)
        2 incorrect [1, 2, 3, 8]
        3 incorrect [1, 2, 3, 9]

    The shared tokens carry net weight w_0 + w_2 + w_3 < 0 (one correct, two incorrect), so rollout 0
    falls; rollout 1 rises (seeds 0, 1, 2 all show it at d = 16).
    """
    cfg = lastlayer.LastLayerConfig(K=K, d=d, decay=0.0, nonlinearity="identity", seed=seed, embed_scale=1.0,
                                    init_scale=0.5)
    pol = lastlayer.make(cfg)
    params = pol.init(jax.random.PRNGKey(seed + 1))
    rollouts = [[1, 2, 3, 4], [5, 6, 7, 4], [1, 2, 3, 8], [1, 2, 3, 9]]
    return GroupToy(pol, params, group_batch([0], rollouts), np.array([1.0, 1.0, 0.0, 0.0]),
                    ("correct, shares tokens", "correct, own tokens", "incorrect", "incorrect"))


def linear_toy(seed: int = 0, *, G: int = 6, K: int = 8, d: int = 4) -> GroupToy:
    """G one-token rollouts (distinct responses 0..G-1 of prompt 0) under the log-linear policy with
    random frozen features (`policies.linear`): gradients phi_y - phibar of any sign and norm ratio.
    Rewards: the first half 1, the rest 0."""
    from ..policies import linear

    pol = linear.make(linear.LinearConfig(P=1, K=K, d=d, feature_seed=seed, init_scale=0.5))
    params = pol.init(jax.random.PRNGKey(seed + 1))
    rewards = np.array([1.0] * (G // 2) + [0.0] * (G - G // 2))
    return GroupToy(pol, params, group_batch([0], [[i] for i in range(G)]), rewards,
                    tuple("correct" if r else "incorrect" for r in rewards))


def token_jacobian(policy: Policy, params: PyTree, batch: PairBatch) -> Array:
    """d l_{i,t} / d theta of the rollouts (chosen side) as [G, T, P] (flattened parameters)."""
    flat, unravel = ravel_pytree(params)
    return jax.jacrev(lambda f: policy.token_logps(unravel(f), batch)[0])(flat)


def shared_token_weights(policy: Policy, advantages, strength: float = 1.0):
    """`StepPlugin.token_weights` of this project's mitigation: m_{i,t} = 1 - strength on tokens t of
    incorrect rollouts i (A_i < 0) with <g_{i,t}, g_j> > 0 for some correct j (A_j > 0), else 1."""
    A = jnp.asarray(advantages)

    def weights(state, params, batch):
        Jt = token_jacobian(policy, params, batch)                 # [G, T, P]
        g = Jt.sum(1)                                              # [G, P] rollout gradients
        inner = jnp.einsum("itp,jp->itj", Jt, g)                   # <g_{i,t}, g_j>
        pushes_down = jnp.any((inner > 0) & (A[None, None, :] > 0), axis=-1)
        m = jnp.where((A[:, None] < 0) & pushes_down, 1.0 - strength, 1.0) * batch.chosen_mask
        return m, m

    return weights


def group_plugin(policy: Policy, loss_type: str, advantages, *, mitigation=None, **trl_params) -> train.StepPlugin:
    """The `StepPlugin` that makes `train.make_step` a GRPO step of `loss_type` (TRL's names in
    trl_params). ref_logps of the step: (ref_tok [G, T], ref_tok) (the reference's token log-probs,
    used by the KL term when beta != 0). mitigation: a token_weights function (e.g. `shared_token_weights`)."""
    gl.check_loss_type(loss_type)
    gl.resolve(loss_type, **trl_params)
    A = jnp.asarray(advantages)

    def sequence_loss(tw, tl, batch, ref_logps, weights):
        tok_w = None if weights is None else weights[0]
        return gl.group_loss(loss_type, tw, batch.chosen_mask, A, None, ref_logps[1], token_weights=tok_w,
                             **trl_params)

    def record(ctx):
        batch = ctx.batch
        lens = batch.chosen_mask.sum(-1)

        def logps(p):
            return ctx.policy.logps(p, batch)[0]
        l0, l1 = logps(ctx.params), logps(ctx.new_params)
        flat, unravel = ravel_pytree(ctx.params)
        J = jax.jacrev(lambda f: logps(unravel(f)))(flat)          # [G, P]
        K = J @ J.T
        w = rollout_weights_jax(loss_type, A, batch.chosen_mask, lens, **trl_params)
        return GroupRecord(logps=l0, pred=ctx.lr * K @ w, lin=J @ ravel_pytree(ctx.updates)[0], real=l1 - l0,
                           K=K, w=w)

    return train.StepPlugin(sequence_loss=sequence_loss, record=record, token_weights=mitigation)


def rollout_weights_jax(loss_type, A, mask, lens, **trl_params):
    """Traceable `rollout_weights`: token-mean of -dL/dl_{i,t} at ratio 1 (policy = reference)."""
    x = -0.5 * mask
    w_tok = gl.token_incentives(loss_type, x, mask, A, None, x, **trl_params)
    return w_tok.sum(-1) / lens


def run(toy: GroupToy, loss_type: str, *, lr: float, steps: int, optimizer: str = "sgd", mitigation=None,
        **trl_params) -> GroupRecord:
    """`steps` on-policy steps of the group loss on the toy's group in `train.make_step`; [S, G] records."""
    A, _ = gl.advantages(toy.rewards, toy.rewards.size, gl.resolve(loss_type, **trl_params)["scale_rewards"])
    plugin = group_plugin(toy.policy, loss_type, A, mitigation=mitigation, **trl_params)
    cfg = train.TrainConfig(optimizer=optimizer, lr=lr, steps=steps)
    step = train.make_step(toy.policy, cfg, plugin=plugin)
    ref = jax.lax.stop_gradient(toy.policy.token_logps(toy.params, toy.batch)[0])
    opt_state = train.make_optimizer(optimizer, lr).init(toy.params)
    _, _, rec = jax.jit(lambda p, s: train.run_steps(step, p, s, toy.batch, (ref, ref), jax.random.PRNGKey(0),
                                                     steps))(toy.params, opt_state)
    return rec


def lld_data(seed: int = 0, *, loss_type: str = "grpo", lr: float = 0.05, steps: int = 30,
             strength: float = 0.5) -> dict:
    """Figure/report data of the lazy-likelihood-displacement toy: cumulative log-prob change per
    rollout [S + 1, G] without and with the shared-token mitigation, and first-step predictions."""
    toy = lld_toy(seed)
    A, _ = gl.advantages(toy.rewards, toy.rewards.size)
    out = {"labels": list(toy.labels), "loss_type": loss_type, "lr": lr, "steps": steps, "strength": strength,
           "rewards": toy.rewards.tolist()}
    for key, mit in (("plain", None), ("mitigated", shared_token_weights(toy.policy, A, strength))):
        rec = run(toy, loss_type, lr=lr, steps=steps, mitigation=mit)
        real = np.asarray(rec.real)
        out[key] = np.vstack([np.zeros(real.shape[1]), np.cumsum(real, 0)]).tolist()
        out[key + "_first_pred"] = np.asarray(rec.pred[0]).tolist()
        out[key + "_first_lin"] = np.asarray(rec.lin[0]).tolist()
        out[key + "_first_real"] = real[0].tolist()
    return out


def eta_rate_data(loss_types=gl.LOSS_TYPES, etas=(0.02, 0.01, 0.005), seed: int = 0) -> dict:
    """Max |realised - eta K w| over the toy group's rollouts after one SGD step, per loss type and eta."""
    toy = lld_toy(seed)
    errs = {}
    for lt in loss_types:
        errs[lt] = []
        for eta in etas:
            rec = run(toy, lt, lr=eta, steps=1)
            errs[lt].append(float(np.abs(np.asarray(rec.real[0]) - np.asarray(rec.pred[0])).max()))
    return {"etas": list(etas), "errors": errs}
