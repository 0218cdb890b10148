"""R20 oracle masks, the Adam preconditioner, and the batch-level first order (2B x 2B Gram)."""
from __future__ import annotations


import jax
import jax.numpy as jnp
import optax

from .. import geometry
from ..types import Array, PairBatch, PyTree


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
