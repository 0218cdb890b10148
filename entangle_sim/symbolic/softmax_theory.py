"""SymPy derivations for the softmax last layer: theory §5, results R14-R18.

Conventions: functions take SymPy symbols / matrices as arguments and return
expressions, `Eq` (unevaluated: derived form == closed form) or `Relational`s; proofs are done by
targeted simplification (`expand`, `cancel`) and by substitutions that make a sign manifest from
symbol assumptions (e.g. 1 - p_a = s with s >= 0). `is_identity(eq)` checks an `Eq` by expansion.

Model (Setting A): logits z = W h, p = softmax(z), log pi(y) = z_y - log sum_k exp(z_k).
Setting B additionally treats h as trainable (R18).

Example:
    >>> p = prob_symbols(3)
    >>> is_identity(r14_norm_identity(p, 0))        # |e_a - p|^2 = 1 - 2 p_a + |p|^2
    True
"""
from __future__ import annotations

from typing import Sequence

import sympy as sp

# ----------------------------------------------------------------------------- helpers


def prob_symbols(K: int, name: str = "p") -> tuple[sp.Symbol, ...]:
    """K nonnegative probability symbols p0..p{K-1} (the simplex constraint is imposed where used)."""
    return sp.symbols(f"{name}0:{K}", nonnegative=True)


def vector_symbols(d: int, name: str = "h") -> sp.Matrix:
    """A real column vector [d, 1] of symbols."""
    return sp.Matrix(sp.symbols(f"{name}0:{d}", real=True))


def matrix_symbols(K: int, d: int, name: str = "W") -> sp.Matrix:
    """A real K x d matrix of symbols W_i_j."""
    return sp.Matrix(K, d, lambda i, j: sp.Symbol(f"{name}_{i}_{j}", real=True))


def onehot(K: int, a: int) -> sp.Matrix:
    """e_a as a [K, 1] column."""
    return sp.Matrix([1 if k == a else 0 for k in range(K)])


def frob(A: sp.Matrix, B: sp.Matrix) -> sp.Expr:
    """Frobenius inner product <A, B> = sum_ij A_ij B_ij (parameter-space inner product)."""
    return sum((A[i] * B[i] for i in range(len(A))), sp.Integer(0))


def is_identity(eq: sp.Equality, simplex: Sequence[sp.Symbol] | None = None) -> bool:
    """True iff lhs - rhs expands (after cancel) to 0; with `simplex` = p, substitute p_last = 1 - sum(rest)."""
    diff = eq.lhs - eq.rhs
    if simplex is not None:
        diff = diff.subs(simplex[-1], 1 - sum(simplex[:-1]))
    return sp.expand(sp.cancel(sp.expand(diff))) == 0


# ----------------------------------------------------------------------------- R14


def logsoftmax_grad(K: int, y: int) -> tuple[sp.Matrix, tuple[sp.Symbol, ...]]:
    """R14 by direct differentiation: d/dz [z_y - log sum_k exp z_k] = e_y - p.

    Differentiates symbolically in the logits z, then rewrites exp(z_k) = p_k Z (Z the partition
    function) and imposes sum p = 1; returns (gradient [K, 1] in the p symbols, p).
    """
    z = sp.symbols(f"z0:{K}", real=True)
    Z = sp.Symbol("Z", positive=True)
    p = prob_symbols(K)
    f = z[y] - sp.log(sum(sp.exp(zk) for zk in z))
    grad = [sp.diff(f, zk).subs({sp.exp(z[j]): p[j] * Z for j in range(K)}) for zk in z]
    grad = [sp.cancel(g).subs(p[-1], 1 - sum(p[:-1])) for g in grad]
    grad = [sp.expand(sp.cancel(g)) for g in grad]
    return sp.Matrix(grad).subs(p[-1], 1 - sum(p[:-1])), p


def token_gradient(p: Sequence[sp.Expr], h: sp.Matrix, y: int) -> sp.Matrix:
    """R14: g_t(y) = d log softmax(W h)[y] / dW = (e_y - p) h^T, a K x d matrix."""
    return (onehot(len(p), y) - sp.Matrix(p)) * h.T


def r14_norm_identity(p: Sequence[sp.Expr], a: int) -> sp.Equality:
    """R14: |e_a - p|^2 = 1 - 2 p_a + |p|^2 (holds for any vector p)."""
    v = onehot(len(p), a) - sp.Matrix(p)
    return sp.Eq((v.T * v)[0], 1 - 2 * p[a] + sum(pk ** 2 for pk in p), evaluate=False)


def r14_cross_identity(p: Sequence[sp.Expr], a: int, b: int) -> sp.Equality:
    """R14: (e_a - p)^T (e_b - p) = |p|^2 - p_a - p_b for a != b."""
    if a == b:
        raise ValueError("r14_cross_identity needs a != b")
    va, vb = onehot(len(p), a) - sp.Matrix(p), onehot(len(p), b) - sp.Matrix(p)
    return sp.Eq((va.T * vb)[0], sum(pk ** 2 for pk in p) - p[a] - p[b], evaluate=False)


def r14_gram_identity(p: Sequence[sp.Expr], q: Sequence[sp.Expr], h: sp.Matrix, g: sp.Matrix,
                      a: int, b: int) -> sp.Equality:
    """R14: <(e_a - p) h^T, (e_b - q) g^T>_F = (e_a - p)^T (e_b - q) <h, g>."""
    K = len(p)
    lhs = frob(token_gradient(p, h, a), token_gradient(q, g, b))
    rhs = ((onehot(K, a) - sp.Matrix(p)).T * (onehot(K, b) - sp.Matrix(q)))[0] * (h.T * g)[0]
    return sp.Eq(lhs, rhs, evaluate=False)


# ----------------------------------------------------------------------------- R15


def r15_gram(p: Sequence[sp.Expr], h: sp.Matrix, a: int, b: int) -> dict[str, sp.Expr]:
    """R15 Gram entries derived from the R14 gradients of single tokens a (chosen), b (rejected)."""
    gw, gl = token_gradient(p, h, a), token_gradient(p, h, b)
    return {"G_ww": frob(gw, gw), "G_wl": frob(gw, gl), "G_ll": frob(gl, gl)}


def r15_closed_forms(p_a: sp.Expr, p_b: sp.Expr, S: sp.Expr, hh: sp.Expr) -> dict[str, sp.Expr]:
    """R15 closed forms in p_a, p_b, S = |p|^2, hh = |h|^2.

    G_ww = (1 - 2p_a + S) hh, G_wl = (S - p_a - p_b) hh, G_ll = (1 - 2p_b + S) hh,
    G_ww - G_wl = (1 - p_a + p_b) hh, G_ll - G_wl = (1 + p_a - p_b) hh.
    """
    out = {"G_ww": (1 - 2 * p_a + S) * hh, "G_wl": (S - p_a - p_b) * hh, "G_ll": (1 - 2 * p_b + S) * hh}
    out["margin_w"] = sp.factor(sp.expand(out["G_ww"] - out["G_wl"]))
    out["margin_l"] = sp.factor(sp.expand(out["G_ll"] - out["G_wl"]))
    return out


def r15_closed_form_identities(p: Sequence[sp.Expr], h: sp.Matrix, a: int, b: int) -> list[sp.Equality]:
    """Derived (r15_gram) == closed form (r15_closed_forms) for G_ww, G_wl, G_ll."""
    S, hh = sum(pk ** 2 for pk in p), (h.T * h)[0]
    derived, closed = r15_gram(p, h, a, b), r15_closed_forms(p[a], p[b], S, hh)
    return [sp.Eq(derived[k], closed[k], evaluate=False) for k in ("G_ww", "G_wl", "G_ll")]


def r15_condition1() -> dict[str, object]:
    """R15: Condition 1 holds for every p: G_ww - G_wl >= 0 and G_ll - G_wl >= 0.

    Proof: G_ww - G_wl = (1 - p_a + p_b)|h|^2; with p_a = 1 - s_a (s_a >= 0 because p_a <= 1) the
    factor is s_a + p_b, a sum of nonnegative symbols; likewise 1 + p_a - p_b = s_b + p_a.
    Returns the Relationals (in p_a, p_b, hh) and the substituted forms whose sign SymPy infers.
    """
    p_a, p_b, hh = sp.symbols("p_a p_b hh", nonnegative=True)
    s_a, s_b = sp.symbols("s_a s_b", nonnegative=True)  # s = 1 - p >= 0
    cf = r15_closed_forms(p_a, p_b, sp.Symbol("S", nonnegative=True), hh)
    proof_w = sp.expand(cf["margin_w"].subs(p_a, 1 - s_a))
    proof_l = sp.expand(cf["margin_l"].subs(p_b, 1 - s_b))
    return {"chosen_up": sp.Ge(cf["margin_w"], 0), "rejected_down": sp.Ge(cf["margin_l"], 0),
            "proof_w": proof_w, "proof_l": proof_l,
            "proved": bool(proof_w.is_nonnegative) and bool(proof_l.is_nonnegative)}


def r15_gwl_nonpositive_at_mode(K: int, a: int, b: int, mode: int) -> dict[str, object]:
    """R15: G_wl <= 0 when the mode of p is a or b (mode in {a, b}).

    G_wl/|h|^2 = |p|^2 - p_a - p_b = sum_k p_k (p_k - p_m) + p_m - p_a - p_b (m = mode), using
    sum p = 1; with t_k = p_m - p_k >= 0 this is -sum_{k != m} p_k t_k - p_o, o the other of (a, b):
    a sum of nonpositive terms. Returns the identity (in p) and the nonpositive t-form.
    """
    if mode not in (a, b) or a == b:
        raise ValueError("need a != b and mode in {a, b}")
    other = b if mode == a else a
    p = prob_symbols(K)
    t = sp.symbols(f"t0:{K}", nonnegative=True)
    total = sum(p)
    g = sum(pk ** 2 for pk in p) - p[a] * total - p[b] * total  # homogenised by sum p = 1
    t_form = -sum(p[k] * (p[mode] - p[k]) for k in range(K) if k != mode) - p[other] * total
    identity = sp.Eq(g, t_form, evaluate=False)
    signed = t_form.subs({p[mode] - p[k]: t[k] for k in range(K) if k != mode})
    # p_other * sum(p) with all p >= 0 is >= 0, so signed <= 0 from assumptions
    return {"identity": identity, "signed": signed, "proved": is_identity(identity)
            and bool(signed.is_nonpositive)}


# ----------------------------------------------------------------------------- R16


def r16_common_shift(P: sp.Matrix, A_w: sp.Matrix, A_l: sp.Matrix) -> dict[str, sp.Expr]:
    """R16 (any parametrisation): with g_w = P + A_w, g_l = P + A_l and D = g_w - g_l = A_w - A_l,
    <g_w, D> = <A_w, D> + <P, D> and <g_l, D> = <A_l, D> + <P, D>: the same shift <P, D> is added
    to both first-order changes (times C). Returns shift and the two residual identities' sides.
    """
    D = (P + A_w) - (P + A_l)
    shift = frob(P, D)
    return {"shift": shift,
            "chosen": sp.Eq(frob(P + A_w, D) - frob(A_w, D), shift, evaluate=False),
            "rejected": sp.Eq(frob(P + A_l, D) - frob(A_l, D), shift, evaluate=False),
            "direction": sp.Eq(D, A_w - A_l, evaluate=False)}


def r16_setting_a_shift(prefix: Sequence[int], a: int, b: int, ps: Sequence[Sequence[sp.Expr]],
                        hs: Sequence[sp.Matrix], h_T: sp.Matrix) -> sp.Equality:
    """R16 in Setting A: <P, (e_a - e_b) h_T^T> with P = sum_{t<T} (e_{c_t} - p_t) h_t^T equals
    sum_t (1[c_t=a] - 1[c_t=b] - p_t(a) + p_t(b)) <h_t, h_T>.
    """
    K = len(ps[0])
    P = sum((token_gradient(ps[t], hs[t], c) for t, c in enumerate(prefix)), sp.zeros(K, h_T.shape[0]))
    D = (onehot(K, a) - onehot(K, b)) * h_T.T
    closed = sum(((int(c == a) - int(c == b) - ps[t][a] + ps[t][b]) * (hs[t].T * h_T)[0]
                  for t, c in enumerate(prefix)), sp.Integer(0))
    return sp.Eq(frob(P, D), closed, evaluate=False)


# ----------------------------------------------------------------------------- R17


def r17_stylised(L: sp.Symbol, c: sp.Expr, alpha_w: sp.Expr, alpha_l: sp.Expr, beta: sp.Expr
                 ) -> dict[str, sp.Expr]:
    """R17 stylised suffix model: each of the L shared tokens contributes the same c > 0 to
    G_ww, G_ll and G_wl; the contrastive token and the suffix mismatch give O(1) terms:
    G_ww = L c + alpha_w, G_ll = L c + alpha_l, G_wl = L c + beta.
    Returns the Gram entries, cos, |g_w - g_l|^2 (= alpha_w + alpha_l - 2 beta, free of L),
    lim_{L->oo} cos (= 1) and the leading term of 1 - cos ((alpha_w + alpha_l - 2 beta)/(2 c L)).
    """
    G_ww, G_ll, G_wl = L * c + alpha_w, L * c + alpha_l, L * c + beta
    cos = G_wl / sp.sqrt(G_ww * G_ll)
    diff = sp.expand(G_ww + G_ll - 2 * G_wl)
    lead = sp.limit(L * (1 - cos), L, sp.oo) / L
    return {"G_ww": G_ww, "G_ll": G_ll, "G_wl": G_wl, "cos": cos, "diff_norm2": diff,
            "cos_limit": sp.limit(cos, L, sp.oo), "one_minus_cos_leading": sp.simplify(lead)}


def r17_both_down_leading(c_w: sp.Expr, c_l: sp.Expr) -> dict[str, object]:
    """R17 + R7: in a suffix model with parallel per-token gradients of squared norms c_w, c_l
    (G_ww ~ L c_w, G_ll ~ L c_l, G_wl ~ L sqrt(c_w c_l)), the both-down margin
    G_ll - G_ww - |g_w - g_l|^2 grows like L * 2 sqrt(c_w) (sqrt(c_l) - sqrt(c_w)): positive
    (both down for long suffixes) iff c_l > c_w, i.e. the rejected suffix has the larger norm.

    Returns {'per_L': derived margin / L, 'identity': Eq(per_L, factored form),
    'both_down': the Relational per_L > 0}.
    """
    L = sp.Symbol("L", positive=True)
    G_ww, G_ll, G_wl = L * c_w, L * c_l, L * sp.sqrt(c_w) * sp.sqrt(c_l)
    per_L = sp.expand((G_ll - G_ww - (G_ww + G_ll - 2 * G_wl)) / L)
    factored = 2 * sp.sqrt(c_w) * (sp.sqrt(c_l) - sp.sqrt(c_w))
    return {"per_L": per_L, "identity": sp.Eq(per_L, factored, evaluate=False),
            "both_down": sp.Gt(per_L, 0)}


# ----------------------------------------------------------------------------- R18


def r18_gradients(W: sp.Matrix, h: sp.Matrix, y: int) -> dict[str, sp.Expr]:
    """R14/R18 by direct differentiation of log softmax(W h)[y] with respect to W and h.

    Returns the derived gradients and the closed forms with p = softmax(W h) (as exp expressions):
    g_W = (e_y - p) h^T, g_h = w_y - wbar = W^T (e_y - p).
    """
    K, d = W.shape
    z = W * h
    f = z[y] - sp.log(sum(sp.exp(z[k]) for k in range(K)))
    Zs = sum(sp.exp(z[k]) for k in range(K))
    p = sp.Matrix([sp.exp(z[k]) / Zs for k in range(K)])
    gW = sp.Matrix(K, d, lambda i, j: sp.diff(f, W[i, j]))
    gh = sp.Matrix([sp.diff(f, h[j]) for j in range(d)])
    return {"g_W": gW, "g_h": gh, "g_W_closed": (onehot(K, y) - p) * h.T,
            "g_h_closed": W.T * (onehot(K, y) - p), "p": p}


def r18_closed_forms(p: Sequence[sp.Expr], h: sp.Matrix, W: sp.Matrix, a: int, b: int
                     ) -> dict[str, sp.Expr]:
    """R18 (Setting B, single token; params (W, h)) with wbar = sum_k p_k w_k:

    G_wl = (|p|^2 - p_a - p_b)|h|^2 + <w_a - wbar, w_b - wbar>
    G_ww - G_wl = (1 - p_a + p_b)|h|^2 + <w_a - wbar, w_a - w_b>
    G_ll - G_wl = (1 + p_a - p_b)|h|^2 + <w_b - wbar, w_b - w_a>
    """
    S, hh = sum(pk ** 2 for pk in p), (h.T * h)[0]
    wbar = W.T * sp.Matrix(p)
    wa, wb = W[a, :].T - wbar, W[b, :].T - wbar
    out = {"G_ww": (1 - 2 * p[a] + S) * hh + (wa.T * wa)[0],
           "G_wl": (S - p[a] - p[b]) * hh + (wa.T * wb)[0],
           "G_ll": (1 - 2 * p[b] + S) * hh + (wb.T * wb)[0]}
    out["margin_w"] = (1 - p[a] + p[b]) * hh + (wa.T * (W[a, :] - W[b, :]).T)[0]
    out["margin_l"] = (1 + p[a] - p[b]) * hh + (wb.T * (W[b, :] - W[a, :]).T)[0]
    return out


def r18_identities(p: Sequence[sp.Symbol], h: sp.Matrix, W: sp.Matrix, a: int, b: int
                   ) -> list[sp.Equality]:
    """Derived Gram (stacking the R14 W-gradient and the h-gradient W^T(e_y - p)) == R18 closed
    forms, including the margins. Check with `is_identity(eq, simplex=p)` (uses sum p = 1)."""
    K = len(p)
    pv = sp.Matrix(p)
    g = {y: (token_gradient(p, h, y), W.T * (onehot(K, y) - pv)) for y in (a, b)}
    G = {k: frob(g[u][0], g[v][0]) + frob(g[u][1], g[v][1])
         for k, (u, v) in {"G_ww": (a, a), "G_wl": (a, b), "G_ll": (b, b)}.items()}
    G["margin_w"], G["margin_l"] = G["G_ww"] - G["G_wl"], G["G_ll"] - G["G_wl"]
    closed = r18_closed_forms(p, h, W, a, b)
    return [sp.Eq(G[k], closed[k], evaluate=False) for k in G]


def r18_counterexample() -> dict[str, object]:
    """R18: an explicit single-token pair where Condition 1 fails in Setting B.

    K = 3, d = 2, W rows w_a = (1, 0), w_b = (4, 0), w_c = (0, 5), h = (1/10, 1), a = 0, b = 1.
    Token c dominates (p_c ~ 0.983), so wbar ~ w_c and w_a - wbar, w_b - wbar point the same way
    with w_b - wbar longer: <w_a - wbar, w_a - w_b> ~ -2.86 outweighs (1 - p_a + p_b)|h|^2 ~ 1.01,
    giving G_ww - G_wl ~ -1.847 < 0 (chosen falls; G_ll - G_wl > 0, so Case 2: both down).
    Values are exact SymPy expressions (p contains exp); use .evalf() for numbers.
    """
    W = sp.Matrix([[1, 0], [4, 0], [0, 5]])
    h = sp.Matrix([sp.Rational(1, 10), 1])
    z = W * h
    Zs = sum(sp.exp(zk) for zk in z)
    p = [sp.exp(zk) / Zs for zk in z]
    cf = r18_closed_forms(p, h, W, 0, 1)
    return {"W": W, "h": h, "a": 0, "b": 1, "p": p, **cf,
            "violates": bool(sp.N(cf["margin_w"], 30) < 0)}
