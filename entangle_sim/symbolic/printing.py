"""Printers of the compact forms: plain text (`text`) and inline LaTeX (`latex`).

    >>> import sympy as sp
    >>> from entangle_sim.symbolic.symbols import r_w, r_l
    >>> text(r_l - r_w + 1)
    '1 + r_l - r_w'
"""
from __future__ import annotations

import re

import sympy as sp
from sympy.printing.str import StrPrinter

from .symbols import ell_l, ell_w, h_l, h_w, p_l, p_w, r_l, r_w, s, z

def _rank(term) -> tuple:
    """Print order of the terms of a sum: positive first, then chosen side, rejected side, lengths, constants."""
    names = {str(x) for x in term.free_symbols}
    side = 0 if names & {"r_w", "ell_w", "p_w", "h'_w", "z", "s"} else 1 if names & {
        "r_l", "ell_l", "p_l", "h'_l"} else 2 if names & {"n_w", "n_l", "n_p", "ell_p"} else 3
    return (term.could_extract_minus_sign(), -1 if term.is_Number else side)


class CompactPrinter(StrPrinter):
    """Plain text: sigma(x), log sigma(x), max(a, b), 'A if c, else B', [x > 0] for a leftover step."""

    def _print_Add(self, expr, order=None):
        terms = sorted(sp.Add.make_args(expr), key=lambda a: (_rank(a), sp.default_sort_key(a)))
        out = self._print(terms[0]) if not terms[0].could_extract_minus_sign() else "-" + self.parenthesize(
            -terms[0], 40)
        for a in terms[1:]:
            if a.could_extract_minus_sign():
                out += " - " + self.parenthesize(-a, 40)
            else:
                out += " + " + self.parenthesize(a, 40)
        return out

    def _print_Sigmoid(self, e):
        return f"sigma({self._print(e.args[0])})"

    def _print_LogSigmoid(self, e):
        return f"log sigma({self._print(e.args[0])})"

    def _print_Log1mExp(self, e):
        return f"log(1 - exp({self._print(e.args[0])}))"

    def _print_Heaviside(self, e):
        return f"[{self._print(e.args[0])} > 0]"

    def _print_Max(self, e):
        return "max(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Min(self, e):
        return "min(" + ", ".join(self._print(a) for a in e.args) + ")"

    def _print_Symbol(self, e):
        return {"ell_w": "l_w", "ell_l": "l_l", "ell_p": "l_p"}.get(e.name, e.name)

    def _print_Piecewise(self, e):
        parts = []
        for val, cond in e.args:
            v = "undefined" if val is sp.nan else self._print(val)
            parts.append(v if cond is sp.true else f"{v} if {self._print(cond)}")
        return ", else ".join(parts)

    def _print_Relational(self, e):
        return f"{self._print(e.lhs)} {e.rel_op} {self._print(e.rhs)}"

    def _print_And(self, e):
        return " and ".join(self._print(a) for a in e.args)

    def _print_Or(self, e):
        return " or ".join(self._print(a) for a in e.args)


LATEX_NAMES = {ell_w: r"\ell_w", ell_l: r"\ell_l", sp.Symbol("ell_p", nonpositive=True): r"\ell_p",
                r_w: "r_w", r_l: "r_l", p_w: "p_w", p_l: "p_l", z: "z", s: "s", h_w: "h'_w", h_l: "h'_l"}


def text(e) -> str:
    """Plain-text form of a compact expression."""
    return "-" if e is None else CompactPrinter().doprint(e)


def latex(e) -> str:
    """Inline LaTeX (`$...$` pieces joined by 'if'/'else' words for cases): valid for MathJax,
    LaTeX text mode and matplotlib mathtext."""
    if e is None:
        return "-"
    if isinstance(e, sp.Piecewise):
        parts = []
        for val, cond in e.args:
            v = "undefined" if val is sp.nan else f"${_tex(val)}$"
            parts.append(v if cond is sp.true else f"{v} if ${_tex(cond)}$")
        return ", else ".join(parts)
    return f"${_tex(e)}$"


def _tex(e) -> str:
    out = sp.latex(e, symbol_names=LATEX_NAMES, order="rev-lex")
    # mathtext has no \operatorname; SymPy's \left / \right pairs render fine.
    out = re.sub(r"\\operatorname\{(\w+)\}", r"\\mathrm{\1}", out)
    return out.replace(r"\lambda_{p}", r"\lambda_p")


