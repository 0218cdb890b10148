"""The hooks of the one training step (`train.make_step`): `StepPlugin` (what a mitigation changes)
and `StepContext` (what a step computed, typed, handed to the hooks). Both are re-exported by
`entangle_sim.train`.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp

from . import geometry, losses
from .types import Array, PairBatch, PairState, Policy, PyTree


@dataclasses.dataclass(frozen=True)
class StepPlugin:
    """Hooks that change what one `make_step` step optimises and records (each optional).

    init(params, batch) -> state      extra trained state (e.g. mask logits); the step's opt_state
                                      is then the pair (optimizer state, plug-in state)
    token_weights(state, params, batch) -> (m_w [B,T_w], m_l [B,T_l])
        the step trains the weighted log-probs l~ = sum_t m_t l_t (policy and reference) instead of
        the summed ones; ref_logps are then the reference's TOKEN log-probs ([B,T_w], [B,T_l]).
        Differentiable in `state` (learned masks), constant in `params` (the weights gate).
    extra_loss(l_w, l_l, batch) -> [B]      added to every pair's loss (e.g. alpha * NLL)
    penalty(m_w, m_l) -> [B]                per-pair penalty on the token weights (trains the state)
    state_lr                                plain SGD on the state: state -= state_lr * grad
    coefficients(ctx) -> (a [B], b [B])     update transformation: the gradient handed to the
        optimizer is -(sum_i a_i g~_w,i - b_i g~_l,i) (g~ = grad l~) instead of grad L, e.g. the
        per-pair normalisation g/|g|; computed as jax.grad of the surrogate -sum_i (a_i l~_w,i - b_i l~_l,i)
    record(ctx) -> row                      what the step records instead of a Trajectory row
    sequence_loss(tok_w, tok_l, batch, ref_logps, weights) -> scalar
        a loss on the token log-probs of the whole batch ([B,T_w], [B,T_l]) that replaces the per-pair
        losses and their reduction (e.g. a group loss over rollouts carried as the chosen side);
        ref_logps is passed through as given, weights is token_weights' output (or None) for the loss
        to apply; the full batch is used (batch_size is ignored) and ctx.per_pair is None

    With a plug-in the per-pair losses are combined as sum_i w_i L_i, w_i = 1/b on the step's
    minibatch and 0 elsewhere (TRL's batch mean for every loss that is not batch-coupled; the
    batch-coupled ones take this per-pair form too); without one the loss's own batch reduction runs.
    """

    init: Callable | None = None
    token_weights: Callable | None = None
    extra_loss: Callable | None = None
    penalty: Callable | None = None
    state_lr: float = 0.0
    coefficients: Callable | None = None
    record: Callable | None = None
    sequence_loss: Callable | None = None


@dataclasses.dataclass(eq=False)
class StepContext:
    """What one step computed, for a plug-in's `coefficients` and `record` hooks (typed; built by
    `make_step` in two stages: the fields before the update, then `after_update`).

    Before the update:
      loss      the resolved loss (`losses.ResolvedLoss`; `spec` and `hp` are its definition and values)
      policy, params, batch (PairBatch [B]), state (plug-in state or None)
      weights   token weights (m_w [B,T_w], m_l [B,T_l]) or None
      logps     p -> effective (l_w [B], l_l [B]) (token-weighted when `weights` is set)
      ref       (r_w [B], r_l [B]) effective reference log-probs
      loss_of   (l_w, l_l) -> [B] per-pair loss incl. a plug-in's extra_loss
      w [B]     pair weights (1/b on the minibatch, 0 elsewhere);  b  minibatch size
      lr, opt_state   the rate the update applies and the optimizer state before it
      lw, ll, per_pair   log-probs at params and the per-pair loss ([B]; set before the hooks run)
      coefficients   (a [B], b [B]) of the update transformation, or None
    After it: grads, updates, new_params, new_opt_state, new_state.
    `jacobian` (J~ [2B, P] of the effective log-probs) and `dloss` ((dL_i/dl~_w,i, dL_i/dl~_l,i), [B]
    each) are computed on first use, once per step.
    """

    loss: losses.ResolvedLoss
    policy: Policy
    params: PyTree
    batch: PairBatch
    state: Any
    weights: tuple | None
    logps: Callable
    ref: tuple
    loss_of: Callable
    w: Array
    b: int
    lr: Array
    opt_state: Any
    lw: Array | None = None
    ll: Array | None = None
    per_pair: Array | None = None
    coefficients: tuple | None = None
    grads: PyTree = None
    updates: PyTree = None
    new_params: PyTree = None
    new_opt_state: Any = None
    new_state: Any = None

    @property
    def spec(self) -> losses.LossSpec:
        return self.loss.spec

    @property
    def hp(self) -> dict[str, Any]:
        return self.loss.hp

    def pair_state(self) -> PairState:
        """The pair variables at params (effective log-probs; the trainer scores no prompt: zeros)."""
        zeros = jnp.zeros_like(self.lw)
        return PairState(self.lw, self.ll, self.ref[0], self.ref[1], self.batch.chosen_len,
                         self.batch.rejected_len, zeros, zeros)

    def after_update(self, *, grads, updates, new_params, new_opt_state, new_state) -> None:
        self.grads, self.updates, self.new_params = grads, updates, new_params
        self.new_opt_state, self.new_state = new_opt_state, new_state

    @functools.cached_property
    def jacobian(self) -> Array:
        if self.weights is None:   # plain log-probs: one reverse pass per response, on its own pair
            return geometry.response_jacobian(self.policy.logps, self.params, self.batch)
        # token-weighted log-probs close over this batch's weights: differentiate the whole batch
        return geometry.response_jacobian(lambda p, _: self.logps(p), self.params, self.batch, separable=False)

    @functools.cached_property
    def dloss(self) -> tuple[Array, Array]:
        return jax.grad(lambda x, y: self.loss_of(x, y).sum(), argnums=(0, 1))(self.lw, self.ll)
