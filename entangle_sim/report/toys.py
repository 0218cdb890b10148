"""Report rows and the toy models the checks step exactly: single-pair log-linear policies with
one exact optimizer step vs the symbolic first-order prediction."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .. import data, losses
from ..policies import linear
from ..types import PairState


def entry(id: str, statement: str, check: str, measured, threshold: str, passed, note: str = "") -> dict:
    """One report row; `passed` None means 'not available' (explained in note)."""
    return {"id": id, "statement": statement, "check": check, "measured": clean(measured),
            "threshold": threshold, "pass": None if passed is None else bool(passed), "note": note}


def clean(x):
    if isinstance(x, dict):
        return {k: clean(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [clean(v) for v in x]
    if isinstance(x, (np.generic,)):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return x


def toy_pairs(n: int, seed: int, *, cos=None, ratio=None, K: int = 6, d: int = 4, nw=None, nl=None,
              theta_scale: float = 0.3):
    """n single-pair toy models: l_w = n_w log pi(a), l_l = n_l log pi(b) under a log-linear policy
    with features from `data.geometry_pairs('linear', ...)` (cos, |g_l|/|g_w| per token at theta=0).
    Returns a dict of arrays (phi [n,K,d], a, b, nw, nl, theta0 [n,d])."""

    rng = np.random.default_rng(seed)
    cos = rng.uniform(-0.9, 0.99, n) if cos is None else np.broadcast_to(cos, (n,))
    ratio = np.exp(rng.uniform(np.log(0.25), np.log(4.0), n)) if ratio is None else np.broadcast_to(ratio, (n,))
    gp = data.geometry_pairs(jax.random.PRNGKey(seed), "linear", n, K, cos, ratio, d=d)
    return {"phi": np.asarray(gp.features), "a": np.asarray(gp.batch.chosen[:, 0]),
            "b": np.asarray(gp.batch.rejected[:, 0]),
            "nw": np.ones(n) if nw is None else np.broadcast_to(np.asarray(nw, float), (n,)),
            "nl": np.ones(n) if nl is None else np.broadcast_to(np.asarray(nl, float), (n,)),
            "theta0": theta_scale * rng.normal(size=(n, d)), "cos": cos, "ratio": ratio}


def toy_logps(phi, a, b, nw, nl):
    """theta -> (l_w, l_l) = (n_w log pi(a), n_l log pi(b)) under the package's log-linear policy
    (`policies.linear.response_logp`) with features phi [K, d] of one prompt."""
    def logps(theta):
        return nw * linear.response_logp(theta, phi, a), nl * linear.response_logp(theta, phi, b)
    return logps


def one_step(name: str, toys: dict, refs, etas=None, *, step_norm: float | None = None, hp=None):
    """Exact one-step change vs the symbolic first-order prediction for every toy pair.

    refs: (ref_w [n], ref_l [n]) as offsets added to the initial log-probs. Either `etas` [m]
    (common step sizes) or `step_norm` (eta = step_norm / |grad L| per pair). Returns a dict of
    [n, m] arrays: real_w, real_l, pred_w, pred_l, and [n] G_ww, G_wl, G_ll, d_w, d_l, lw, ll."""
    loss = losses.get(name).bind(**(hp or {}))

    def one(phi, a, b, nw, nl, theta0, off_w, off_l, etas_i):
        logps = toy_logps(phi, a, b, nw, nl)
        lw0, ll0 = logps(theta0)
        rw, rl = lw0 + off_w, ll0 + off_l

        def loss_at(th):
            lw, ll = logps(th)
            return loss.loss(PairState.of(lw, ll, reference=(rw, rl), chosen_len=nw, rejected_len=nl))

        g = jax.grad(loss_at)(theta0)
        gw = jax.grad(lambda t: logps(t)[0])(theta0)
        gl = jax.grad(lambda t: logps(t)[1])(theta0)
        if step_norm is not None:
            etas_i = step_norm / jnp.maximum(jnp.linalg.norm(g), 1e-300) * jnp.ones_like(etas_i)

        def real(eta):
            lw1, ll1 = logps(theta0 - eta * g)
            return lw1 - lw0, ll1 - ll0

        rw1, rl1 = jax.vmap(real)(etas_i)
        return dict(real_w=rw1, real_l=rl1, G_ww=gw @ gw, G_wl=gw @ gl, G_ll=gl @ gl, lw=lw0, ll=ll0,
                    ref_w=rw, ref_l=rl, eta=etas_i, grad_norm=jnp.linalg.norm(g))

    n = len(toys["a"])
    etas_arr = np.ones((n, 1)) if etas is None else np.broadcast_to(np.asarray(etas, float), (n, len(etas)))
    out = jax.jit(jax.vmap(one))(toys["phi"], toys["a"], toys["b"], toys["nw"], toys["nl"], toys["theta0"],
                                 np.asarray(refs[0], float) * np.ones(n), np.asarray(refs[1], float) * np.ones(n),
                                 etas_arr)
    out = {k: np.asarray(v) for k, v in out.items()}
    state = PairState.of(out["lw"][:, None], out["ll"][:, None], reference=(out["ref_w"][:, None], out["ref_l"][:, None]),
                         chosen_len=np.asarray(toys["nw"])[:, None], rejected_len=np.asarray(toys["nl"])[:, None],
                         prompt_logps=np.zeros((n, 1)), prompt_len=np.zeros((n, 1)))
    gram = (out["G_ww"][:, None], out["G_wl"][:, None], out["G_ll"][:, None])
    pred = loss.predict(state, gram, out["eta"])
    out["pred_w"] = np.asarray(pred.delta_chosen)
    out["pred_l"] = np.asarray(pred.delta_rejected)
    out["d_w"], out["d_l"] = np.asarray(pred.d_w)[:, 0], np.asarray(pred.d_l)[:, 0]
    out["vals"] = {k: (np.asarray(v)[:, 0] if np.ndim(v) else v) for k, v in loss.values(state, gram).items()}
    return out


def rel_err(a, b, floor=1e-300):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return np.abs(a - b) / np.maximum(np.maximum(np.abs(a), np.abs(b)), floor)
