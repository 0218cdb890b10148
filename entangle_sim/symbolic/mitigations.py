"""SymPy derivations for the mitigations and for preconditioned / batch-level entanglement
(docs/theory.md §8 R19, R20). Proof style as in `proofs.py`: an identity that
expands to 0 plus a certificate whose sign follows from the symbols' assumptions alone.

Gram parametrisation (as in proofs.py): a = |g_w|, b = |g_l|, c = cos = 1 - e, e >= 0.

>>> from entangle_sim.symbolic import mitigations as sm
>>> all(bool(p) for p in sm.all_proofs())
True
"""
from __future__ import annotations

import itertools

import sympy as sp

from .dynamics import first_order
from .functions import LogSigmoid, Sigmoid
from .proofs import GRAM, Proof, a, b, c, e
from .softmax_theory import frob, onehot, prob_symbols, token_gradient, vector_symbols
from .symbols import G_ll, G_wl, G_ww, eta

s = sp.Symbol("s", nonnegative=True)            # step weight -m'(z) (or 1)


# ----------------------------------------------------------------------------------------------
# R19: pairwise normalized preference optimization
# ----------------------------------------------------------------------------------------------
def normalized_changes():
    """First-order (Delta l_w, Delta l_l, Delta margin) of delta_theta = eta s (g_w/|g_w| - g_l/|g_l|):
    the generalised form with d_w = s/|g_w|, d_l = s/|g_l| (R19), in the (a, b, c) parametrisation."""
    dcw, dcl, dm, _ = first_order(s / a, s / b)
    return tuple(sp.simplify(x.subs(GRAM)) for x in (dcw, dcl, dm))


def r19_guarantee() -> Proof:
    """R19: Delta l_w = eta s |g_w| (1 - cos) >= 0, Delta l_l = -eta s |g_l| (1 - cos) <= 0,
    Delta(l_w - l_l) = eta s (|g_w| + |g_l|)(1 - cos) >= 0, for ANY Gram (a, b > 0, |c| <= 1)."""
    dcw, dcl, dm = normalized_changes()
    forms = (eta * s * a * (1 - c), -eta * s * b * (1 - c), eta * s * (a + b) * (1 - c))
    ok_id = all(sp.expand(x - f) == 0 for x, f in zip((dcw, dcl, dm), forms))
    certs = tuple(f.subs(c, 1 - e) for f in forms)
    ok_sign = bool(certs[0].is_nonnegative) and bool(certs[1].is_nonpositive) and bool(certs[2].is_nonnegative)
    return Proof("R19", "pairwise normalized PO: chosen never falls, rejected never rises (first order)",
                 tuple(sp.Eq(x, f) for x, f in zip((dcw, dcl, dm), forms)), certs, ok_id and ok_sign,
                 {"condition": "cos(g_w, g_l) <= 1 (Cauchy-Schwarz)"})


def r19_squared_norm_counterexample() -> Proof:
    """The g/|g|^2 variant: Delta l_w = eta s (1 - c a/b), Delta l_l = eta s (c b/a - 1); chosen rises
    iff c <= b/a, rejected falls iff c <= a/b -- no guarantee. Witness a = 2, b = 1, c = 9/10:
    Delta l_w = -4/5 eta s < 0 (both fall)."""
    dcw, dcl, _, _ = first_order(s / a**2, s / b**2)
    dcw, dcl = sp.expand(dcw.subs(GRAM)), sp.expand(dcl.subs(GRAM))
    ok_form = sp.simplify(dcw - eta * s * (1 - c * a / b)) == 0 and sp.simplify(dcl - eta * s * (c * b / a - 1)) == 0
    point = {a: 2, b: 1, c: sp.Rational(9, 10), eta: 1, s: 1}
    v = (dcw.subs(point), dcl.subs(point))
    return Proof("R19'", "squared-norm normalisation has no guarantee", (sp.Eq(sp.Symbol("Delta_l_w"), dcw),
                 sp.Eq(sp.Symbol("Delta_l_l"), dcl)), v, bool(ok_form and v[0] < 0 and v[1] < 0),
                 {"witness": {str(k): v_ for k, v_ in point.items()}})


# ----------------------------------------------------------------------------------------------
# item 4: diagonal preconditioning delta_theta = -eta P grad L
# ----------------------------------------------------------------------------------------------
def _vectors(n: int):
    gw = sp.Matrix(sp.symbols(f"gw_1:{n + 1}", real=True))
    gl = sp.Matrix(sp.symbols(f"gl_1:{n + 1}", real=True))
    p = sp.Matrix(sp.symbols(f"p_1:{n + 1}", positive=True))
    return gw, gl, p


def preconditioned_gram_symbols(n: int = 3):
    """(g_w, g_l, p, GP_ww, GP_wl, GP_ll) with G^P_xy = sum_i p_i x_i y_i (P = diag(p) > 0)."""
    gw, gl, p = _vectors(n)
    dot = lambda x, y: sum(p[i] * x[i] * y[i] for i in range(n))
    return gw, gl, p, dot(gw, gw), dot(gw, gl), dot(gl, gl)


def preconditioned_first_order(n: int = 3) -> Proof:
    """Item 4: with grad L = -(d_w g_w - d_l g_l) and delta_theta = -eta P grad L (P = diag(p) > 0):

        Delta l_w ~ <g_w, delta_theta> = eta (d_w G^P_ww - d_l G^P_wl)
        Delta l_l ~ <g_l, delta_theta> = eta (d_w G^P_wl - d_l G^P_ll)

    i.e. every result of R3-R12 holds with G_xy -> G^P_xy = <g_x, P g_y>. The R5 / R19 arguments
    carry over because G^P obeys Cauchy-Schwarz: G^P_ww G^P_ll - (G^P_wl)^2 =
    sum_{i<j} p_i p_j (g_w,i g_l,j - g_w,j g_l,i)^2 >= 0 (Lagrange identity; the certificate)."""
    gw, gl, p, Pww, Pwl, Pll = preconditioned_gram_symbols(n)
    dws, dls = sp.symbols("d_w d_l", real=True)
    grad = -(dws * gw - dls * gl)
    dtheta = -eta * sp.diag(*p) * grad
    dcw, dcl = (gw.T * dtheta)[0], (gl.T * dtheta)[0]
    fw, fl, _, _ = first_order(dws, dls)
    sub = {G_ww: Pww, G_wl: Pwl, G_ll: Pll}
    ok1 = sp.expand(dcw - fw.subs(sub)) == 0 and sp.expand(dcl - fl.subs(sub)) == 0
    lagrange = sum(p[i] * p[j] * (gw[i] * gl[j] - gw[j] * gl[i]) ** 2 for i, j in itertools.combinations(range(n), 2))
    ok2 = sp.expand(Pww * Pll - Pwl**2 - lagrange) == 0 and bool(lagrange.is_nonnegative)
    return Proof("P1", "preconditioned first-order changes: R3-R12 with G -> G^P = <g, P g>",
                 (sp.Eq(sp.Symbol("Delta_l_w"), fw.subs(sub)), sp.Eq(sp.Symbol("Delta_l_l"), fl.subs(sub))),
                 sp.Eq(Pww * Pll - Pwl**2, lagrange), bool(ok1 and ok2),
                 {"conditions": "chosen up <=> d_w G^P_ww >= d_l G^P_wl; rejected down <=> d_w G^P_wl <= d_l G^P_ll"})


def preconditioned_regime_differs() -> Proof:
    """An explicit state where plain SGD is in Case 1 but the P-preconditioned step is in Case 2
    (both fall): g_w = (1, 1), g_l = (2, -1/2), d_w = d_l = 1, P = diag(10, 1/10)."""
    gw, gl = sp.Matrix([1, 1]), sp.Matrix([2, -sp.Rational(1, 2)])
    P = sp.diag(10, sp.Rational(1, 10))
    one = lambda M: ((gw.T * M * (gw - gl))[0], (gl.T * M * (gw - gl))[0])
    sgd, pre = one(sp.eye(2)), one(P)
    ok = sgd[0] > 0 and sgd[1] < 0 and pre[0] < 0 and pre[1] < 0
    return Proof("P2", "the regime of a preconditioned step can differ from the SGD regime",
                 {"sgd": sgd, "preconditioned": pre}, (sgd, pre), bool(ok))


def sign_descent_change(n: int = 3) -> Proof:
    """Sign descent as the diagonal limit: delta_theta = -eta sign(grad L) = -eta P grad L with
    p_i = 1/|grad_i|; then Delta l_w ~ eta sum_i g_w,i sign(d_w g_w,i - d_l g_l,i). Checked as an
    identity with positive symbols q_i = |grad_i| standing for the absolute values."""
    gw, gl, _ = _vectors(n)
    dws, dls = sp.symbols("d_w d_l", real=True)
    u = dws * gw - dls * gl                       # = -grad L
    sg = sp.Matrix(sp.symbols(f"sigma_1:{n + 1}", real=True))  # sign(u_i), with |u_i| = sigma_i u_i
    q = sp.Matrix([sg[i] * u[i] for i in range(n)])  # |u_i|
    dtheta_P = eta * sp.Matrix([u[i] / q[i] for i in range(n)])
    dcw = sp.simplify((gw.T * dtheta_P)[0].subs({sg[i]: sp.Symbol(f"sigma_{i + 1}", real=True) for i in range(n)}))
    target = eta * sum(gw[i] / sg[i] for i in range(n))  # 1/sign = sign for sign = +-1
    ok = sp.simplify(dcw - target) == 0
    return Proof("P3", "sign descent = diagonal preconditioning with p_i = 1/|grad_i|",
                 sp.Eq(sp.Symbol("Delta_l_w"), target), target, bool(ok))


def normalized_under_preconditioning(n: int = 2) -> Proof:
    """R19 under a diagonal P: delta_theta = eta s P (g_w/|g_w| - g_l/|g_l|) gives
    Delta l_w = eta s (G^P_ww/|g_w| - G^P_wl/|g_l|), which CAN be negative (witness g_w = (1, 1/10),
    g_l = (0, 1), P = diag(1/10, 10)); normalising by the P-norms instead,
    eta s P (g_w/|g_w|_P - g_l/|g_l|_P), restores the guarantee (R19 with the P-Gram)."""
    gw, gl = sp.Matrix([1, sp.Rational(1, 10)]), sp.Matrix([0, 1])
    P = sp.diag(sp.Rational(1, 10), 10)
    nrm = lambda v: sp.sqrt((v.T * v)[0])
    nrmP = lambda v: sp.sqrt((v.T * P * v)[0])
    d_euc = P * (gw / nrm(gw) - gl / nrm(gl))
    d_P = P * (gw / nrmP(gw) - gl / nrmP(gl))
    euc = (sp.simplify((gw.T * d_euc)[0]), sp.simplify((gl.T * d_euc)[0]))
    pn = (sp.simplify((gw.T * d_P)[0]), sp.simplify((gl.T * d_P)[0]))
    ok = euc[0] < 0 and pn[0] > 0 and pn[1] < 0
    return Proof("R19-P", "Euclidean-normalized PO loses its guarantee under P; P-normalized keeps it",
                 {"euclidean_normalized": euc, "P_normalized": pn}, euc, bool(ok))


# ----------------------------------------------------------------------------------------------
# item 5: batch level, delta_l = -eta G dL/dl with the 2B x 2B Gram
# ----------------------------------------------------------------------------------------------
def batch_first_order(B: int = 2, n: int = 2) -> Proof:
    """Item 5: for the batch loss L = (1/B) sum_i F_i(l_w,i, l_l,i) of log-probs l_k(theta) (arbitrary
    functions), one step delta_theta = -eta grad L changes l to first order by

        Delta l = J delta_theta = -eta J J^T dL/dl = -eta G dL/dl,   G = J J^T  [2B x 2B]

    so Delta l_w,i = (eta/B)[d_w,i G_{w_i w_i} - d_l,i G_{w_i l_i}]  +  (eta/B) sum_{j != i}
    [d_w,j G_{w_i w_j} - d_l,j G_{w_i l_j}] (own pair + cross-pair terms). Proved by the chain rule
    on SymPy functions of n parameters; the own-pair part is `first_order` of R8 with weight 1/B."""
    th = sp.symbols(f"theta_1:{n + 1}", real=True)
    ls = [sp.Function(f"l_{k}")(*th) for k in range(2 * B)]   # l_w,1..l_w,B, l_l,1..l_l,B
    xs = sp.symbols(f"x_1:{2 * B + 1}", real=True)
    Fs = [sp.Function(f"F_{i}") for i in range(B)]
    L_of_x = sum(Fs[i](xs[i], xs[B + i]) for i in range(B)) / B
    L = L_of_x.subs(dict(zip(xs, ls)), simultaneous=True)
    grad = sp.Matrix([sp.diff(L, t) for t in th])
    J = sp.Matrix([[sp.diff(l_, t) for t in th] for l_ in ls])
    dLdl = sp.Matrix([sp.diff(L_of_x, x).subs(dict(zip(xs, ls)), simultaneous=True) for x in xs])
    dl_chain = J * (-eta * grad)
    dl_gram = -eta * (J * J.T) * dLdl
    ok = all(sp.simplify(sp.expand(u - v)) == 0 for u, v in zip(dl_chain, dl_gram))
    # own + cross decomposition for pair 0's chosen response, in incentive form
    G = J * J.T
    d_w = [-dLdl[i] for i in range(B)]
    d_l = [dLdl[B + i] for i in range(B)]
    own = eta * (d_w[0] * G[0, 0] - d_l[0] * G[0, B])
    cross = eta * sum(d_w[j] * G[0, j] - d_l[j] * G[0, B + j] for j in range(1, B))
    ok2 = sp.simplify(sp.expand(dl_gram[0] - own - cross)) == 0
    return Proof("B1", "batch-level first order: Delta l = -eta G dL/dl, G = J J^T (2B x 2B)",
                 sp.Eq(sp.Symbol("Delta_l"), -eta * sp.Symbol("G") * sp.Symbol("dL/dl")), (own, cross),
                 bool(ok and ok2), {"B": B, "n_params": n})


def batch_flip_example() -> Proof:
    """Cross-pair terms can flip a pair's regime: two pairs with d = 1/2 each, pair 1 alone in Case 1,
    but pair 2's chosen gradient anti-aligned with g_w,1 makes l_w,1 fall in the batch step.
    g_w1 = (1, 0), g_l1 = (0, 1), g_w2 = (-2, 0), g_l2 = (0, 0.)"""
    Jrows = [sp.Matrix([1, 0]), sp.Matrix([-2, 0]), sp.Matrix([0, 1]), sp.Matrix([0, 0])]
    J = sp.Matrix.hstack(*Jrows).T
    G = J * J.T
    dLdl = sp.Matrix([-sp.Rational(1, 2), -sp.Rational(1, 2), sp.Rational(1, 2), sp.Rational(1, 2)])
    batch = -G * dLdl
    mask = sp.Matrix(4, 4, lambda i, j: 1 if i % 2 == j % 2 else 0)
    own = -G.multiply_elementwise(mask) * dLdl
    ok = own[0] > 0 and own[2] < 0 and batch[0] < 0
    return Proof("B2", "cross-pair terms flip pair 1 from Case 1 to 'both down'",
                 {"one_pair": (own[0], own[2]), "batch": (batch[0], batch[2])}, batch, bool(ok))


# ----------------------------------------------------------------------------------------------
# R20: sparse token masks
# ----------------------------------------------------------------------------------------------
def r20_masked_update(T_w: int = 2, T_l: int = 2, n: int = 2) -> Proof:
    """R20: for L = -log sigma(beta (r~_w - r~_l)) with r~(y) = sum_t m_t (log pi_t - log pi_ref,t),
    -grad L = s beta (sum_t m^w_t g_t(y_w) - sum_t m^l_t g_t(y_l)), s = sigma(-beta(r~_w - r~_l)),
    and the FULL log-probs move by Delta l_w ~ eta s beta <g_w, sum_t m^w_t g^w_t - sum_t m^l_t g^l_t>
    (g_w = sum_t g^w_t). Chain rule on SymPy functions (per-token log-probs of n parameters)."""
    th = sp.symbols(f"theta_1:{n + 1}", real=True)
    tw = [sp.Function(f"u_{t}")(*th) for t in range(T_w)]
    tl = [sp.Function(f"v_{t}")(*th) for t in range(T_l)]
    mw = sp.symbols(f"m^w_1:{T_w + 1}", nonnegative=True)
    ml = sp.symbols(f"m^l_1:{T_l + 1}", nonnegative=True)
    refw = sp.symbols(f"rw_1:{T_w + 1}", real=True)
    refl = sp.symbols(f"rl_1:{T_l + 1}", real=True)
    beta = sp.Symbol("beta", positive=True)
    zt = beta * (sum(m * (u - r) for m, u, r in zip(mw, tw, refw)) - sum(m * (v - r) for m, v, r in zip(ml, tl, refl)))
    L = -LogSigmoid(zt)
    grad = sp.Matrix([sp.diff(L, t) for t in th])
    gt = lambda f: sp.Matrix([sp.diff(f, t) for t in th])
    upd = Sigmoid(-zt) * beta * (sum((m * gt(u) for m, u in zip(mw, tw)), sp.zeros(n, 1))
                                 - sum((m * gt(v) for m, v in zip(ml, tl)), sp.zeros(n, 1)))
    diff = (-grad - upd).applyfunc(lambda x: sp.simplify(sp.expand(x.rewrite(sp.exp))))
    ok = all(x == 0 for x in diff)
    g_w = gt(sum(tw))
    dcw = eta * (g_w.T * upd)[0]
    return Proof("R20", "masked update: eta s beta (sum m^w g^w_t - sum m^l g^l_t); full l moves by <g, update>",
                 sp.Eq(sp.Symbol("-grad L"), sp.Symbol("s beta (M_w - M_l)")), dcw, bool(ok))


def r20_setting_a_shift(K: int = 3, L: int = 1) -> Proof:
    """R20 conditional shift in Setting A, mask on the contrastive first position only:
    y_w = (a, c_1..c_L), y_l = (b, c_1..c_L), shared first context h_1 / distribution p_1, suffix
    contexts h^w_t, h^l_t with distributions p^w_t, p^l_t. With C = eta s beta:

        Delta l_w = C [ (1 - p_1a + p_1b) |h_1|^2 + sum_t (1[c_t=a] - 1[c_t=b] - p^w_t(a) + p^w_t(b)) <h^w_t, h_1> ]
        Delta l_l = C [ -(1 + p_1a - p_1b) |h_1|^2 + sum_t (1[c_t=a] - 1[c_t=b] - p^l_t(a) + p^l_t(b)) <h^l_t, h_1> ]

    Checked with symbolic probabilities (simplex), features (d = 2), K tokens, a = 0, b = 1, suffix
    token c_t = 2 (so the indicators vanish and the shift is -(p_t(a) - p_t(b)) <h_t, h_1>)."""
    d = 2
    A_, B_, Ct = 0, 1, 2
    p1 = prob_symbols(K, "p")
    h1 = vector_symbols(d, "h")
    pw = [prob_symbols(K, f"q{t}") for t in range(L)]
    pl = [prob_symbols(K, f"r{t}") for t in range(L)]
    hw = [vector_symbols(d, f"x{t}") for t in range(L)]
    hl = [vector_symbols(d, f"z{t}") for t in range(L)]
    Cs = sp.Symbol("C", positive=True)
    dtheta = Cs * (onehot(K, A_) - onehot(K, B_)) * h1.T     # masked update: only the first token
    g_w = token_gradient(p1, h1, A_) + sum((token_gradient(pw[t], hw[t], Ct) for t in range(L)), sp.zeros(K, d))
    g_l = token_gradient(p1, h1, B_) + sum((token_gradient(pl[t], hl[t], Ct) for t in range(L)), sp.zeros(K, d))
    hh = (h1.T * h1)[0]
    form_w = Cs * ((1 - p1[A_] + p1[B_]) * hh + sum((-pw[t][A_] + pw[t][B_]) * (hw[t].T * h1)[0] for t in range(L)))
    form_l = Cs * (-(1 + p1[A_] - p1[B_]) * hh + sum((-pl[t][A_] + pl[t][B_]) * (hl[t].T * h1)[0] for t in range(L)))
    ok = sp.expand(frob(g_w, dtheta) - form_w) == 0 and sp.expand(frob(g_l, dtheta) - form_l) == 0
    return Proof("R20-A", "Setting A, oracle mask: A1 terms plus a suffix shift of no definite sign",
                 (sp.Eq(sp.Symbol("Delta_l_w"), form_w), sp.Eq(sp.Symbol("Delta_l_l"), form_l)),
                 (form_w, form_l), bool(ok))


def all_proofs() -> list[Proof]:
    """Every proof of this module, in order."""
    return [r19_guarantee(), r19_squared_norm_counterexample(), preconditioned_first_order(),
            preconditioned_regime_differs(), sign_descent_change(), normalized_under_preconditioning(),
            batch_first_order(), batch_flip_example(), r20_masked_update(), r20_setting_a_shift()]
