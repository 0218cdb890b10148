"""Group entanglement in SymPy (derived in this project; docs/theory.md, "Group entanglement", R22).

For G rollouts of one prompt with advantages A_i, lengths n_i and Gram K_ij = <g_i, g_j>, every
TRL GRPOTrainer loss type has, at the on-policy step (ratio 1), the gradient -sum_i w_i g_i:

    w_i = -dL/dl_{i,t}   (the same for every token t of rollout i)       `rollout_weight(loss_type)`
    Delta l_j ~ eta sum_i K_ji w_i                                        `first_order(G)`

The weights are obtained by differentiating each loss type's per-token loss at log-ratio 0 and
its aggregation (TRL 1.16 `_compute_loss`); this module does not import the numeric registry.
Proofs (each a `proofs.Proof` with a certificate): the group condition, G = 2 reduces to Condition 1, w^T K w >= 0,
a zero-variance group does not move, and the Adam-preconditioned form.

Example:
    >>> rollout_weight("grpo")
    A_i/(B*n_i)
    >>> bool(pair_reduction())
    True
"""
from __future__ import annotations

import functools

import sympy as sp

from .dynamics import first_order as pair_first_order
from .proofs import Proof
from .symbols import G_ll, G_wl, G_ww, eta

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")

A_i = sp.Symbol("A_i", real=True)                     # advantage of rollout i
n_i = sp.Symbol("n_i", positive=True)                 # its completion length
B = sp.Symbol("B", positive=True)                     # sequences in the micro-batch
N = sp.Symbol("N", positive=True)                     # dapo/cispo/vespo normaliser (num_items_in_batch rescaled)
S_n = sp.Symbol("Sigma_n", positive=True)             # sum of the lengths (bnpo)
L_max = sp.Symbol("L_max", positive=True)             # max_completion_length (dr_grpo)
eps_hi = sp.Symbol("epsilon_high", positive=True)
eps_lo = sp.Symbol("epsilon", positive=True)
tau = sp.Symbol("tau", positive=True)                 # SAPO temperature
x = sp.Symbol("x", real=True)                         # a token's log-ratio l_t - l_t^old

#: What each weight's symbols mean, for the rendered conditions.
SYMBOL_NOTES = {"A_i": "advantage", "n_i": "length of rollout i", "B": "sequences in the micro-batch",
                "N": "num_items_in_batch / processes x accumulation / steps_per_generation",
                "Sigma_n": "tokens in the micro-batch", "L_max": "max_completion_length",
                "epsilon_high": "CISPO's ratio cap"}


def _per_token(loss_type: str):
    """The per-token policy loss as a function of the token's log-ratio x (TRL 1.16, unclipped
    branch: at x = 0 the ratio 1 lies strictly inside [1 - epsilon, 1 + epsilon_high])."""
    c = sp.exp(x)
    if loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        return -c * A_i                                            # -min(c A, clip(c) A), both branches equal slope
    if loss_type == "sapo":
        return -sp.Function("sigma")(tau * (c - 1)) * 4 / tau * A_i
    if loss_type == "cispo":
        # -min(c, eps_high).detach() A l_t: the clamp is a constant; its value at c = 1 is min(1, eps_high)
        return -sp.Min(1, eps_hi) * A_i * x                        # d l_t = d x (old log-probs fixed)
    if loss_type == "vespo":
        return -1 * A_i * x                                        # phi(w) detached, phi(1) = e^lam 1^k e^-lam = 1
    raise ValueError(f"unknown group loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")


#: Coefficient of one token of rollout i in each aggregation (per micro-batch, one accumulation step).
_AGGREGATION = {"grpo": 1 / (B * n_i), "sapo": 1 / (B * n_i), "bnpo": 1 / S_n, "dr_grpo": 1 / (B * L_max),
                "dapo": 1 / N, "cispo": 1 / N, "vespo": 1 / N}


@functools.lru_cache(maxsize=None)
def rollout_weight(loss_type: str) -> sp.Expr:
    """w_i = -dL/dl_{i,t} at ratio 1, by differentiating the per-token loss and its aggregation."""
    if loss_type == "luspo":
        # sequence-level ratio exp(mean_t x_t) broadcast over the n_i tokens, summed, mean over B:
        # L_i = -(1/B) n_i A_i exp((x + sum_{s != t} x_s)/n_i); differentiate in one token's x at x = 0
        Li = -(n_i * A_i * sp.exp(x / n_i)) / B
        return sp.simplify(-sp.diff(Li, x).subs(x, 0))
    per = _per_token(loss_type)
    d = sp.diff(per, x).subs(x, 0)
    if loss_type == "sapo":   # sigma'(0) = 1/4: the soft gate has slope 1 at ratio 1
        s = sp.Symbol("s")
        d = d.subs(sp.Subs(sp.Derivative(sp.Function("sigma")(s), s), s, 0), sp.Rational(1, 4))
        d = d.replace(lambda e: isinstance(e, sp.Subs), lambda e: sp.Rational(1, 4))
    return sp.simplify(-_AGGREGATION[loss_type] * d)


def symbols_of(G: int):
    """(K symmetric G x G of symbols K_ij, w [G] symbols w_i)."""
    K = sp.Matrix(G, G, lambda i, j: sp.Symbol(f"K_{min(i, j) + 1}{max(i, j) + 1}", real=True))
    w = sp.Matrix([sp.Symbol(f"w_{i + 1}", real=True) for i in range(G)])
    return K, w


def first_order(G: int):
    """Delta l = eta K w for G rollouts (symbolic), with (K, w)."""
    K, w = symbols_of(G)
    return eta * K * w, K, w


def rises_condition(K, w, j: int):
    """Rollout j rises at first order iff this is > 0: w_j K_jj + sum_{i != j} w_i K_ji."""
    return sum(w[i] * K[j, i] for i in range(K.shape[0]))


def group_condition(n_correct: int = 2, n_incorrect: int = 2) -> Proof:
    """The group condition: with w_i = a_i > 0 on correct and w_i = -b_i < 0 on incorrect rollouts,
    Delta l_j / eta = w_j K_jj + sum_{i in C, i != j} w_i K_ji - sum_{i in I} |w_i| K_ji for every j, so a
    correct j rises iff its own and the other correct terms exceed the incorrect ones (and the mirror
    statement for an incorrect j)."""
    G = n_correct + n_incorrect
    d, K, w = first_order(G)
    a = [sp.Symbol(f"a_{i + 1}", positive=True) for i in range(n_correct)]
    b = [sp.Symbol(f"b_{i + 1}", positive=True) for i in range(n_incorrect)]
    sub = {w[i]: a[i] for i in range(n_correct)} | {w[n_correct + i]: -b[i] for i in range(n_incorrect)}
    ok = True
    for j in range(G):
        own = w[j].subs(sub) * K[j, j]
        pos = sum(a[i] * K[j, i] for i in range(n_correct) if i != j)
        neg = sum(b[i] * K[j, n_correct + i] for i in range(n_incorrect) if n_correct + i != j)
        ok &= sp.expand(d[j].subs(sub) / eta - (own + pos - neg)) == 0
        ok &= sp.expand(rises_condition(K, w, j).subs(sub) - (own + pos - neg)) == 0
    j0 = 0
    lhs = sp.expand(d[j0].subs(sub) / eta)
    return Proof("R22b-condition", "correct j rises iff w_j K_jj + sum_{C, i != j} w_i K_ji > sum_I |w_i| K_ji; "
                 "incorrect j falls iff the same sum is < 0", sp.Eq(lhs, lhs), lhs, bool(ok),
                 {"n_correct": n_correct, "n_incorrect": n_incorrect})


def pair_reduction() -> Proof:
    """G = 2, rewards r_1 > r_2, equal lengths: A = (a, -a) with a > 0 under every scale_rewards, so
    w = (c, -c) with c > 0 for every loss type, and Delta l = eta (c (K_11 - K_12), c (K_12 - K_22)):
    DPO's first-order changes with d_w = d_l = c, hence Condition 1."""
    r1, r2 = sp.symbols("r_1 r_2", real=True)
    mean = (r1 + r2) / 2
    std = sp.sqrt(((r1 - mean) ** 2 + (r2 - mean) ** 2) / (2 - 1))          # unbiased, G = 2
    a_group = (r1 - mean) / (std + sp.Rational(1, 10000))
    a2_group = (r2 - mean) / (std + sp.Rational(1, 10000))
    gap = sp.Symbol("delta_r", positive=True)                                # r_1 - r_2 > 0
    a = sp.simplify(a_group.subs(r1, r2 + gap))
    ok_antisym = sp.simplify(a2_group.subs(r1, r2 + gap) + a) == 0 and sp.simplify((r2 - mean).subs(r1, r2 + gap)
                                                                                  + (r1 - mean).subs(r1, r2 + gap)) == 0
    ok_pos = bool(a.is_positive) and bool((gap / 2).is_positive)             # "group"/"batch" and "none"
    d, K, w = first_order(2)
    n = sp.Symbol("n", positive=True)
    ok_types, cs = True, {}
    for lt in LOSS_TYPES:
        wi = rollout_weight(lt).subs({n_i: n, B: 2, S_n: 2 * n})
        c1, c2 = wi.subs(A_i, a), wi.subs(A_i, -a)
        cs[lt] = c1
        ok_types &= sp.simplify(c1 + c2) == 0 and bool(sp.simplify(c1.subs(eps_hi, sp.Min(1, eps_hi))).is_positive
                                                       if lt == "cispo" else c1.is_positive)
    c = sp.Symbol("c", positive=True)
    sub = {w[0]: c, w[1]: -c, K[0, 0]: G_ww, K[0, 1]: G_wl, K[1, 1]: G_ll}
    dcw, dcl, _, _ = pair_first_order(c, c)
    ok_eq = sp.expand(d[0].subs(sub) - dcw) == 0 and sp.expand(d[1].subs(sub) - dcl) == 0
    return Proof("R22b", "G = 2 with rewards (r_1 > r_2) and equal lengths is DPO's first order with d_w = d_l = c > 0 "
                 "(Condition 1)", sp.Eq(sp.Matrix([d[0].subs(sub), d[1].subs(sub)]), sp.Matrix([dcw, dcl])),
                 a, bool(ok_antisym and ok_pos and ok_types and ok_eq), {"c_per_loss_type": cs})


def mean_change_nonnegative(G: int = 3, P: int = 3) -> Proof:
    """sum_j w_j Delta l_j = eta w^T K w = eta |sum_i w_i g_i|^2 >= 0 for K = J J^T (J [G, P] real)."""
    J = sp.Matrix(G, P, lambda i, p: sp.Symbol(f"g_{i + 1}{p + 1}", real=True))
    _, w = symbols_of(G)
    K = J * J.T
    lhs = eta * (w.T * K * w)[0]
    cert = eta * sum((sum(w[i] * J[i, p] for i in range(G))) ** 2 for p in range(P))
    return Proof("R22c", "sum_j w_j Delta l_j = eta w^T K w >= 0 (the advantage-weighted log-likelihood never falls "
                 "at first order)", sp.Eq(lhs, cert), cert, sp.expand(lhs - cert) == 0 and bool(cert.is_nonnegative),
                 {"G": G, "P": P})


def zero_variance_no_change(G: int = 4) -> Proof:
    """All rewards equal => A = 0 under every scale_rewards => w = 0 for every loss type => Delta l = 0."""
    r = sp.Symbol("r", real=True)
    rewards = [r] * G
    mean = sum(rewards) / G
    As = [ri - mean for ri in rewards]                     # divided by std + 1e-4 > 0 or not: still 0
    ws = {lt: [rollout_weight(lt).subs(A_i, a) for a in As] for lt in LOSS_TYPES}
    d, K, w = first_order(G)
    ok = all(sp.simplify(a) == 0 for a in As) and all(sp.simplify(v) == 0 for vs in ws.values() for v in vs)
    ok = ok and all(sp.simplify(di.subs({w[i]: 0 for i in range(G)})) == 0 for di in d)
    return Proof("R22d", "a zero-variance group (all rewards equal) gives A = 0, w = 0 and no change", sp.Matrix(As),
                 d.subs({w[i]: 0 for i in range(G)}), bool(ok), {"G": G})


def adam_form(G: int = 2, P: int = 3) -> Proof:
    """A preconditioned step Delta theta = -eta P grad L, P = diag(p) (Adam: p = 1/(sqrt(v) + eps) > 0) gives
    Delta l = eta K^P w with K^P = J P J^T, and w^T K^P w = sum_p p_p (sum_i w_i J_ip)^2 >= 0."""
    J = sp.Matrix(G, P, lambda i, q: sp.Symbol(f"g_{i + 1}{q + 1}", real=True))
    p = sp.Matrix([sp.Symbol(f"p_{q + 1}", positive=True) for q in range(P)])
    Pm = sp.diag(*p)
    _, w = symbols_of(G)
    grad_L = -(J.T * w)
    dl = J * (-eta * Pm * grad_L)
    KP = J * Pm * J.T
    ok1 = sp.simplify(dl - eta * KP * w) == sp.zeros(G, 1)
    cert = sum(p[q] * sum(w[i] * J[i, q] for i in range(G)) ** 2 for q in range(P))
    ok2 = sp.expand((w.T * KP * w)[0] - cert) == 0 and bool(cert.is_nonnegative)
    return Proof("R22-Adam", "preconditioned step: Delta l = eta K^P w, K^P_ij = <g_i, P g_j>, w^T K^P w >= 0",
                 sp.Eq(dl, eta * KP * w), cert, bool(ok1 and ok2), {"G": G, "P": P})


def all_proofs() -> list[Proof]:
    """The group theorems of this module."""
    return [group_condition(), pair_reduction(), mean_change_nonnegative(), zero_variance_no_change(), adam_form()]


def conditions(loss_type: str) -> dict:
    """The group theory of one loss type as plain strings (for `entangle-sim conditions LOSS`)."""
    if loss_type not in LOSS_TYPES:
        raise ValueError(f"unknown group loss type {loss_type!r}; valid: {', '.join(LOSS_TYPES)}")
    wi = rollout_weight(loss_type)
    proofs = all_proofs()
    return {
        "loss": loss_type, "trl": f"GRPOTrainer(loss_type={loss_type!r})", "provenance": "derived in this project",
        "weight": f"w_i = {sp.sstr(wi)}",
        "symbols": {str(s): SYMBOL_NOTES.get(str(s), "") for s in sorted(wi.free_symbols, key=str)},
        "gradient": "grad L = -sum_i w_i g_i  (on-policy step: ratio 1, policy = reference)",
        "delta": "Delta l_j ~ eta sum_i K_ji w_i,  K_ji = <g_j, g_i>",
        "correct_rises": "A_j > 0 rises iff w_j K_jj + sum_{i in C, i != j} w_i K_ji > sum_{i in I} |w_i| K_ji",
        "incorrect_falls": "A_j < 0 falls iff |w_j| K_jj + sum_{i in I, i != j} |w_i| K_ji > sum_{i in C} w_i K_ji",
        "lazy_likelihood_displacement": "a correct rollout whose gradient overlaps the incorrect ones' "
                                        "(shared tokens) fails 'correct rises'",
        "pair_case": "G = 2, rewards (1, 0), equal lengths: w = (c, -c), c > 0: Delta l_1 = eta c (K_11 - K_12), "
                     "Delta l_2 = eta c (K_12 - K_22): Condition 1",
        "mean_change": "sum_j w_j Delta l_j = eta w^T K w >= 0",
        "zero_variance": "all rewards equal: A = 0, w = 0, no change",
        "adam": "K -> K^P_ij = <g_i, P g_j>, P = diag(1/(sqrt(v_hat) + eps))",
        "proofs": {pr.result: pr.holds for pr in proofs},
    }


def conditions_text(d: dict) -> str:
    """The readable block of `conditions(loss_type)`."""
    proved = lambda key: " [proved]" if d["proofs"].get(key) else " [NOT proved]"  # noqa: E731
    sym = ", ".join(f"{k}: {v}" for k, v in d["symbols"].items() if v)
    return "\n".join([
        f"{d['loss']}  ({d['trl']}; group theory, {d['provenance']})",
        f"  weight           {d['weight']}" + (f"   ({sym})" if sym else ""),
        f"  gradient         {d['gradient']}",
        f"  change           {d['delta']}",
        f"  correct rises    {d['correct_rises']}" + proved("R22b-condition"),
        f"  incorrect falls  {d['incorrect_falls']}",
        f"  lazy likelihood displacement: {d['lazy_likelihood_displacement']}",
        f"  pair case        {d['pair_case']}" + proved("R22b"),
        f"  mean change      {d['mean_change']}" + proved("R22c"),
        f"  zero variance    {d['zero_variance']}" + proved("R22d"),
        f"  Adam             {d['adam']}" + proved("R22-Adam"),
    ])
