"""Report entries for the qualitative claims, read from the reproduce figure data (cached)."""
from __future__ import annotations


from .. import claim_stats, reproduce
from .toys import entry


def mitigation_claims(preset_name: str, cache_dir, seed) -> list[dict]:
    """R19 trajectories and R20 from the mitigation comparison (figure 'mitigations')."""
    rows = reproduce.figure_data("mitigations", preset_name, cache_dir=cache_dir, seed=seed)["rows"]
    get = lambda s, m, k: next((r[k] for r in rows if r["setting"] == s and r["method"] == m), None)  # noqa: E731
    settings = list(dict.fromkeys(r["setting"] for r in rows))
    pair = {s: get(s, "normalized", "pair_pred_ideal_fraction") for s in settings}
    real = {s: get(s, "normalized", "ideal_fraction") for s in settings}
    base = {s: get(s, "baseline", "ideal_fraction") for s in settings}
    out = [entry("R19-pair", "Normalized GD: every one-pair first-order step is ideal (Cases 2/3 disappear)",
                 "mitigations.run_comparison, method 'normalized': one-pair predicted regime at every step and pair",
                 {"pair_pred_ideal_fraction": pair}, ">= 0.999 on every setting",
                 all(v is not None and v >= 0.999 for v in pair.values())),
           entry("R19-realised", "Normalized GD: Cases 2/3 disappear in the realised toy trajectories",
                 "realised regime of every (step, pair) under 'normalized' vs 'baseline' (pairs share parameters)",
                 {"normalized": real, "baseline": base}, "normalized ideal fraction >= 0.99 on every setting",
                 all(v is not None and v >= 0.99 for v in real.values()),
                 note="the guarantee is per pair and first order; realised batch steps add cross-pair terms "
                      "(pairs share parameters), which the per-pair normalisation does not control")]
    sfx = [s for s in settings if "short" in s or "long" in s]
    if not sfx or get(sfx[0], "oracle_mask", "rho_eff_first") is None:
        out.append(entry("R20", "Sparse token masking removes the shared-suffix block from the effective inner "
                         "product", "oracle mask on a shared-suffix setting", None, "-", None,
                         note="skipped: no shared-suffix setting with the oracle mask in this preset"))
        return out
    eff = {s: get(s, "oracle_mask", "rho_eff_first") for s in sfx}
    full = {s: get(s, "baseline", "rho_first") for s in sfx}
    learned = {s: get(s, "learned_mask", "mask_fraction_last") for s in sfx}
    setting_a = [s for s in sfx if s.startswith("lastlayer")]  # theory §8.2 states the guarantee in Setting A
    out.append(entry("R20", "Sparse token masking (Setting A): masking the shared suffix removes the positively "
                     "aligned block from the effective inner product (conditional guarantee)",
                     "mitigations.run_comparison: effective rho with the oracle mask vs rho of the full gradients "
                     "on shared-suffix settings; learned-mask final mask fraction",
                     {"rho_eff_oracle_mask": eff, "rho_full_baseline": full, "learned_mask_fraction": learned},
                     "rho_eff(oracle) < rho(full) on every Setting-A (last-layer) shared-suffix setting",
                     bool(setting_a) and all(eff[s] < full[s] for s in setting_a),
                     note="the guarantee is conditional (theory §8.2, Setting A); other settings are listed for "
                          "information -- where rho_eff > rho the contrastive tokens' own gradients are aligned "
                          "(trainable embeddings, cf. R18)"))
    return out


DIAG_NOTE = ("tiny-transformer analogue of the paper's claim (pretraining, SFT and DPO of entangle_sim.diagnose), "
             "measured over seeds and settings; the same mechanism is checked on the last-layer toy "
             "(Q-suffix-toy, Q-Fig4b-toy, R17)")

# report id -> claim of claim_stats (the ids of the single-run entries they replace, kept)
CLAIM_IDS = {"Q-1t-cos": "1t-cos", "Q-1t-chosen": "1t-chosen", "Q-suffix-cos": "suffix-cos",
             "Q-suffix-chosen": "suffix-chosen", "Q-Fig4b-contrast": "heat-contrast", "Q-Fig4b-shared": "heat-shared"}
# A claim counts as reproduced when, in the paper-like setting, the Wilson 95% lower bound of the
# fraction of seeds where it holds exceeds 1/2 (5 seeds: 5/5; 8 seeds: 7/8).
ESTABLISHED = 0.5


def transformer_claims(preset_name: str, cache_dir, seed) -> list[dict]:
    """One statistical entry per paper claim on the tiny transformer (figure data 'transformer_claims')."""
    data = reproduce.figure_data("transformer_claims", preset_name, cache_dir=cache_dir, seed=seed)
    out = []
    for rid, cid in CLAIM_IDS.items():
        rows = [r for r in data["table"] if r["claim"] == cid]
        measured = {r["setting"]: {"holds": f"{r['k']}/{r['n']}", "interval": [round(x, 3) for x in r["interval"]],
                                   **({"fails_by": r["attribution"]} if r["attribution"] else {})} for r in rows}
        paper = next((r for r in rows if r["setting"] == "paper"), None)
        ok = None if paper is None else bool(paper["interval"][0] > ESTABLISHED)
        info = data["claims"][cid]
        out.append(entry(rid, f"{info['paper'][0].upper()}{info['paper'][1:]} (paper, Figs. 3, 4a, 4b; tiny-transformer "
                         "analogue)", f"{info['check']}; per setting: seeds where it holds, Wilson 95% interval, "
                         "and the term that makes each failing run fail", measured,
                         f"Wilson lower bound > {ESTABLISHED} in the 'paper' setting ({data['seeds']} seeds)", ok,
                         note=DIAG_NOTE))
    return out


def transformer_claims_scale(preset_name: str, cache_dir, seed) -> list[dict]:
    """The claims as the model grows (figure data 'transformer_claims_scale'): per claim and size the seeds
    where it holds, and the SGD control's first-order check (the pass criterion: the measurement is
    what it says, a first-order SGD step at every size)."""
    data = reproduce.figure_data("transformer_claims_scale", preset_name, cache_dir=cache_dir, seed=seed)
    measured: dict = {}
    for r in data["table"]:
        lo, hi = r["interval"]
        cell = f"{r['k']}/{r['n']} [{lo:.2f}, {hi:.2f}]"
        if r["attribution"]:
            cell += " (" + "; ".join(f"{t} {k}" for t, k in r["attribution"].items()) + ")"
        measured.setdefault(r["setting"], {}).setdefault(r["claim"], {})[r["size"]] = cell
    fo = {n: {s: {"po_lr": f["po_lr"], "remainder_max": f["remainder_max"], "first_order": f["first_order"]}
              for s, f in sz["first_order"].items()} for n, sz in data["sizes"].items()}
    measured["first_order"] = fo
    sgd = [f["sgd_scaled"]["first_order"] for f in fo.values() if "sgd_scaled" in f]
    ok = None if not sgd else all(sgd)
    turn = "; ".join(f"{cid}: failing by {' -> '.join(str(d) for d in t['dominant_term'])}, holds from "
                     f"{t['holds_from']}" for cid, t in data["turns"].items())
    sizes = ", ".join(f"{n} ({sz['n_params'] / 1e3:.0f}k parameters)" for n, sz in data["sizes"].items())
    return [entry("Q-scale", "The paper's claims as the model grows (tiny-transformer analogue, sizes " + sizes +
                  "; the paper shows them on GPT-2 small, 124M)",
                  "claim_stats.run_scale: per size and setting, seeds where each claim holds (Wilson 95%) and the "
                  "term that breaks each failing run; SGD control at the rate "
                  f"{claim_stats.SGD_KAPPA:g} / (reference mean Gram diagonal)", measured,
                  f"every SGD-control run first order (second-order remainder < {claim_stats.FIRST_ORDER_TOL})", ok,
                  note="where it turns (paper-like setting): " + turn)]


def check_claims(preset_name: str, cache_dir, seed) -> list[dict]:
    out = []
    f1 = reproduce.figure_data("fig1_toy", preset_name, cache_dir=cache_dir, seed=seed)
    rd, cd = f1["runs"]["rejected_dominant"], f1["runs"]["chosen_dominant"]
    m = {"rejected_dominant": [rd["mean_delta_chosen"], rd["mean_delta_rejected"]],
         "chosen_dominant": [cd["mean_delta_chosen"], cd["mean_delta_rejected"]]}
    out.append(entry("Q-Fig1", "Rejected gradient norm dominant -> both log-probs fall; chosen dominant -> both rise "
                     "(Fig. 1 via R7 initial conditions)", "DPO trajectories on the linear toy policy (cos 0.95, "
                     "norm ratio 2 and 0.5); net mean changes (chosen, rejected)", m,
                     "both < 0 for ratio 2; both > 0 for ratio 0.5",
                     rd["mean_delta_chosen"] < 0 and rd["mean_delta_rejected"] < 0 and cd["mean_delta_chosen"] > 0
                     and cd["mean_delta_rejected"] > 0))
    mono = bool(rd["margin_monotone"]) and bool(cd["margin_monotone"])
    out.append(entry("Q-margin", "The DPO margin grows along training (R6 along trajectories)",
                     "mean margin of the Fig. 1 runs non-decreasing at every step", {"monotone": mono}, "monotone",
                     mono))
    al = reproduce.figure_data("algorithms", preset_name, cache_dir=cache_dir, seed=seed)
    expect = {"sigmoid": "both_down", "rdpo": "both_down", "ipo": "both_down", "simpo": "both_down",
              "dpop": "both_up", "rrhf": "both_up"}
    got = {}
    for name, want in expect.items():
        r = al["runs"][name]
        dw, dl = r["mean_delta_chosen"], r["mean_delta_rejected"]
        got[name] = "both_down" if dw < 0 and dl < 0 else "both_up" if dw > 0 and dl > 0 else \
            "chosen_up_rejected_down" if dw >= 0 else "chosen_down_rejected_up"
    out.append(entry("Q-algos", "Predicted regimes (§4.3): DPO, R-DPO, IPO both fall; DPOP, RRHF both rise; SimPO "
                     "like DPO", "six losses on one toy setting (linear policy, cos 0.9, norm ratio 1.5); net "
                     "regime of the mean log-probs", got, "matches the prediction for all six",
                     all(got[k] == v for k, v in expect.items())))
    th = reproduce.figure_data("token_heatmap", preset_name, cache_dir=cache_dir, seed=seed)
    out.append(entry("Q-Fig4b-toy", "Contrastive tokens have negative gradient cosine; identical shared tokens "
                     "reach cosine close to 1 for some tokens (§5.1)", "token_gram on one shared-suffix pair of the "
                     "last-layer model after an SFT warm start",
                     {"contrastive_cos": th["contrastive_cos"], "shared_diag_mean": th["shared_diag_mean"],
                      "shared_diag_max": th["shared_diag_max"]},
                     "contrastive < 0; max matched shared-token cos > 0.9",
                     th["contrastive_cos"] < 0 and th["shared_diag_max"] > 0.9))
    sd = reproduce.figure_data("suffix_dynamics", preset_name, cache_dir=cache_dir, seed=seed)
    runs = [sd["runs"][k] for k in sd["order"]]
    dws = [r["mean_delta_chosen"] for r in runs]
    out.append(entry("Q-suffix-toy", "Longer shared suffix -> chosen log-prob falls more (R17 prediction, "
                     "last-layer toy)", "SFT warm start then DPO on the last-layer model for L = 0 / mid / "
                     "max; net mean change of the chosen log-prob",
                     {"L": [int(r["L"]) for r in runs], "delta_chosen": dws},
                     "delta_chosen(L_max) < 0 and < delta_chosen(L = 0)", dws[-1] < 0 and dws[-1] < dws[0],
                     note="toy analogue; a failure here means the toy does not reproduce the paper's trend at "
                          "this preset"))
    out += mitigation_claims(preset_name, cache_dir, seed)
    out += transformer_claims(preset_name, cache_dir, seed)
    out += transformer_claims_scale(preset_name, cache_dir, seed)
    return out
