"""What to change: every registered loss and knob setting evaluated on one set of measured pairs.

The per-pair Gram (G_ww, G_wl, G_ll) does not depend on the loss: a loss only sets the incentives
d_w = -dL/dl_w and d_l = dL/dl_l, and one step on the pair changes the log-probs to first order by

    delta_chosen = eta (d_w G_ww - d_l G_wl),   delta_rejected = eta (d_w G_wl - d_l G_ll)

(`entangle_sim.torch.theory.evaluate`). So every registry loss at its defaults and every knob grid
is a cheap re-evaluation of the same measurement. All results are FIRST ORDER (per unit step eta = 1;
fractions do not depend on eta). With the Adam-preconditioned entries (G_ww_adam, ...) the same
formulas give the change under the preconditioned step theta -= eta P dL/dtheta (frozen v_hat, no
momentum or weight-decay drift; `entangle_sim.torch.adam`).

"+ NLL" scenarios add w times the token-mean NLL of the chosen completion, -w l_w / n_w, to any loss
(RPO-style; docs/theory.md §4.2: d_w grows by w / n_w, d_l is unchanged).

    rows = what_if(measured)                       # measured: measure_pairs(...) columns, numpy [N]
    rows[0]["label"], rows[0]["chosen_up_margin_up"]
    verdict(evaluate_scenario(measured, Scenario("sigmoid")), optimizer="AdamW state of checkpoint-500")
    top_pairs(measured, examples, k=10)           # which pairs, and why
"""
from __future__ import annotations

import dataclasses
from collections import Counter

import numpy as np

from .data import shared_prefix  # noqa: F401 - public here too (top-pair reasons)
from .theory import evaluate

FIRST_ORDER = "first order: per-pair one-step predictions from the measured Gram (eta = 1 per pair)"

#: Knob grids users ask about: (loss, hyperparameter, values). 'base' is the loss under diagnosis.
GRIDS: tuple[tuple[str, str, tuple[float, ...]], ...] = (
    ("base", "beta", (0.01, 0.03, 0.1, 0.3, 1.0)),
    ("base", "+nll", (0.1, 0.3, 1.0, 3.0)),
    ("dpop", "dpop_lambda", (0.0, 5.0, 50.0, 500.0)),
    ("dpo_shift", "shift_lambda", (0.5, 0.75, 0.9, 0.95)),
    ("simpo", "simpo_gamma", (0.0, 0.5, 1.0, 2.0)),
)

_SYMBOL = {"beta": "β", "dpop_lambda": "λ", "shift_lambda": "λ", "simpo_gamma": "γ", "cpo_alpha": "α_NLL"}


@dataclasses.dataclass(frozen=True)
class Scenario:
    """A loss with hyperparameters (others at the registry defaults) and an optional added token-mean
    NLL weight on the chosen completion."""

    loss: str
    hp: tuple = ()  # sorted (name, value) pairs
    nll: float = 0.0
    kind: str = "default"  # 'default' or the knob varied ('beta', '+nll', 'dpop_lambda', ...)

    @property
    def params(self) -> dict:
        return dict(self.hp)

    @property
    def label(self) -> str:
        parts = [f"{_SYMBOL.get(k, k)} {v:g}" for k, v in self.hp if isinstance(v, (int, float))]
        s = self.loss + (f" ({', '.join(parts)})" if parts else "")
        return s + (f" + {self.nll:g}·NLL" if self.nll else "")


def scenarios(base: str = "sigmoid", base_hp: dict | None = None, *, losses=None, grids=GRIDS) -> list[Scenario]:
    """Every per-pair registry loss at its defaults (user losses included; `losses` restricts the list),
    then the knob grids (a grid whose loss or hyperparameter is not registered is skipped)."""
    from .. import losses as registry

    base_spec = registry.get(base)
    base_hp = dict(base_hp or {})
    out = []
    for name in (registry.names() if losses is None else [registry.get(n).name for n in losses]):
        spec = registry.get(name)
        if spec.batch_coupled:
            continue
        hp = base_hp if name == base_spec.name else {}
        out.append(Scenario(name, tuple(sorted(hp.items()))))
    for loss, knob, values in grids:
        name = base_spec.name if loss == "base" else loss
        try:
            spec = registry.get(name)
        except ValueError:
            continue
        if spec.batch_coupled:
            continue
        hp0 = base_hp if name == base_spec.name else {}
        for v in values:
            if knob == "+nll":
                out.append(Scenario(name, tuple(sorted(hp0.items())), nll=float(v), kind="+nll"))
            elif any(h.name == knob for h in spec.hypers):
                out.append(Scenario(name, tuple(sorted({**hp0, knob: float(v)}.items())), kind=knob))
    seen, uniq = set(), []
    for s in out:
        if (s.loss, s.hp, s.nll) not in seen:
            seen.add((s.loss, s.hp, s.nll))
            uniq.append(s)
    return uniq


def _gram(m: dict, adam: bool) -> dict:
    sfx = "_adam" if adam else ""
    return {"G_ww": m["G_ww" + sfx], "G_wl": m["G_wl" + sfx], "G_ll": m["G_ll" + sfx]}


def evaluate_scenario(m: dict, sc: Scenario, *, adam: bool = False) -> dict:
    """Per-pair d_w, d_l, delta_chosen, delta_rejected, delta_margin (numpy [N]) and regime names of
    one scenario on measured columns `m` (plain Gram, or the `_adam` columns when adam=True)."""
    from .. import regimes

    G = _gram(m, adam)
    ev = evaluate(sc.loss, chosen_logps=m["chosen_logps"], rejected_logps=m["rejected_logps"],
                  chosen_len=m["chosen_len"], rejected_len=m["rejected_len"],
                  ref_chosen_logps=m.get("ref_chosen_logps"), ref_rejected_logps=m.get("ref_rejected_logps"),
                  # columns without reference log-probs: the caller measured none, the loss sees raw log-probs
                  reference=None if "ref_chosen_logps" in m else "none",
                  prompt_len=m.get("prompt_len"), **G, **sc.params)
    if sc.nll:
        d_w = ev["d_w"] + sc.nll / np.asarray(m["chosen_len"], dtype=float)
        d_l = ev["d_l"]
        ev = {**ev, "d_w": d_w, "delta_chosen": d_w * G["G_ww"] - d_l * G["G_wl"],
              "delta_rejected": d_w * G["G_wl"] - d_l * G["G_ll"]}
        ev["regime"] = regimes.names(regimes.classify(ev["delta_chosen"], ev["delta_rejected"]))
    ev["delta_margin"] = ev["delta_chosen"] - ev["delta_rejected"]
    return ev


def summarize(ev: dict) -> dict:
    """Regime fractions, chosen_falls, chosen_up_margin_up (the ranking key) and mean changes."""
    from .. import regimes

    codes = np.array([regimes.REGIMES.index(r) for r in ev["regime"]])
    fr = regimes.fractions(codes)
    dc, dm = np.asarray(ev["delta_chosen"]), np.asarray(ev["delta_margin"])
    return {"regimes": fr, "chosen_falls": float(np.mean(dc < 0)),
            "chosen_up_margin_up": float(np.mean((dc > 0) & (dm > 0))),
            "mean_delta_margin": float(np.mean(dm)), "mean_delta_chosen": float(np.mean(dc)),
            "n_pairs": int(dc.size)}


def what_if(m: dict, *, base: str = "sigmoid", base_hp: dict | None = None, losses=None, grids=GRIDS,
            rank_by: str | None = None) -> list[dict]:
    """One row per scenario: loss, hyperparameters, label, kind, 'sgd' summary and (when the `_adam`
    columns are present) 'adam' summary; ranked by the fraction of pairs whose chosen log-prob rises
    while the margin grows (under Adam when measured, else SGD), best first. Scenarios the measured
    columns cannot evaluate (a loss needing the prompt log-prob) carry 'skipped' with the reason."""
    has_adam = all(f"G_{k}_adam" in m for k in ("ww", "wl", "ll"))
    rank_by = rank_by or ("adam" if has_adam else "sgd")
    rows = []
    for sc in scenarios(base, base_hp, losses=losses, grids=grids):
        row = {"loss": sc.loss, "hyperparameters": sc.params, "nll_weight": sc.nll, "label": sc.label,
               "kind": sc.kind, "first_order": True}
        try:
            row["sgd"] = summarize(evaluate_scenario(m, sc))
            if has_adam:
                row["adam"] = summarize(evaluate_scenario(m, sc, adam=True))
        except ValueError as e:
            row["skipped"] = str(e)
        rows.append(row)
    ok = [r for r in rows if "skipped" not in r]
    ok.sort(key=lambda r: (-r[rank_by]["chosen_up_margin_up"], -r[rank_by]["regimes"]["chosen_up_rejected_down"]))
    return ok + [r for r in rows if "skipped" in r]


def verdict(summary: dict, sc: Scenario, *, optimizer: str | None = None) -> str:
    """The one-line verdict, e.g. 'under sigmoid (β 0.1, AdamW state of checkpoint-500) the chosen
    log-prob is predicted to fall for 62% of pairs; both rise for 9%; ideal for 29% (first order)'."""
    from .. import losses as registry

    spec = registry.get(sc.loss)
    hp = {**{h.name: h.default for h in spec.hypers if isinstance(h.default, (int, float))}, **sc.params}
    inner = [f"{_SYMBOL.get(k, k)} {v:g}" for k, v in hp.items() if k in ("beta",) or k in sc.params]
    if sc.nll:
        inner.append(f"+ {sc.nll:g}·NLL")
    inner.append(optimizer or "plain SGD step")
    fr = summary["regimes"]
    pct = lambda x: f"{100 * x:.0f}%"  # noqa: E731
    return (f"under {spec.name} ({', '.join(inner)}) the chosen log-prob is predicted to fall for "
            f"{pct(summary['chosen_falls'])} of pairs; both rise for {pct(fr['both_up'])}; "
            f"ideal for {pct(fr['chosen_up_rejected_down'])} (first order)")


# ----------------------------------------------------------------------------------------------
# which pairs, and why
# ----------------------------------------------------------------------------------------------
def shared_suffix(a, b) -> int:
    """Number of equal trailing tokens (not overlapping the shared prefix).

    >>> shared_suffix([1, 8, 2, 3], [1, 9, 9, 2, 3])
    2
    """
    k = shared_prefix(a, b)
    return shared_prefix(list(a)[k:][::-1], list(b)[k:][::-1])


def token_overlap(a, b) -> float:
    """Multiset Jaccard |A ∩ B| / |A ∪ B| of the two completions' tokens (1 = same bag of tokens).

    >>> token_overlap([1, 1, 2], [1, 2, 2])
    0.5
    """
    ca, cb = Counter(a), Counter(b)
    union = sum((ca | cb).values())
    return sum((ca & cb).values()) / union if union else 1.0


def modes(G_ww, G_wl, G_ll) -> dict[str, np.ndarray]:
    """Common/differential split of the DPO-type step (d_w = d_l = C; docs/theory.md §3.2):
    delta_chosen/C = common + differential, delta_rejected/C = common - differential with

        common = (G_ww - G_ll) / 2,   differential = |g_w - g_l|^2 / 2 = (G_ww - 2 G_wl + G_ll) / 2.

    The chosen log-prob falls iff common < -differential, i.e. G_ll - G_ww > |g_w - g_l|^2."""
    G_ww, G_wl, G_ll = (np.asarray(x, dtype=float) for x in (G_ww, G_wl, G_ll))
    return {"common": (G_ww - G_ll) / 2, "differential": (G_ww - 2 * G_wl + G_ll) / 2}


def _why(r: dict) -> str:
    parts = []
    if r["delta_chosen"] < 0:
        parts.append(f"chosen falls: the common mode (G_ww - G_ll)/2 = {r['common']:.3g} outweighs the "
                     f"differential |g_w - g_l|^2/2 = {r['differential']:.3g}")
    elif r["delta_rejected"] > 0:
        parts.append(f"rejected rises: the common mode (G_ww - G_ll)/2 = {r['common']:.3g} exceeds the "
                     f"differential |g_w - g_l|^2/2 = {r['differential']:.3g}")
    else:
        parts.append("ideal direction, but entangled" if r["rho"] > 0.5 else "ideal direction")
    parts.append(f"cos {r['cos']:.2f}, |g_l|/|g_w| = {r['norm_ratio']:.2f}")
    if r["shared_prefix"] or r["shared_suffix"]:
        parts.append(f"completions share {r['shared_prefix']} leading and {r['shared_suffix']} trailing tokens")
    parts.append(f"token overlap {r['token_overlap']:.2f}, length ratio n_l/n_w = {r['length_ratio']:.2f}")
    return "; ".join(parts)


def top_order(m: dict, k: int = 10, by: str = "rho") -> np.ndarray:
    """Positions (into the columns of m) of the k pairs `top_pairs` lists, in its order: the largest
    `by` first (ties in data order). Lets a caller fetch only those pairs' tokens."""
    return _ranked(m, k, by)[0]


def _ranked(m, k, by):
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    G_ww, G_wl, G_ll = (np.asarray(m[x], dtype=float) for x in ("G_ww", "G_wl", "G_ll"))
    tiny = np.finfo(float).tiny
    cos = G_wl / np.sqrt(np.maximum(G_ww * G_ll, tiny))
    rho = np.maximum(G_wl / np.maximum(G_ww, tiny), G_wl / np.maximum(G_ll, tiny))
    key = {"rho": rho, "cos": cos}.get(by)
    if key is None:
        key = np.asarray(m[by], dtype=float)
    return np.argsort(-key, kind="stable")[:k], key, cos, rho


def top_pairs(m: dict, examples: list[dict] | None = None, *, k: int = 10, ev: dict | None = None,
              by: str = "rho", by_group: dict | None = None, tokenizer=None, index=None) -> list[dict]:
    """The k pairs with the largest `by` (default rho = max(G_wl/G_ww, G_wl/G_ll): Case 1 iff <= 1),
    each with its reasons: Gram entries, cos, norm ratio |g_l|/|g_w|, the common/differential split,
    shared prefix/suffix (tokens), token overlap, length ratio, predicted changes (from `ev`, default
    DPO-type d_w = d_l = 1), and, given `by_group` ({group: {'G_wl': [N], ...}}), the groups with the
    largest |G_wl| share. `index`: the pairs' row numbers in the data set (default 0..N-1). `examples`
    may be a mapping {position: tokenised pair} holding only the positions of `top_order(m, k, by)`."""
    if k <= 0:
        raise ValueError(f"k must be >= 1, got {k}")
    order, key, cos, rho = _ranked(m, k, by)
    G_ww, G_wl, G_ll = (np.asarray(m[x], dtype=float) for x in ("G_ww", "G_wl", "G_ll"))
    tiny = np.finfo(float).tiny
    md = modes(G_ww, G_wl, G_ll)
    dc = np.asarray(ev["delta_chosen"]) if ev is not None else G_ww - G_wl
    dr = np.asarray(ev["delta_rejected"]) if ev is not None else G_wl - G_ll
    index = np.arange(len(G_ww)) if index is None else np.asarray(index)
    out = []
    for i in order:
        r = {"index": int(index[i]), "rank_key": by, by: float(key[i]), "rho": float(rho[i]), "cos": float(cos[i]),
             "G_ww": float(G_ww[i]), "G_wl": float(G_wl[i]), "G_ll": float(G_ll[i]),
             "norm_ratio": float(np.sqrt(G_ll[i] / max(G_ww[i], tiny))),
             "common": float(md["common"][i]), "differential": float(md["differential"][i]),
             "delta_chosen": float(dc[i]), "delta_rejected": float(dr[i])}
        for x in ("G_ww_adam", "G_wl_adam", "G_ll_adam"):
            if x in m:
                r[x] = float(m[x][i])
        if examples is not None:
            a, b = list(examples[i]["chosen_ids"]), list(examples[i]["rejected_ids"])
            r.update(shared_prefix=shared_prefix(a, b), shared_suffix=shared_suffix(a, b),
                     token_overlap=token_overlap(a, b), length_ratio=len(b) / max(len(a), 1),
                     chosen_len=len(a), rejected_len=len(b))
            if tokenizer is not None:
                r["chosen_tokens"] = tokenizer.convert_ids_to_tokens(a)
                r["rejected_tokens"] = tokenizer.convert_ids_to_tokens(b)
        else:
            r.update(shared_prefix=0, shared_suffix=0, token_overlap=float("nan"),
                     length_ratio=float(m["rejected_len"][i] / max(m["chosen_len"][i], 1)))
        if by_group:
            tot = sum(abs(float(d["G_wl"][i])) for d in by_group.values()) or 1.0
            shares = sorted(((g, float(d["G_wl"][i])) for g, d in by_group.items()), key=lambda x: -abs(x[1]))
            r["G_wl_by_group"] = {g: v for g, v in shares}
            r["G_wl_top_groups"] = [f"{g} {100 * abs(v) / tot:.0f}%" for g, v in shares[:3]]
        r["why"] = _why(r)
        out.append(r)
    return out
