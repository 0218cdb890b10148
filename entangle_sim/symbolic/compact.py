"""Compact, readable forms of a derivation in named symbols, each proved equal to the raw one.

Every margin-form loss is written as

    L = m(z) (+ NLL),   z = h_w(l_w) - h_l(l_l),   s = -m'(z),   h'_w = dz/dl_w,   h'_l = -dz/dl_l
    d_w = s h'_w (+ NLL weight on l_w),   d_l = s h'_l,
    chosen rises  <=> G_wl <= t_w G_ww,   rejected falls <=> G_wl <= t_l G_ll,

with the named symbols r_w = l_w - l^ref_w, r_l (log-ratios), l_w/n_w (averages), p_w = exp(l_w/n_w)
(per-token probability), z, s, h'_w, h'_l. The thresholds are printed as the shortest of three
candidates (in s and h'; in s with h' written out; fully written out), each reduced by targeted
simplifiers (`cancel`, `factor`, a case split of Heaviside steps), never a blanket `simplify`.
A loss that is not of margin form keeps its two incentives, printed in the same symbols.

Every compact expression is checked against the raw derivation by substituting the definitions
back: `CompactForm.checks` records, per item, "symbolic" (the difference reduces to 0) or the
float64 agreement at 1,000 random states where SymPy cannot reduce it.

The printers are `entangle_sim.symbolic.printing`; the `conditions` text block and the
registry-wide table are `entangle_sim.symbolic.present`.

Example:
    >>> from entangle_sim import losses
    >>> from entangle_sim.symbolic import derive
    >>> c = derive(losses.get("dpop")).compact
    >>> c.text("t_w")
    '1 + lambda_p if r_w < 0, else 1'
    >>> derive(losses.get("orpo")).compact.text("h_w")
    '1/(n_w*(1 - p_w))'
"""
from __future__ import annotations

import dataclasses
import itertools
from typing import Any

import numpy as np
import sympy as sp
from sympy.codegen.cfunctions import expm1

from .functions import Log1mExp, LogSigmoid, Sigmoid, lambdify_numpy, to_exp
from .states import sample_states
from .printing import latex, text  # noqa: F401 - re-exported: compact.text / compact.latex
from .symbols import (PAIR_VARS, NAMED, ell_l, ell_l_ref, ell_w, ell_w_ref, h_l, h_w, n_l, n_w,  # noqa: F401
                      p_l, p_w, r_l, r_w, s, z)

class NotCompact(ValueError):
    """The named-symbol rewriting does not apply to this loss (its raw forms are shown instead)."""


#: What `Derivation.compact` turns into the raw-form fallback: this module's refusal and SymPy's
#: "cannot do this" errors. Anything else is a bug and propagates.
NOT_COMPACT = (NotCompact, NotImplementedError, sp.polys.polyerrors.BasePolynomialError)

_STATE = frozenset(PAIR_VARS.values())
ITEMS = ("m", "nll", "z", "s", "h_w", "h_l", "d_w", "d_l", "t_w", "t_l")
LABELS = {"m": "m(z)", "nll": "NLL", "z": "z", "s": "s = -m'(z)", "h_w": "h'_w = dz/dl_w",
          "h_l": "h'_l = -dz/dl_l", "d_w": "d_w", "d_l": "d_l", "t_w": "t_w", "t_l": "t_l"}
N_CHECK = 1000   # random states for the float64 agreement check
RTOL = 1e-9      # relative agreement required: float64 round-off of these formulas is ~1e-14


def _is_state_free(e) -> bool:
    return not (e.free_symbols & _STATE)


# ---------------------------------------------------------------------------------------------
# Rewriting a raw expression (in l_w, l^ref_w, ...) into the named symbols


def _affine_in(e, zr):
    """(c, d) with e == c*zr + d and c, d free of state variables, else None."""
    for v in (ell_w, ell_l):
        dz = sp.diff(zr, v)
        if dz != 0:
            break
    else:
        return None
    c = sp.cancel(sp.diff(e, v) / dz)
    if c == 0 or not _is_state_free(c):
        return None
    d = sp.expand(e - c * zr)
    if not _is_state_free(d):
        d = sp.cancel(to_exp(d))
        if not _is_state_free(d):
            return None
    return c, d


def replace_margin(e, zr):
    """Replace, top-down, every subexpression affine in the raw margin zr by c z + d."""
    if zr is None or _is_state_free(e) or e.is_Atom:
        return e
    if e.is_Add or e.is_Mul:
        hit = _affine_in(e, zr)
        if hit is not None:
            return hit[0] * z + hit[1]
    return e.func(*[replace_margin(a, zr) for a in e.args])


def _ratio_sub(e, uses_reference: bool):
    """l_w -> r_w + l^ref_w (if the loss has a reference); kept only if every l^ref cancels."""
    if not uses_reference:
        return e
    out = sp.expand(e.xreplace({ell_w: r_w + ell_w_ref, ell_l: r_l + ell_l_ref}), mul=False, multinomial=False,
                    power_exp=False, log=False, deep=True)
    out = out.replace(lambda a: isinstance(a, sp.Function), lambda a: a.func(*[sp.expand(x) for x in a.args]))
    if out.free_symbols & {ell_w_ref, ell_l_ref}:
        return e
    return out


def _prob_sub(e):
    """exp(l/n) -> p: expm1(-l/n) = 1/p - 1, log(1 - exp(l/n)) = log(1 - p), exp(+-l/n) = p^{+-1}."""
    rep = {}
    for f in e.atoms(expm1, Log1mExp, sp.exp):
        a = f.args[0]
        for ell, n, p in ((ell_w, n_w, p_w), (ell_l, n_l, p_l)):
            k = sp.cancel(a / (ell / n))
            if k in (1, -1):
                val = p ** k
                rep[f] = val - 1 if isinstance(f, expm1) else sp.log(1 - val) if isinstance(f, Log1mExp) else val
    return e.xreplace(rep) if rep else e


def _merge_exp(e):
    """exp(a) exp(b) -> exp(a + b), then exp(log sigma(x) + y) -> sigma(x) exp(y)."""
    e = sp.powsimp(e, combine="exp")

    def split(f):
        terms = sp.Add.make_args(f.args[0])
        logs = [a for a in terms if isinstance(a, LogSigmoid)]
        rest = [a for a in terms if not isinstance(a, LogSigmoid)]
        return sp.Mul(*[Sigmoid(a.args[0]) for a in logs]) * sp.exp(sp.Add(*rest))

    return e.replace(lambda f: isinstance(f, sp.exp) and any(
        isinstance(a, LogSigmoid) for a in sp.Add.make_args(f.args[0])), split)


def to_named(e, zr=None, uses_reference=True):
    """A raw expression in the named symbols (z where zr is given)."""
    e = _merge_exp(e)
    e = replace_margin(e, zr)
    e = _ratio_sub(e, uses_reference)
    return _prob_sub(e)


def back_substitution(zr, sr, hwr, hlr) -> dict:
    """Named symbol -> raw expression (to check a compact form against the raw derivation)."""
    back = {r_w: ell_w - ell_w_ref, r_l: ell_l - ell_l_ref, p_w: sp.exp(ell_w / n_w), p_l: sp.exp(ell_l / n_l)}
    for sym, val in ((z, zr), (s, sr), (h_w, hwr), (h_l, hlr)):
        if val is not None:
            back[sym] = val
    return back


# ---------------------------------------------------------------------------------------------
# Targeted simplifiers


def _tidy_p(e):
    """Write factors (p - 1)^k as (1 - p)^k (their sign is then visible: p = exp(l/n) <= 1)."""
    e = sp.factor_terms(e)
    for p in (p_w, p_l):
        e = e.replace(lambda a: a.is_Pow and a.base == p - 1 and a.exp.is_integer,
                      lambda a: (-1) ** a.exp * sp.Pow(1 - p, a.exp, evaluate=False))
        e = e.replace(lambda a: a == p - 1, lambda a: -sp.Add(1, -p, evaluate=False))
    return e


def _absorb_minus(e):
    """-c (a - b) -> c (b - a): the same value, read without a leading minus."""
    if e.is_Atom:
        return e
    e = e.func(*[_absorb_minus(a) for a in e.args])
    if e.is_Mul:
        coeff, rest = e.as_coeff_Mul()
        adds = [a for a in sp.Mul.make_args(rest) if a.is_Add]
        if coeff < 0 and len(adds) == 1:
            others = [a for a in sp.Mul.make_args(rest) if a is not adds[0]]
            return sp.Mul(-coeff, *others, -adds[0])
    return e


def _candidates(e):
    yield sp.factor(sp.cancel(e))
    yield sp.factor(e)
    yield e
    yield sp.cancel(e)
    yield sp.expand(e)
    if e.is_Add:
        yield sp.Add(*[sp.factor(a) for a in e.args])


def shortest(e):
    """The shortest printed of a few standard reductions of e (cancel, factor, expand)."""
    if e is None:
        return None
    if e.atoms(sp.Heaviside):
        return cases(e)
    best = None
    for cand in _candidates(e):
        for c in (cand, _tidy_p(cand), _absorb_minus(cand), _absorb_minus(_tidy_p(cand))):
            if best is None or len(text(c)) < len(text(best)):
                best = c
    return best


def _cond(arg, positive: bool):
    rel = (arg > 0) if positive else (arg < 0)
    if isinstance(rel, sp.Rel):
        syms = [x for x in rel.free_symbols if x in (z, r_w, r_l)]
        if len(syms) == 1 and sp.Poly(arg, syms[0]).degree() == 1:
            x = syms[0]
            a = sp.diff(arg, x)
            root = sp.cancel(x - arg / a)
            up = positive == bool(a.is_positive)
            rel = (x > root) if up else (x < root)
    return rel


def cases(e):
    """Heaviside steps split into cases: a Piecewise whose pieces are `shortest` (no steps left)."""
    steps = sorted(e.atoms(sp.Heaviside), key=sp.default_sort_key)
    if not steps:
        return shortest(e)
    pieces = []
    for vals in itertools.product((1, 0), repeat=len(steps)):
        val = sp.cancel(e.xreplace(dict(zip(steps, vals))))
        cond = sp.And(*[_cond(h.args[0], v == 1) for h, v in zip(steps, vals)])
        if cond is sp.false:
            continue
        val = sp.nan if val.has(sp.zoo, sp.nan, sp.oo) else shortest(val)
        for i, (v0, c0) in enumerate(pieces):
            if v0 == val or (v0 is sp.nan and val is sp.nan):
                pieces[i] = (v0, sp.Or(c0, cond))
                break
        else:
            pieces.append((val, cond))
    if len(pieces) == 1:
        return pieces[0][0]
    pieces[-1] = (pieces[-1][0], True)
    return sp.Piecewise(*pieces)


# ---------------------------------------------------------------------------------------------
# The compact form of one derivation


@dataclasses.dataclass(frozen=True, eq=False)
class CompactForm:
    """Named-symbol forms of one loss's derivation (SymPy; `text(item)`, `latex(item)`).

    items: m, nll, z, s, h_w, h_l (margin form only), d_w, d_l, t_w, t_l. `checks[item]` says how the
    item was proved equal to the raw derivation.
    """

    loss_name: str
    margin_form: bool
    exprs: dict[str, Any]
    checks: dict[str, str]
    uses_reference: bool

    def __getitem__(self, item):
        return self.exprs.get(item)

    def text(self, item: str) -> str:
        return text(self.exprs.get(item))

    def latex(self, item: str) -> str:
        return latex(self.exprs.get(item))

    @property
    def symbols_used(self) -> str:
        """The definitions of the named symbols that appear in the printed forms."""
        used = set()
        for e in self.exprs.values():
            if e is not None:
                used |= {str(x) for x in e.free_symbols}
        out = []
        if used & {"r_w", "r_l"}:
            out.append("r = l - l_ref (log-ratio)")
        if used & {"p_w", "p_l"}:
            out.append("p = exp(l/n) (per-token probability)")
        return "; ".join(out)

    def as_dict(self, latex_: bool = False) -> dict[str, Any]:
        fmt = self.latex if latex_ else self.text
        return {"margin_form": self.margin_form, **{k: fmt(k) for k in ITEMS if self.exprs.get(k) is not None},
                "checks": dict(self.checks)}


def _agree(compact, raw, back, n=N_CHECK, seed=0) -> str:
    """'symbolic' if compact(back) - raw reduces to 0, else float64 agreement at n states (raises)."""
    full = compact.xreplace(back) if not isinstance(compact, sp.Piecewise) else compact.subs(back)
    if isinstance(full, sp.Piecewise) or full.has(sp.Piecewise):
        diff = None
    else:
        diff = full - raw
        if diff == 0 or sp.cancel(diff) == 0:
            return "symbolic"
        try:
            if sp.cancel(sp.expand(to_exp(diff))) == 0:
                return "symbolic"
            if sp.cancel(sp.expand_log(sp.expand(to_exp(diff)), force=True)) == 0:
                return "symbolic"
        except Exception:  # noqa: BLE001 - fall back to the numeric check
            pass
    free = sorted((full.free_symbols | raw.free_symbols), key=str)
    rng = np.random.default_rng(seed)
    vals = sample_states(free, n, rng)
    # Keep l away from 0 (p = 1, where ORPO's forms are undefined) and from l < -300, where
    # p = exp(l/n) can be a float64 denormal (a check of the arithmetic, not of the algebra).
    for v in free:
        if str(v).startswith("ell"):
            x = vals[v]  # redraw (not clip: clipping would create exact ties of steps)
            vals[v] = np.minimum(np.where(x < -300.0, -rng.uniform(1.0, 300.0, n), x), -1e-3)
    args = [vals[v] for v in free]
    with np.errstate(all="ignore"):
        a = np.broadcast_to(np.asarray(lambdify_numpy(free, full)(*args), dtype=float), (n,))
        b = np.broadcast_to(np.asarray(lambdify_numpy(free, raw)(*args), dtype=float), (n,))
    ok = np.isfinite(a) & np.isfinite(b)
    if ok.sum() < n // 2:
        raise NotCompact(f"compact form check: only {ok.sum()} finite states of {n}")
    err = float(np.max(np.abs(a[ok] - b[ok]) / (1 + np.abs(b[ok]))))
    if not err <= RTOL:
        raise NotCompact(f"compact form differs from the raw derivation: max rel err {err:.3g}\n"
                             f"  compact: {compact}\n  raw: {raw}")
    return f"float64 at {int(ok.sum())} states, max rel err {err:.1e}"


def build(spec, der, hp: dict) -> CompactForm:
    """The compact form of derivation `der` of loss `spec` (called by `Derivation.compact`)."""
    from .symbols import PAIR_VARS as PV

    uses_ref = bool(spec.uses_reference)
    L = der.loss.expr
    dw_raw, dl_raw = der.d_w.expr, der.d_l.expr
    zr = der.margin.expr if der.margin is not None else None
    ex: dict[str, Any] = {}
    checks: dict[str, str] = {}
    margin_form = zr is not None and der.step_weight is not None
    nll_raw = spec.symbolic_nll(**hp) if margin_form else sp.S.Zero

    if margin_form:
        hwr = sp.diff(zr, PV["chosen_logps"])
        hlr = -sp.diff(zr, PV["rejected_logps"])
        sr = der.step_weight.expr
        back = back_substitution(zr, sr, hwr, hlr)
        s_named = shortest(to_named(sr, zr, uses_ref))
        margin_part = L - nll_raw
        m_named = to_named(margin_part, zr, uses_ref)
        if not _is_state_free(m_named.subs(z, 0)) and _is_state_free(s_named) and not s_named.has(z):
            # m is linear (s constant, e.g. paired KTO): m(z) = -s z + (L + s z_raw), a constant.
            m_named = -s_named * z + sp.simplify(to_exp(margin_part + s_named * zr))
        ex["m"] = shortest(m_named) if _is_state_free(m_named) else None
        if ex["m"] is not None:  # s = -m'(z) read off m: shorter than the raw quotient
            s_from_m = shortest(-sp.diff(_unpiece(ex["m"]), z))
            if len(text(s_from_m)) < len(text(s_named)):
                s_named = s_from_m
        ex["nll"] = None if nll_raw == 0 else shortest(to_named(nll_raw, None, uses_ref))
        ex["z"] = _margin_display(to_named(zr, None, uses_ref))
        ex["s"] = s_named
        ex["h_w"] = shortest(to_named(hwr, zr, uses_ref))
        ex["h_l"] = shortest(to_named(hlr, zr, uses_ref))
        nll_w = to_named(-sp.diff(nll_raw, PV["chosen_logps"]), None, uses_ref)
        nll_l = to_named(sp.diff(nll_raw, PV["rejected_logps"]), None, uses_ref)
        ex["d_w"] = s * h_w + nll_w
        ex["d_l"] = s * h_l + nll_l
        # Thresholds: three levels of writing out, the shortest printed one wins.
        subs_h = {h_w: ex["h_w"], h_l: ex["h_l"]}
        subs_all = {**subs_h, s: ex["s"]}
        tw = {}
        for name, num, den in (("t_w", ex["d_w"], ex["d_l"]), ("t_l", ex["d_l"], ex["d_w"])):
            if den == 0:
                tw[name] = None
                continue
            cands = [sp.cancel(num / den)]
            for sub in (subs_h, subs_all):
                cands.append(shortest(sp.cancel(sp.piecewise_fold(num.subs(sub)) / den.subs(sub)))
                             if not (num.subs(sub).has(sp.Piecewise) or den.subs(sub).has(sp.Piecewise))
                             else shortest(_unpiece(num.subs(sub)) / _unpiece(den.subs(sub))))
            if num.is_Add:  # h'_w/h'_l + 1/(...): one fraction per term of the numerator
                cands.insert(1, sp.Add(*[shortest(sp.cancel(a / den)) for a in num.args]))
            cands.insert(1, num / den)
            tw[name] = _prefer_written_out(cands)
        ex.update(tw)
        for k in ("m", "nll", "z", "s", "h_w", "h_l"):
            raw = {"m": None, "nll": nll_raw, "z": zr, "s": sr, "h_w": hwr, "h_l": hlr}[k]
            if k == "m" and ex["m"] is not None:
                checks[k] = _agree(ex["m"].subs(z, zr) if not isinstance(ex["m"], sp.Piecewise) else ex["m"],
                                   margin_part, back)
            elif ex.get(k) is not None and raw is not None:
                checks[k] = _agree(ex[k], raw, back)
        checks["d_w"] = _agree(ex["d_w"], dw_raw, back)
        checks["d_l"] = _agree(ex["d_l"], dl_raw, back)
    else:
        back = back_substitution(None, None, None, None)
        ex["d_w"] = shortest(to_named(dw_raw, None, uses_ref))
        ex["d_l"] = shortest(to_named(dl_raw, None, uses_ref))
        for name, num, den in (("t_w", ex["d_w"], ex["d_l"]), ("t_l", ex["d_l"], ex["d_w"])):
            ex[name] = None if den == 0 else shortest(_unpiece(num) / _unpiece(den))
        if ex["t_w"] is not None and ex["t_l"] is not None and not ex["t_w"].has(sp.Piecewise):
            inv = sp.Pow(ex["t_w"], -1, evaluate=False)  # t_l = 1/t_w, often shorter
            if len(text(inv)) < len(text(ex["t_l"])):
                ex["t_l"] = inv
        checks["d_w"] = _agree(ex["d_w"], dw_raw, back)
        checks["d_l"] = _agree(ex["d_l"], dl_raw, back)
    for k, raw in (("t_w", der.chosen_threshold), ("t_l", der.rejected_threshold)):
        if ex.get(k) is not None and raw is not None:
            checks[k] = _agree(ex[k], raw, back)
    return CompactForm(spec.name, margin_form, ex, checks, uses_ref)


def _margin_display(e):
    """z as h_w - h_l; with p = exp(l/n) present, l/n = log p and each side's logs combined
    (ORPO: z = log(p_w/(1 - p_w)) - log(p_l/(1 - p_l)), the log odds ratio)."""
    best = shortest(e)
    if e.free_symbols & {p_w, p_l}:
        e2 = sp.expand(e.xreplace({ell_w: n_w * sp.log(p_w), ell_l: n_l * sp.log(p_l)}))
        side_w = sp.Add(*[a for a in sp.Add.make_args(e2) if a.free_symbols & {p_w}])
        side_l = -sp.Add(*[a for a in sp.Add.make_args(e2) if a.free_symbols & {p_l}])
        rest = e2 - side_w + side_l
        cand = sp.Add(sp.logcombine(side_w, force=True), -sp.logcombine(side_l, force=True), rest)
        if len(text(cand)) <= len(text(best)) + 4:
            best = cand
    return best


SHORT = 40  # a threshold up to this many characters is printed fully written out


def _prefer_written_out(cands):
    """The most written-out candidate (last) that is short, else the shortest (first on ties);
    cases (a Piecewise) may be twice as long: they say where each value holds."""
    for c in reversed(cands):
        if len(text(c)) <= SHORT * (2 if isinstance(c, sp.Piecewise) else 1):
            return c
    return min(cands, key=lambda c: len(text(c)))


def raw_form(der, why: str) -> CompactForm:
    """Fallback: the raw incentives and thresholds (no named symbols), with the reason."""
    ex = {"d_w": der.d_w.expr, "d_l": der.d_l.expr, "t_w": der.chosen_threshold, "t_l": der.rejected_threshold}
    return CompactForm(der.loss_name, False, ex, {k: why for k in ex}, True)


def _unpiece(e):
    """A Piecewise produced by `cases` back to Heaviside form (for further arithmetic)."""
    if not e.has(sp.Piecewise):
        return e
    return e.replace(lambda a: isinstance(a, sp.Piecewise), _pw_to_heaviside)


def _pw_to_heaviside(pw):
    (a, c1), (b, _) = pw.args[0], pw.args[-1]
    if len(pw.args) != 2 or not isinstance(c1, sp.Rel):
        raise NotCompact(f"cannot turn {pw} back into steps")
    step = sp.Heaviside(c1.gts - c1.lts) if c1.rel_op in (">", ">=") else sp.Heaviside(c1.gts - c1.lts)
    return b + (a - b) * step


# ---------------------------------------------------------------------------------------------
# Sign proofs in the named symbols (e.g. ORPO: 1 + 1/expm1(-l/n) = 1/(1 - p) > 0 for l < 0)


def prove_nonnegative(expr) -> str | None:
    """A short proof that a raw incentive is >= 0 for l_w, l_l < 0, by writing it in p = exp(l/n)
    and p = 1/(1 + v) with v > 0 (p in (0, 1)); None if SymPy cannot see the sign that way."""
    e = _prob_sub(expr)
    if not (e.free_symbols & {p_w, p_l}):
        return None
    v = {p: sp.Symbol(f"v_{str(p)[-1]}", positive=True) for p in (p_w, p_l)}
    e = e.xreplace({p: 1 / (1 + v[p]) for p in (p_w, p_l)})
    steps = {hh: sp.Dummy("H", nonnegative=True) for hh in e.atoms(sp.Heaviside)}
    e = e.xreplace(steps)
    e = e.replace(lambda a: isinstance(a, sp.Function) and a.args, lambda a: a.func(*[sp.cancel(x) for x in a.args]))
    for cand in (e, sp.factor_terms(e), sp.together(e), sp.factor(sp.together(e))):
        if cand.is_nonnegative:
            pos = " > 0" if cand.is_positive else " >= 0"
            return (f"proved for l < 0: written in p = exp(l/n) = 1/(1 + v), v > 0, it is{pos}"
                    "; e.g. 1 + 1/expm1(-l/n) = 1/(1 - p) > 0")
    return None
