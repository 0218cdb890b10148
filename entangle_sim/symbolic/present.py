"""Presentation of derivations: the `entangle-sim conditions` text block of one loss and the
registry-wide condition table (markdown or LaTeX), built on `Derivation.as_dict()` and the compact
forms' printers.

    >>> from entangle_sim import losses
    >>> print(table_rows(["sigmoid"])[0]["t_w"])
    1
"""
from __future__ import annotations

import re
import textwrap
from typing import Any

from .dynamics import derive, registered_names

WIDTH = 156  # printed lines stay under 160 characters


def _wrap(head: str, body: str, indent: int = 18) -> list[str]:
    return textwrap.wrap(body, width=WIDTH, initial_indent=f"  {head:<{indent - 2}}",
                         subsequent_indent=" " * (indent + 4), break_on_hyphens=False) or [f"  {head}"]


def sign_verdict(si: dict) -> str:
    """'>= 0 (proved ...)' / 'can be < 0 (witness ...)' from a SignInfo dict."""
    if si["nonnegative"] is True:
        return f">= 0 ({si['how']})"
    if si["nonnegative"] is False:
        w = si.get("witness") or {}
        wt = ", ".join(f"{k}={v:.4g}" for k, v in w.items() if k != "value")
        return f"can be < 0 (witness: value {w.get('value', float('nan')):.3g} at {wt})"
    return f"sign not decided ({si['how']})"


def fourth_regime_text(d: dict) -> str:
    if not d["fourth_regime_possible"]:
        return "impossible (R5: both incentives are >= 0)"
    if False in (d["d_w_sign"]["nonnegative"], d["d_l_sign"]["nonnegative"]):
        return "possible (an incentive can be negative)"
    return "not excluded (an incentive's sign is undecided)"


def block(d: dict, trl: str | None = None) -> str:
    """The `entangle-sim conditions` text of one derivation dict (`Derivation.as_dict()`)."""
    c = d["compact"]
    out = [f"== {d['loss']} ==" + (f"   ({trl})" if trl else "")]
    if c["margin_form"]:
        form = "L = m(z) + NLL" if "nll" in c else "L = m(z)"
        out += _wrap("form", f"{form},  z = h_w(l_w) - h_l(l_l)")
        if "m" in c:
            out += _wrap("m(z)", c["m"])
        if "nll" in c:
            out += _wrap("NLL", c["nll"])
        out += _wrap("margin", f"z = {c['z']}")
        out += _wrap("step weight", f"s = -m'(z) = {c['s']}")
        out += _wrap("slopes", f"h'_w = dz/dl_w = {c['h_w']}")
        out += _wrap("", f"h'_l = -dz/dl_l = {c['h_l']}")
    else:
        out += _wrap("form", "not a single-margin loss: the two incentives directly")
    out += _wrap("incentives", f"d_w = -dL/dl_w = {c['d_w']}")
    out += _wrap("", f"d_l = +dL/dl_l = {c['d_l']}")
    out += _wrap("first order", "Delta l_w ~ eta (d_w G_ww - d_l G_wl),  Delta l_l ~ eta (d_w G_wl - d_l G_ll)")
    out += _wrap("", "Delta (l_w - l_l) ~ eta (d_w G_ww + d_l G_ll - (d_w + d_l) G_wl)")
    out += _wrap("chosen rises", f"<=> G_wl <= t_w G_ww  [where d_l > 0],  t_w = {c.get('t_w', '-')}")
    out += _wrap("rejected falls", f"<=> G_wl <= t_l G_ll  [where d_w > 0],  t_l = {c.get('t_l', '-')}")
    out += _wrap("sign of d_w", sign_verdict(d["d_w_sign"]))
    out += _wrap("sign of d_l", sign_verdict(d["d_l_sign"]))
    out += _wrap("fourth regime", "(chosen down, rejected up) " + fourth_regime_text(d))
    syms = [x for x in ("r = l - l_ref (log-ratio)", "p = exp(l/n) (per-token probability)")
            if (x[0] == "r" and re.search(r"\br_[wl]\b", " ".join(map(str, c.values()))))
            or (x[0] == "p" and re.search(r"\bp_[wl]\b", " ".join(map(str, c.values()))))]
    if syms:
        out += _wrap("symbols", "; ".join(syms) + "; l = summed log-prob, n = length")
    return "\n".join(out)


def _sign_word(v) -> str:
    return {True: ">= 0", False: "can be < 0", None: "undecided"}[v]


def table_rows(names=None) -> list[dict[str, Any]]:
    """One row per loss (names or loss definitions; default every registered loss): name, TRL name, t_w, t_l (text and inline LaTeX), signs, fourth regime."""
    rows = []
    for name in names or registered_names():
        der = derive(name)
        spec = der.spec
        c = der.compact
        rows.append({"loss": spec.name, "trl": spec.trl or "-", "t_w": c.text("t_w"), "t_l": c.text("t_l"),
                     "t_w_latex": c.latex("t_w"), "t_l_latex": c.latex("t_l"),
                     "s": c.text("s") if c.margin_form else "-", "s_latex": c.latex("s") if c.margin_form else "-",
                     "d_w_sign": _sign_word(der.d_w_sign.nonnegative),
                     "d_l_sign": _sign_word(der.d_l_sign.nonnegative),
                     "fourth_regime_possible": bool(der.fourth_regime_possible)})
    return rows


def _tex_escape(t: str) -> str:
    return t.replace("_", r"\_").replace(">=", r"$\geq$").replace("<", r"$<$")


def table(fmt: str = "markdown", names=None) -> str:
    """The registry-wide condition table (the paper's per-loss table, for every registered loss).

    chosen rises <=> G_wl <= t_w G_ww (where d_l > 0); rejected falls <=> G_wl <= t_l G_ll (where d_w > 0).
    fmt: 'markdown' (math as $...$) or 'latex' (a tabular).
    """
    rows = table_rows(names)
    if fmt == "markdown":
        out = ["| loss | TRL | $t_w$ (chosen rises iff $G_{wl} \\le t_w G_{ww}$) | "
               "$t_l$ (rejected falls iff $G_{wl} \\le t_l G_{ll}$) | $d_w$ / $d_l$ | 4th regime |",
               "|---|---|---|---|---|---|"]
        for r in rows:
            out.append(f"| `{r['loss']}` | {r['trl']} | {r['t_w_latex']} | {r['t_l_latex']} | "
                       f"{r['d_w_sign']} / {r['d_l_sign']} | "
                       f"{'possible' if r['fourth_regime_possible'] else 'impossible'} |")
        return "\n".join(out).replace("|", "|")
    if fmt == "latex":
        out = [r"\begin{tabular}{llp{0.28\linewidth}p{0.28\linewidth}ll}", r"\hline",
               r"loss & TRL & $t_w$ & $t_l$ & $d_w$ / $d_l$ & 4th regime \\", r"\hline"]
        for r in rows:
            out.append(f"{_tex_escape(r['loss'])} & {_tex_escape(r['trl'])} & {r['t_w_latex']} & {r['t_l_latex']} & "
                       f"{_tex_escape(r['d_w_sign'])} / {_tex_escape(r['d_l_sign'])} & "
                       f"{'possible' if r['fourth_regime_possible'] else 'impossible'} \\\\")
        out += [r"\hline", r"\end{tabular}"]
        return "\n".join(out)
    raise ValueError(f"unknown table format {fmt!r}; valid: ['markdown', 'latex']")

