"""General theorems of the first-order theory, each with a machine-checked certificate.

Every proof parametrises a Gram matrix by the gradient norms a = |g_w| > 0, b = |g_l| > 0 and the
cosine c (|c| <= 1): G_ww = a^2, G_ll = b^2, G_wl = a b c. Cauchy-Schwarz is then the statement
c <= 1, encoded as c = 1 - e with e >= 0 (or 1 - c^2 = k >= 0). A certificate is an identity
`expand(lhs - rhs) == 0` plus a right-hand side whose sign SymPy derives from the assumptions
alone; `Proof.holds` is True only if both checks pass.

Example:
    >>> from entangle_sim.symbolic import proofs
    >>> bool(proofs.no_fourth_regime())
    True
"""
from __future__ import annotations

import dataclasses
from typing import Any

import sympy as sp

from .dynamics import first_order
from .symbols import G_ll, G_wl, G_ww, eta

a, b = sp.symbols("a b", positive=True)           # |g_w|, |g_l|
c = sp.Symbol("c", real=True)                      # cos(g_w, g_l)
e = sp.Symbol("e", nonnegative=True)               # 1 - c >= 0  (Cauchy-Schwarz)
k = sp.Symbol("k", nonnegative=True)               # 1 - c^2 >= 0
dw, dl = sp.symbols("d_w d_l", nonnegative=True)   # incentives, in the regime d >= 0
s = sp.Symbol("s", positive=True)                  # step weight -m'(z)
hw, hl = sp.symbols("h'_w h'_l", positive=True)    # derivatives of the transforms
lam = sp.Symbol("lambda", positive=True)           # NLL weight
z_w, z_l = sp.symbols("z_w z_l", real=True)        # dz/dl_w, dz/dl_l

GRAM = {G_ww: a**2, G_ll: b**2, G_wl: a * b * c}


@dataclasses.dataclass(frozen=True)
class Proof:
    """A checked statement: `identity` expands to 0 and `certificate` has the claimed sign."""

    result: str
    statement: str
    identity: Any
    certificate: Any
    holds: bool
    details: dict = dataclasses.field(default_factory=dict)

    def __bool__(self) -> bool:
        return self.holds

    def _repr_latex_(self) -> str:
        return f"**{self.result}** {self.statement}: $\\displaystyle {sp.latex(self.certificate)}$"

    def as_dict(self) -> dict:
        return {"result": self.result, "statement": self.statement, "holds": self.holds,
                "certificate": str(self.certificate), **{k: str(v) for k, v in self.details.items()}}


def _is_zero(x) -> bool:
    return sp.expand(x) == 0


def no_fourth_regime() -> Proof:
    """R5: with d_w, d_l >= 0, 'chosen down and rejected up' is impossible.

    Certificate: Delta l_w / |g_w| - Delta l_l / |g_l| = eta (1 - cos)(d_w |g_w| + d_l |g_l|) >= 0,
    so Delta l_w < 0 forces Delta l_l < 0 as well.
    """
    dcw, dcl, _, _ = first_order(dw, dl)
    lhs = (dcw / a - dcl / b).subs(GRAM)
    cert = eta * (1 - c) * (a * dw + b * dl)
    identity = sp.simplify(lhs - cert)
    cert_e = cert.subs(c, 1 - e)
    holds = identity == 0 and bool(cert_e.is_nonnegative)
    return Proof("R5", "no 'chosen down, rejected up' regime when d_w, d_l >= 0",
                 sp.Eq(lhs, cert), cert_e, holds, {"note": "normalised changes: dl_w/|g_w| >= dl_l/|g_l|"})


def dpo_margin_grows() -> Proof:
    """R6: for d_w = d_l = d >= 0, Delta(l_w - l_l) = eta d |g_w - g_l|^2 >= 0."""
    d = sp.Symbol("d", nonnegative=True)
    _, _, dm, _ = first_order(d, d)
    lhs = dm.subs(GRAM)
    cert = eta * d * ((a - b) ** 2 + 2 * a * b * e)
    identity = sp.expand(lhs.subs(c, 1 - e) - cert)
    return Proof("R6", "the DPO margin always grows: eta C |g_w - g_l|^2", sp.Eq(dm, eta * d * (
        G_ww - 2 * G_wl + G_ll)), cert, identity == 0 and bool(cert.is_nonnegative))


def common_differential() -> Proof:
    """R7: Delta l_{w,l} = (C/2)[(G_ww - G_ll) +/- |g_w - g_l|^2] for d_w = d_l (C = eta d)."""
    d = sp.Symbol("d", nonnegative=True)
    dcw, dcl, _, _ = first_order(d, d)
    C = eta * d
    N = G_ww - 2 * G_wl + G_ll
    common = C / 2 * (G_ww - G_ll)
    ok = _is_zero(dcw - (common + C / 2 * N)) and _is_zero(dcl - (common - C / 2 * N))
    return Proof("R7", "common-mode / differential-mode decomposition", sp.Eq(dcw, common + C / 2 * N),
                 sp.Eq(dcl, common - C / 2 * N), ok,
                 {"both_fall_iff": "G_ll - G_ww > |g_w - g_l|^2", "both_rise_iff": "G_ww - G_ll > |g_w - g_l|^2"})


def transformed_margin_grows() -> Proof:
    """R8: for L = m(z) with s = -m'(z) >= 0, Delta z = eta s |z_w g_w + z_l g_l|^2 >= 0.

    (d_w = s z_w, d_l = -s z_l.) Certificate: the quadratic form is (z_w a + z_l b c)^2 + z_l^2 b^2 (1 - c^2).
    """
    s0 = sp.Symbol("s", nonnegative=True)
    dcw, dcl, _, _ = first_order(s0 * z_w, -s0 * z_l)
    dz = (z_w * dcw + z_l * dcl).subs(GRAM)
    quad = (z_w * a + z_l * b * c) ** 2 + z_l**2 * b**2 * (1 - c**2)
    identity = sp.expand(dz - eta * s0 * quad)
    cert = eta * s0 * ((z_w * a + z_l * b * c) ** 2 + z_l**2 * b**2 * k)
    return Proof("R8", "the transformed margin z grows when s >= 0", sp.Eq(dz, eta * s0 * quad), cert,
                 identity == 0 and bool(cert.is_nonnegative), {"loss_change": "Delta L = -eta |grad L|^2 <= 0"})


def general_condition() -> Proof:
    """R9: with d = s h' (s, h' > 0): chosen rises <=> G_wl <= (h'_w/h'_l) G_ww, rejected falls <=>
    G_wl <= (h'_l/h'_w) G_ll; the thresholds' geometric mean is |g_w||g_l| >= G_wl, so at most one fails."""
    dcw, dcl, _, _ = first_order(s * hw, s * hl)
    t_w, t_l = hw / hl, hl / hw
    ok1 = _is_zero(dcw - eta * s * hl * (t_w * G_ww - G_wl))
    ok2 = _is_zero(dcl + eta * s * hw * (t_l * G_ll - G_wl))
    gm = sp.sqrt(sp.expand((t_w * G_ww * t_l * G_ll).subs(GRAM)))
    ok3 = sp.simplify(gm - a * b) == 0
    return Proof("R9", "general condition with thresholds h'_w/h'_l and h'_l/h'_w",
                 (sp.Le(G_wl, t_w * G_ww), sp.Le(G_wl, t_l * G_ll)), sp.Eq(gm, a * b), ok1 and ok2 and ok3,
                 {"chosen_threshold": t_w, "rejected_threshold": t_l})


def raw_margin() -> Proof:
    """R10: Delta(l_w - l_l) = eta s [h'_w G_ww + h'_l G_ll - (h'_w + h'_l) G_wl]; >= 0 when h'_w = h'_l,
    negative at an explicit state when h'_w != h'_l; every inequality flips for s < 0."""
    _, _, dm, _ = first_order(s * hw, s * hl)
    form = eta * s * (hw * G_ww + hl * G_ll - (hw + hl) * G_wl)
    ok_form = _is_zero(dm - form)
    # Equal h': the DPO certificate.
    h = sp.Symbol("h", positive=True)
    eq = sp.expand(form.subs({hw: h, hl: h}).subs(GRAM).subs(c, 1 - e))
    eq_cert = eta * s * h * ((a - b) ** 2 + 2 * a * b * e)
    ok_eq = _is_zero(eq - eq_cert) and bool(eq_cert.is_nonnegative)
    # Unequal h' (e.g. SimPO with n_w = 10 n_l): a state where the raw margin falls.
    point = {hw: sp.Rational(1, 10), hl: 1, a: 2, b: 1, c: sp.Rational(99, 100), eta: 1, s: 1}
    counter = form.subs(GRAM).subs(point)
    # s < 0 (IPO past its target): Delta z = eta s |.|^2 <= 0.
    s_neg = sp.Symbol("s", negative=True)
    flipped = (eta * s_neg * ((z_w * a + z_l * b * c) ** 2 + z_l**2 * b**2 * k))
    ok = ok_form and ok_eq and counter < 0 and bool(flipped.is_nonpositive)
    return Proof("R10", "raw margin change; guaranteed growth only for h'_w = h'_l; flip for s < 0",
                 sp.Eq(dm, form), eq_cert, ok,
                 {"counterexample": {str(k_): v for k_, v in point.items()}, "counterexample_value": counter,
                  "delta_z_when_s_negative": flipped})


def nll_thresholds() -> Proof:
    """R11: adding -lambda l_w gives d_w = s h'_w + lambda; thresholds (s h'_w + lambda)/(s h'_l) for
    'chosen rises' (grows with lambda) and s h'_l/(s h'_w + lambda) for 'rejected falls' (shrinks)."""
    d_w_nll = s * hw + lam
    dcw, dcl, _, _ = first_order(d_w_nll, s * hl)
    t_w = d_w_nll / (s * hl)
    t_l = s * hl / d_w_nll
    ok1 = _is_zero(dcw - eta * s * hl * (t_w * G_ww - G_wl))
    ok2 = sp.simplify(dcl + eta * d_w_nll * (t_l * G_ll - G_wl)) == 0
    mono = sp.diff(t_w, lam).is_positive and sp.diff(t_l, lam).is_negative
    return Proof("R11", "NLL regulariser relaxes 'chosen rises' and tightens 'rejected falls'",
                 (sp.Le(G_wl, t_w * G_ww), sp.Le(G_wl, t_l * G_ll)), (sp.diff(t_w, lam), sp.diff(t_l, lam)),
                 bool(ok1 and ok2 and mono), {"chosen_threshold": t_w, "rejected_threshold": t_l})


def fourth_regime_with_negative_incentive() -> Proof:
    """When an incentive can be negative (IPO past target, nca_pair, apo_down, ...), the fourth
    regime becomes reachable: an explicit state with d_w < 0 and Delta l_w < 0 < Delta l_l."""
    dws, dls = sp.Symbol("d_w", real=True), sp.Symbol("d_l", real=True)
    dcw, dcl, _, _ = first_order(dws, dls)
    point = {dws: -1, dls: -1, G_ww: 1, G_ll: 1, G_wl: 0, eta: 1}
    v = (dcw.subs(point), dcl.subs(point))
    return Proof("R5'", "the fourth regime with negative incentives", point, v, bool(v[0] < 0 < v[1]))


def all_proofs() -> list[Proof]:
    """Every general proof of this module, in result order."""
    return [no_fourth_regime(), dpo_margin_grows(), common_differential(), transformed_margin_grows(),
            general_condition(), raw_margin(), nll_thresholds(), fourth_regime_with_negative_incentive()]
