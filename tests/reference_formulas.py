"""Independent NumPy reference formulas, transcribed from the specification of each loss.

DPO-family entries follow the current TRL line (1.10-1.16), which supersedes the TRL 1.9 forms:
`nca_pair`, `bco_pair`, `sppo_hard`, `apo_down` use the raw log-ratios (they are only defined for
reverse KL; other f-divergences are refused), and f-divergence score maps keep their constants
(only reverse KL is exercised here; see tests/test_trl_equivalence.py for the others). `kto` /
`apo_zero_unpaired` are in their default paired-use convention (chosen row + rejected row); TPO
entries are TRL's TPOTrainer contrastive term (tpo_alpha = 0).

Written from the specification, not from the package: each entry gives (loss, d_w, d_l) for one
pair in float64, with the stable forms logsig(x) = -logaddexp(0, -x). Incentives are the
specification's own closed forms (the R21 columns), not derivatives computed here.
"""
import numpy as np


def logsig(x):
    return -np.logaddexp(0.0, -x)


def sig(x):
    return np.exp(logsig(x))


def dsig(x):  # sigma'(x) = sigma(x) sigma(-x)
    return np.exp(logsig(x) + logsig(-x))


def ref(name, lw, ll, rw0, rl0, nw, nl, hp):
    """(loss, d_w, d_l) of loss `name` at one state; hp = hyperparameters (defaults filled in)."""
    r_w, r_l = lw - rw0, ll - rl0
    D = r_w - r_l
    b = hp.get("beta", 0.1)
    if name == "sigmoid":
        return -logsig(b * D), b * sig(-b * D), b * sig(-b * D)
    if name == "hinge":
        ind = float(b * D < 1)
        return max(0.0, 1 - b * D), b * ind, b * ind
    if name == "ipo":
        Db = r_w / nw - r_l / nl
        c = 2 * (1 / (2 * b) - Db)
        return (Db - 1 / (2 * b)) ** 2, c / nw, c / nl
    if name == "exo_pair":
        eps = hp["label_smoothing"]
        q, lq, l1q = sig(b * D), logsig(b * D), logsig(-b * D)
        loss = q * (lq - np.log(1 - eps)) + (1 - q) * (l1q - np.log(eps))
        d = b * dsig(b * D) * (np.log((1 - eps) / eps) - b * D)
        return loss, d, d
    if name == "nca_pair":
        loss = -logsig(b * r_w) - 0.5 * logsig(-b * r_w) - 0.5 * logsig(-b * r_l)
        return loss, b * (sig(-b * r_w) - 0.5 * sig(b * r_w)), 0.5 * b * sig(b * r_l)
    if name == "robust":
        eps = hp["label_smoothing"]
        loss = (-(1 - eps) * logsig(b * D) + eps * logsig(-b * D)) / (1 - 2 * eps)
        d = b * ((1 - eps) * sig(-b * D) + eps * sig(b * D)) / (1 - 2 * eps)
        return loss, d, d
    if name == "bco_pair":
        return -logsig(b * r_w) - logsig(-b * r_l), b * sig(-b * r_w), b * sig(b * r_l)
    if name == "sppo_hard":
        return ((r_w - 1 / (2 * b)) ** 2 + (r_l + 1 / (2 * b)) ** 2,
                2 * (1 / (2 * b) - r_w), 2 * (r_l + 1 / (2 * b)))
    if name in ("aot", "aot_unpaired"):
        eps = hp["label_smoothing"]
        v = D  # a batch of one: sorting is the identity
        d = b * ((1 - eps) * sig(-b * v) - eps * sig(b * v))
        return -(1 - eps) * logsig(b * v) - eps * logsig(-b * v), d, d
    if name == "apo_zero":
        return (1 - sig(b * r_w)) + sig(b * r_l), b * dsig(b * r_w), b * dsig(b * r_l)
    if name == "apo_down":
        return (sig(b * r_w) + (1 - sig(b * D)), b * (dsig(b * D) - dsig(b * r_w)), b * dsig(b * D))
    if name == "discopop":
        tau = hp["discopop_tau"]
        z = b * D
        mu = sig(z / tau)
        mu_e = np.exp(logsig(z / tau) - z)                   # mu e^{-z}
        mu1mu_e = np.exp(logsig(z / tau) + logsig(-z / tau) - z)  # mu (1-mu) e^{-z}
        loss = (1 - mu) * (-logsig(z)) + mu_e
        d = -b * (mu1mu_e / tau + dsig(z / tau) * logsig(z) / tau - (1 - mu) * sig(-z) - mu_e)
        return loss, d, d
    if name == "sft":
        return -lw / nw, 1 / nw, 0.0
    if name == "sigmoid_norm":
        Db = r_w / nw - r_l / nl
        return -logsig(b * Db), b * sig(-b * Db) / nw, b * sig(-b * Db) / nl
    if name in ("cpo_sigmoid", "cpo_simpo", "simpo", "cpo_hinge", "cpo_ipo", "alphapo"):
        lam = hp["cpo_alpha"]
        avg = name in ("cpo_simpo", "simpo", "cpo_ipo", "alphapo")
        tw, tl = (lw / nw, ll / nl) if avg else (lw, ll)
        a = hp.get("alpha", 0.0)
        if a != 0:
            uw, ul = (1 - np.exp(-a * tw)) / a, (1 - np.exp(-a * tl)) / a
            duw, dul = np.exp(-a * tw), np.exp(-a * tl)
        else:
            uw, ul, duw, dul = tw, tl, 1.0, 1.0
        z = uw - ul
        sw, sl = (duw / nw, dul / nl) if avg else (duw, dul)  # d z / d l_w, -d z / d l_l
        nll, dnll = -lw / nw, lam / nw
        if name == "cpo_sigmoid":
            loss, s = -logsig(b * z), b * sig(-b * z)
        elif name in ("cpo_simpo", "simpo", "alphapo"):
            g = hp["simpo_gamma"]
            loss, s = -logsig(b * z - g), b * sig(g - b * z)
        elif name == "cpo_hinge":
            loss, s = max(0.0, 1 - b * z), b * float(b * z < 1)
        else:
            loss, s = (z - 1 / (2 * b)) ** 2, 2 * (1 / (2 * b) - z)
        return loss + lam * nll, s * sw + dnll, s * sl
    if name == "orpo":
        aw, al = lw / nw, ll / nl
        pw, pl = np.exp(aw), np.exp(al)
        LO = (aw - al) - (np.log(-np.expm1(aw)) - np.log(-np.expm1(al)))
        nll = -(lw + hp.get("prompt_logps", 0.0)) / (nw + hp.get("prompt_len", 0.0))
        dw = b * sig(-LO) / ((1 - pw) * nw) + 1 / (nw + hp.get("prompt_len", 0.0))
        return nll - b * logsig(LO), dw, b * sig(-LO) / ((1 - pl) * nl)
    if name in ("tpo", "tpo_hinge", "tpo_ipo", "tpo_l"):
        eps = hp.get("label_smoothing", 0.0)
        if name in ("tpo", "tpo_hinge"):
            z, sw, sl = lw - ll, 1.0, 1.0
        else:
            z, sw, sl = lw / nw - ll / nl, 1 / nw, 1 / nl
        if name == "tpo":
            loss, s = -(1 - eps) * logsig(b * z) - eps * logsig(-b * z), b * ((1 - eps) * sig(-b * z) - eps * sig(b * z))
        elif name == "tpo_l":
            x = b * z - hp["tpo_l_gamma"]
            loss, s = -(1 - eps) * logsig(x) - eps * logsig(-x), b * ((1 - eps) * sig(-x) - eps * sig(x))
        elif name == "tpo_hinge":
            loss, s = max(0.0, 1 - b * z), b * float(b * z < 1)
        else:
            loss, s = (z - 1 / (2 * b)) ** 2, 2 * (1 / (2 * b) - z)
        return loss, s * sw, s * sl
    if name == "kto":
        lD, lU, z0 = hp["desirable_weight"], hp["undesirable_weight"], hp["kl"]
        loss = lD * (1 - sig(b * (r_w - z0))) + lU * (1 - sig(b * (z0 - r_l)))
        return loss, lD * b * dsig(b * (r_w - z0)), lU * b * dsig(b * (z0 - r_l))
    if name == "apo_zero_unpaired":
        lD, lU = hp["desirable_weight"], hp["undesirable_weight"]
        return lD * (1 - sig(b * r_w)) + lU * sig(b * r_l), lD * b * dsig(b * r_w), lU * b * dsig(b * r_l)
    if name == "dpop":
        lam = hp["dpop_lambda"]
        z = b * (D - lam * max(0.0, rw0 - lw))
        return -logsig(z), b * (1 + lam * float(r_w < 0)) * sig(-z), b * sig(-z)
    if name == "rdpo":
        z = b * D + hp["rdpo_alpha"] * (nw - nl)
        return -logsig(z), b * sig(-z), b * sig(-z)
    if name == "rrhf":
        lam = hp["cpo_alpha"]
        ind = float(-lw / nw + ll / nl > 0)
        return max(0.0, -lw / nw + ll / nl) - lam * lw / nw, ind / nw + lam / nw, ind / nl
    if name == "sppo":
        return (0.5 * ((r_w - 0.5 / b) ** 2 + (r_l + 0.5 / b) ** 2), 0.5 / b - r_w, r_l + 0.5 / b)
    if name == "slic":
        delta, lam = hp["delta"], hp["lambda_nll"]
        ind = float(lw - ll < delta)
        return max(0.0, delta - (lw - ll)) - lam * lw, ind + lam, ind
    if name == "ipo_sum":
        c = 2 * (1 / (2 * b) - D)
        return (D - 1 / (2 * b)) ** 2, c, c
    if name == "dpo_shift":
        # Yang et al. 2025 (arXiv:2502.07599), eq. of L_DPO-Shift with constant f(lambda) = lam:
        # -log sigma(beta log pi/pi_ref(y_w) - lam beta log pi/pi_ref(y_l)).
        lam = hp["shift_lambda"]
        u = b * r_w - lam * b * r_l
        return -logsig(u), b * sig(-u), lam * b * sig(-u)
    raise KeyError(name)


def kinks(name, lw, ll, rw0, rl0, nw, nl, hp):
    """Distance to the nearest non-differentiable point (hinges), or inf; tests stay away from kinks."""
    b = hp.get("beta", 0.1)
    D = (lw - rw0) - (ll - rl0)
    if name == "hinge":
        return abs(1 - b * D) / b
    if name in ("cpo_hinge", "tpo_hinge"):
        return abs(1 - b * (lw - ll)) / b
    if name == "rrhf":
        return abs(-lw / nw + ll / nl) * min(nw, nl)
    if name == "slic":
        return abs(hp["delta"] - (lw - ll))
    if name == "dpop":
        return abs(rw0 - lw)
    return np.inf
