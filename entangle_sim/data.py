"""Deterministic synthetic preference data from a PRNG key (returns `PairBatch`).

Two families:

* `geometry_pairs`: tabular / log-linear pairs whose gradient geometry at the returned params has a
  prescribed cos(g_w, g_l) and norm ratio |g_l| / |g_w| -- initial conditions for the toy runs,
  chosen with theory R7 (e.g. a dominant rejected norm and cos near 1 gives "both down").
* token tasks for the sequence policies (theory §5.2, §6.3): '1t' (one differing token),
  'suffix' (R17: differing token then an identical suffix of length L), 'prefix' (R16: identical
  prefix of length L then a differing token), 'edit' (same length T, k differing positions).

Token tasks: prompt [B, prompt_len] uniform tokens; masks 1.0 on the response tokens; `pad` extra
right-padding columns (token 0, mask 0.0) can be appended to exercise masking. Tokens are int32.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from .policies import linear as _linear
from .policies import softmax as _softmax
from .types import Array, PairBatch, Policy

TASKS = ("geometry", "1t", "suffix", "prefix", "edit")


# ----------------------------------------------------------------------------- validation helpers

def _check_common(n_pairs: int, K: int, prompt_len: int = 1, pad: int = 0) -> None:
    if int(n_pairs) < 1:
        raise ValueError(f"n_pairs must be >= 1, got {n_pairs}")
    if int(K) < 2:
        raise ValueError(f"vocabulary K must be >= 2 (chosen and rejected must differ), got K={K}")
    if int(prompt_len) < 1:
        raise ValueError(f"prompt_len must be >= 1 (the context encoder needs a prompt), got {prompt_len}")
    if int(pad) < 0:
        raise ValueError(f"pad must be >= 0, got {pad}")


def _np_rng(key: Array) -> np.random.Generator:
    """A NumPy generator seeded deterministically from a JAX key (for host-side solvers)."""
    return np.random.default_rng(np.asarray(jax.random.key_data(key)).ravel().tolist())


# ----------------------------------------------------------------------------- geometry pairs

class GeometryPairs(NamedTuple):
    """Output of `geometry_pairs`.

    batch:    PairBatch, B = n_pairs, one prompt row per pair (prompt[i, 0] = i), masks ones [B, 1]
    params:   initial params (softmax: logits [B, K]; linear: theta [d] = 0)
    features: phi [B, K, d] for the linear policy (None for softmax)
    config:   SoftmaxConfig / LinearConfig matching params
    """

    batch: PairBatch
    params: Array
    features: Array | None
    config: Any

    def policy(self) -> Policy:
        """The policy these params belong to (features closed over for the linear kind)."""
        if isinstance(self.config, _linear.LinearConfig):
            return _linear.make(self.config, self.features)
        return _softmax.make(self.config)


def _softmax_gram_entries(c: float, r: float) -> tuple[float, float]:
    """u = G_ww and delta = p_b - p_a forced by (cos, ratio) on one softmax row.

    g_w - g_l = e_a - e_b has |.|^2 = 2 = G_ww (1 + r^2 - 2 c r), so G_ww = 2 / (1 + r^2 - 2cr);
    G_ww - G_ll = 2 (p_b - p_a) gives p_b - p_a = G_ww (1 - r^2) / 2.
    """
    u = 2.0 / (1.0 + r * r - 2.0 * c * r)
    return u, u * (1.0 - r * r) / 2.0


def _solve_softmax_row(c: float, r: float, K: int, rng: np.random.Generator) -> np.ndarray | None:
    """Probability vector p [K] (tokens 0 = a, 1 = b) with cos(e_a-p, e_b-p) = c and ratio r, or None.

    With A = p_a: p_b = A + delta, |p|^2 = 2A - 1 + u (from G_ww), rest mass q = 1 - 2A - delta and
    rest square-mass R(A) = |p|^2 - A^2 - p_b^2. The K-2 other tokens take q as one token with f q
    and K-3 tokens with (1-f) q / (K-3), so R = kappa q^2 with kappa = f^2 + (1-f)^2/(K-3) in
    [1/(K-2), 1] (K = 3: kappa = 1). For each kappa, R(A) = kappa q(A)^2 is a quadratic in A;
    a root with all probabilities in (0, 1) is a solution.
    """
    u, delta = _softmax_gram_entries(c, r)
    if not np.isfinite(u) or u <= 0:
        return None
    if K == 3:
        kappas = np.array([1.0])
    else:
        # strictly inside (1/(K-2), 1) so that every probability stays > 0 (finite logits)
        kappas = np.linspace(1.0 / (K - 2), 1.0, 66)[1:-1]
        kappas = kappas[rng.permutation(len(kappas))]
        # fallback near kappa = 1 (one dominant other token) reaches the boundary of the set
        kappas = np.concatenate([kappas, 1.0 - np.logspace(-2, -8, 13) * (1.0 - 1.0 / (K - 2))])
    grid = np.array([0.0, 0.5, 1.0])
    for kappa in kappas:
        R = lambda A: 2 * A - 1 + u - A ** 2 - (A + delta) ** 2
        qf = lambda A: 1 - 2 * A - delta
        coef = np.polyfit(grid, R(grid) - kappa * qf(grid) ** 2, 2)  # exact: a quadratic
        roots = np.roots(coef)
        roots = roots[np.abs(roots.imag) < 1e-12].real
        for A in rng.permutation(roots):
            B, q = A + delta, qf(A)
            if not (1e-9 < A < 1 and 1e-9 < B < 1 and q > 1e-9):
                continue
            if K == 3:
                rest = np.array([q])
            else:
                # kappa = f^2 + (1-f)^2/(K-3)  =>  f = (1 + sqrt(1 - (K-2)(1 - kappa (K-3)))) / (K-2)
                disc = max(1.0 - (K - 2) * (1.0 - kappa * (K - 3)), 0.0)
                f = (1.0 + np.sqrt(disc)) / (K - 2)
                rest = np.concatenate([[f * q], np.full(K - 3, (1 - f) * q / (K - 3))])
            p = np.concatenate([[A, B], rest])
            if np.all(p > 1e-12):
                return p / p.sum()
    return None


def softmax_max_cos(norm_ratio: float) -> float:
    """Supremum of cos(g_w, g_l) on one tabular softmax row with |g_l|/|g_w| = r (not attained).

    Boundary p_a -> 0 (r <= 1; r >= 1 by the symmetry r -> 1/r): with x = 1 - p_b,
    (1 - r^2) x^2 + r^2 x - r^2 = 0 and cos = (2x - 1) / (2 sqrt(1 - x + x^2)); r = 1 gives 1/2.
    """
    r = float(norm_ratio)
    r = 1.0 / r if r > 1 else r
    r2 = r * r
    x = 1.0 if np.isclose(r2, 1.0) else (-r2 + np.sqrt(r2 * r2 + 4 * r2 * (1 - r2))) / (2 * (1 - r2))
    return float((2 * x - 1) / (2 * np.sqrt(1 - x + x * x)))


def softmax_feasible(target_cos: float, norm_ratio: float, K: int) -> bool:
    """Whether one tabular-softmax row can realise (cos, |g_l|/|g_w|) -- see `geometry_pairs`."""
    if K == 2:
        return bool(np.isclose(target_cos, -1.0) and np.isclose(norm_ratio, 1.0))
    return _solve_softmax_row(float(target_cos), float(norm_ratio), int(K),
                              np.random.default_rng(0)) is not None


def geometry_pairs(key: Array, policy_kind: str, n_pairs: int, K: int, target_cos, norm_ratio, *,
                   d: int = 4, grad_norm: float = 1.0, feature_noise: float = 0.5) -> GeometryPairs:
    """Pairs whose per-pair gradient geometry is (cos(g_w, g_l), |g_l|/|g_w|) = (target_cos, norm_ratio).

    target_cos, norm_ratio: scalars or arrays [n_pairs]. Every pair has its own prompt row, so the
    targets are met per pair exactly up to float64 rounding (tests: 1e-9).

    policy_kind='softmax' (tabular, params logits [n_pairs, K]): g = e_y - p on the prompt row.
      Since |g_w - g_l|^2 = |e_a - e_b|^2 = 2, G_ww = 2 / (1 + r^2 - 2 c r) is fixed by the
      targets. The feasible set (any K >= 3; measured on a 0.01 grid to be K-independent) is
      -1 < cos < softmax_max_cos(r), whose boundary is p_a -> 0 (r <= 1) or p_b -> 0 (r >= 1):
      sup cos = 1/2 at r = 1, ~-0.076 at r = 1/2 or 2, ~-0.31 at r = 1/4 or 4. K = 2 forces
      cos = -1, r = 1 (g_l = -g_w). Tabular pairs are always in Case 1 (R15), so R7 "both down" /
      "both up" initial conditions need the linear kind.
    policy_kind='linear' (params theta = 0 [d], so p is uniform; features phi [n_pairs, K, d]):
      phi_a = grad_norm u1, phi_b = r grad_norm (cos u1 + sqrt(1-cos^2) u2) in a random orthonormal
      frame, the other K-2 features balance them (p-weighted mean 0) plus centred noise of scale
      feature_noise * grad_norm. Feasible for any cos in [-1, 1], r > 0 when K >= 3 and d >= 2;
      K = 2 forces cos = -1, r = 1.
    Response a (chosen) and b (rejected) are random distinct indices (from `key`).

    Raises ValueError for an unknown kind or infeasible targets.

    Example (R7 "both down": rejected norm dominant, nearly parallel gradients):
        >>> gp = geometry_pairs(jax.random.PRNGKey(0), 'linear', 8, K=6, target_cos=0.9, norm_ratio=2.0)
        >>> from entangle_sim.geometry import pair_gram
        >>> bool(jnp.allclose(pair_gram(gp.policy().logps, gp.params, gp.batch).cos, 0.9, atol=0.05))
        True
    """
    if policy_kind not in ("softmax", "linear"):
        raise ValueError(f"policy_kind must be 'softmax' or 'linear', got {policy_kind!r}")
    _check_common(n_pairs, K)
    B = int(n_pairs)
    c = np.broadcast_to(np.asarray(target_cos, dtype=np.float64), (B,))
    r = np.broadcast_to(np.asarray(norm_ratio, dtype=np.float64), (B,))
    if not (np.all(np.isfinite(c)) and np.all(np.isfinite(r))) or np.any(np.abs(c) > 1) or np.any(r <= 0):
        raise ValueError(f"need -1 <= target_cos <= 1 and norm_ratio > 0, got {target_cos}, {norm_ratio}")
    rng = _np_rng(key)
    # random distinct (a, b) per pair
    a = rng.integers(0, K, size=B)
    b = (a + rng.integers(1, K, size=B)) % K
    if K == 2 and not (np.allclose(c, -1.0) and np.allclose(r, 1.0)):
        raise ValueError("K=2 forces g_l = -g_w (cos = -1, norm_ratio = 1) for both policy kinds; "
                         f"got target_cos={target_cos}, norm_ratio={norm_ratio}")

    ones = jnp.ones((B, 1))
    batch = PairBatch(prompt=jnp.arange(B, dtype=jnp.int32)[:, None],
                      chosen=jnp.asarray(a, jnp.int32)[:, None],
                      rejected=jnp.asarray(b, jnp.int32)[:, None],
                      chosen_mask=ones, rejected_mask=ones)

    if policy_kind == "softmax":
        logits = np.zeros((B, K))
        for i in range(B):  # host-side construction, one small root solve per pair
            if K == 2:
                p = np.array([0.5, 0.5])
            else:
                p = _solve_softmax_row(float(c[i]), float(r[i]), K, rng)
                if p is None:
                    raise ValueError(
                        f"pair {i}: (target_cos={c[i]:.4g}, norm_ratio={r[i]:.4g}) is infeasible for a "
                        f"tabular softmax row with K={K}; need cos < min(r, 1/r)/2 and inside the set "
                        "found by softmax_feasible (e.g. r=1: cos in [-0.9, 0.4]); use policy_kind='linear'")
            others = [k for k in rng.permutation(K) if k not in (a[i], b[i])]
            order = np.array([a[i], b[i]] + others)
            # log p plus a random per-row shift (softmax is shift invariant; keeps logits generic)
            logits[i, order] = np.log(p) + rng.normal()
        cfg = _softmax.SoftmaxConfig(P=B, K=K)
        return GeometryPairs(batch, jnp.asarray(logits), None, cfg)

    if int(d) < 2 and not np.allclose(np.abs(c), 1.0):
        raise ValueError(f"linear geometry needs d >= 2 for |cos| < 1, got d={d}")
    phi = np.zeros((B, K, int(d)))
    for i in range(B):
        Q, _ = np.linalg.qr(rng.normal(size=(int(d), int(d))))
        u1, u2 = Q[:, 0], (Q[:, 1] if d >= 2 else np.zeros(int(d)))  # d = 1 only for |cos| = 1
        ga = grad_norm * u1
        gb = r[i] * grad_norm * (c[i] * u1 + np.sqrt(max(1.0 - c[i] ** 2, 0.0)) * u2)
        phi[i, a[i]], phi[i, b[i]] = ga, gb
        others = [k for k in range(K) if k not in (a[i], b[i])]
        if others:
            noise = feature_noise * grad_norm * rng.normal(size=(len(others), int(d))) / np.sqrt(d)
            noise -= noise.mean(0)  # centred: the uniform-p mean of all features stays 0
            phi[i, others] = -(ga + gb) / len(others) + noise
    cfg = _linear.LinearConfig(P=B, K=K, d=int(d))
    return GeometryPairs(batch, jnp.zeros(int(d)), jnp.asarray(phi), cfg)


# ----------------------------------------------------------------------------- token tasks

def _assemble(prompt: Array, chosen: Array, rejected: Array, pad: int) -> PairBatch:
    B = prompt.shape[0]

    def padded(y):
        mask = jnp.ones(y.shape)
        if pad:
            y = jnp.concatenate([y, jnp.zeros((B, pad), y.dtype)], axis=1)
            mask = jnp.concatenate([mask, jnp.zeros((B, pad))], axis=1)
        return y.astype(jnp.int32), mask

    cw, mw = padded(chosen)
    cl, ml = padded(rejected)
    return PairBatch(prompt.astype(jnp.int32), cw, cl, mw, ml)


def _prompt_and_contrast(key: Array, n_pairs: int, K: int, prompt_len: int):
    kp, ka, kb = jax.random.split(key, 3)
    prompt = jax.random.randint(kp, (n_pairs, prompt_len), 0, K)
    a = jax.random.randint(ka, (n_pairs, 1), 0, K)
    b = (a + jax.random.randint(kb, (n_pairs, 1), 1, K)) % K  # uniform over tokens != a
    return prompt, a, b


def one_token(key: Array, n_pairs: int, K: int, prompt_len: int = 1, *, pad: int = 0) -> PairBatch:
    """'1t' (R15): chosen = (a), rejected = (b), a != b uniform; nothing else. Responses [B, 1 + pad].

    >>> one_token(jax.random.PRNGKey(0), 4, K=5).chosen.shape
    (4, 1)
    """
    _check_common(n_pairs, K, prompt_len, pad)
    prompt, a, b = _prompt_and_contrast(key, n_pairs, K, prompt_len)
    return _assemble(prompt, a, b, pad)


def _shared_block(key: Array, n_pairs: int, K: int, prompt_len: int, L: int, pad: int, *, suffix: bool,
                  what: str) -> PairBatch:
    """Contrastive token (a vs b) plus L identical tokens after it (suffix) or before it (prefix)."""
    _check_common(n_pairs, K, prompt_len, pad)
    if int(L) < 0:
        raise ValueError(f"{what} length L must be >= 0, got L={L}")
    k1, k2 = jax.random.split(key)
    prompt, a, b = _prompt_and_contrast(k1, n_pairs, K, prompt_len)
    c = jax.random.randint(k2, (n_pairs, int(L)), 0, K)
    join = (lambda x: jnp.concatenate([x, c], 1)) if suffix else (lambda x: jnp.concatenate([c, x], 1))
    return _assemble(prompt, join(a), join(b), pad)


def shared_suffix(key: Array, n_pairs: int, K: int, prompt_len: int = 1, L: int = 4, *,
                  pad: int = 0) -> PairBatch:
    """'suffix' (R17): chosen = (a, c_1..c_L), rejected = (b, c_1..c_L). Responses [B, 1 + L + pad]."""
    return _shared_block(key, n_pairs, K, prompt_len, L, pad, suffix=True, what="suffix")


def shared_prefix(key: Array, n_pairs: int, K: int, prompt_len: int = 1, L: int = 4, *,
                  pad: int = 0) -> PairBatch:
    """'prefix' (R16): chosen = (c_1..c_L, a), rejected = (c_1..c_L, b). Responses [B, L + 1 + pad]."""
    return _shared_block(key, n_pairs, K, prompt_len, L, pad, suffix=False, what="prefix")


def edit_distance(key: Array, n_pairs: int, K: int, prompt_len: int = 1, T: int = 4, k: int = 1, *,
                  pad: int = 0) -> PairBatch:
    """'edit': chosen uniform [B, T]; rejected equals it except at k distinct random positions,
    where the token is replaced by a different one (Hamming distance exactly k, 1 <= k <= T)."""
    _check_common(n_pairs, K, prompt_len, pad)
    if int(T) < 1:
        raise ValueError(f"response length T must be >= 1, got T={T}")
    if not 1 <= int(k) <= int(T):
        raise ValueError(f"number of differing positions k must satisfy 1 <= k <= T={T}, got k={k}")
    kp, kc, kpos, koff = jax.random.split(key, 4)
    prompt = jax.random.randint(kp, (n_pairs, prompt_len), 0, K)
    chosen = jax.random.randint(kc, (n_pairs, int(T)), 0, K)
    # k distinct positions per pair: the k smallest of T iid uniforms
    ranks = jnp.argsort(jnp.argsort(jax.random.uniform(kpos, (n_pairs, int(T))), axis=1), axis=1)
    offset = jax.random.randint(koff, (n_pairs, int(T)), 1, K)
    rejected = jnp.where(ranks < int(k), (chosen + offset) % K, chosen)
    return _assemble(prompt, chosen, rejected, pad)


def make_task(name: str, key: Array, **kw) -> PairBatch | GeometryPairs:
    """Dispatch by name: 'geometry' -> geometry_pairs (GeometryPairs), '1t' -> one_token,
    'suffix' -> shared_suffix, 'prefix' -> shared_prefix, 'edit' -> edit_distance (PairBatch).

    >>> make_task('suffix', jax.random.PRNGKey(0), n_pairs=4, K=8, L=3).chosen.shape
    (4, 4)
    """
    table = {"geometry": geometry_pairs, "1t": one_token, "suffix": shared_suffix,
             "prefix": shared_prefix, "edit": edit_distance}
    if name not in table:
        raise ValueError(f"unknown task {name!r}; valid names: {', '.join(TASKS)}")
    return table[name](key, **kw)


class SoftmaxDraws(NamedTuple):
    """N random single-token softmax problems with padded vocabularies (see `softmax_draws`)."""

    W: Array      # [N, Kmax, dmax] read-out, rows >= K_n unused
    h: Array      # [N, dmax] feature, entries >= d_n zero
    valid: Array  # [N, Kmax] bool, True on the K_n real vocabulary entries
    a: Array      # [N] chosen token < K_n
    b: Array      # [N] rejected token < K_n, != a


def softmax_draws(key: Array, N: int, Kmax: int = 16, dmax: int = 8) -> SoftmaxDraws:
    """Random (K in [2, Kmax], d in [1, dmax], W, h, a != b) for single-token claims (Setting A):
    W = s * N(0, 1) with log s ~ U(-3, 2.5) (flat to peaked p), log p = log_softmax(W h) over the
    K real entries (`softmax_draw_logp`).

    >>> d = softmax_draws(jax.random.PRNGKey(0), 5)
    >>> bool(jnp.all(d.a != d.b))
    True
    """
    ks = jax.random.split(key, 7)
    Kn = jax.random.randint(ks[0], (N,), 2, Kmax + 1)
    dn = jax.random.randint(ks[1], (N,), 1, dmax + 1)
    scale = jnp.exp(jax.random.uniform(ks[2], (N, 1, 1), minval=-3.0, maxval=2.5))
    W = scale * jax.random.normal(ks[3], (N, Kmax, dmax))
    h = jax.random.normal(ks[4], (N, dmax)) * (jnp.arange(dmax)[None] < dn[:, None])
    a = jax.random.randint(ks[5], (N,), 0, Kmax) % Kn
    b = (a + jax.random.randint(ks[6], (N,), 1, Kmax) % (Kn - 1) + 1) % Kn
    return SoftmaxDraws(W, h, jnp.arange(Kmax)[None] < Kn[:, None], a, b)


def softmax_draw_logp(W: Array, h: Array, valid: Array, y) -> Array:
    """log p(y) of one draw: log_softmax(W h) with the padded vocabulary entries at probability 0."""
    return jax.nn.log_softmax(jnp.where(valid, W @ h, -jnp.inf))[y]
