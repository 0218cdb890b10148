"""Registry vs TRL's OWN loss code (pinned: TRL 1.16.0), float64, value and both incentives.

Nothing here transcribes a TRL formula. TRL's trainer methods (`DPOTrainer._compute_loss`,
`KTOTrainer._compute_loss`, `CPOTrainer.get_batch_loss_metrics`, `ORPOTrainer.get_batch_loss_metrics`,
`TPOTrainer._compute_loss`) are called unbound on a lightweight stand-in `self` that carries only
the configuration attributes those methods read, with a stand-in model that returns per-token
log-probs (DPO/KTO: TRL's fused-head outputs) or two-token logits whose log-softmax is the wanted
per-token log-prob (CPO/ORPO/TPO). Each response of n tokens carries its summed log-prob l as n
equal tokens l/n, built from a leaf tensor, so `torch.autograd` returns dL/dl directly:
d_w = -dL/dl_w, d_l = +dL/dl_l. Ours: the JAX loss, `jax.grad` (`losses.incentives`) and the SymPy
derivation (`symbolic.derive`), per pair (a batch of one pair) and in batch form (`spec.batch`,
gradients by `jax.grad`).

Tolerance: 1e-6 relative (the agreement criterion), with an absolute floor of 1e-12 for exact
zeros (inactive hinges, sft's d_l). TRL evaluates the alpha-divergence exponential and ORPO's odds
ratio in float32 by design; the states keep those quantities O(1), where float32 rounding is
~1e-7 relative, inside the criterion.
"""
from __future__ import annotations

import inspect
import os
import re
from collections import defaultdict
from types import MethodType, SimpleNamespace

import numpy as np
import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # nothing may be downloaded
os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")  # CPO/ORPO/TPO live in trl.experimental
trl = pytest.importorskip("trl")
torch = pytest.importorskip("torch")

from entangle_sim import losses  # noqa: E402
from entangle_sim.symbolic import derive  # noqa: E402

TRL_PINNED = "1.16.0"
if trl.__version__ != TRL_PINNED:  # the comparison is only meaningful against the pinned code
    pytest.skip(f"TRL {trl.__version__} installed; these checks pin TRL {TRL_PINNED}", allow_module_level=True)

from trl.experimental.cpo.cpo_trainer import CPOTrainer  # noqa: E402
from trl.experimental.orpo.orpo_trainer import ORPOTrainer  # noqa: E402
from trl.experimental.tpo.tpo_trainer import TPOTrainer  # noqa: E402
from trl.trainer.dpo_trainer import DPOTrainer  # noqa: E402
from trl.trainer.kto_trainer import KTOTrainer  # noqa: E402

RTOL, ATOL = 1e-6, 1e-12
T64 = torch.float64


# ----------------------------------------------------------------------------------------------
# States and our side


def _states(B, seed):
    """Integer lengths 1..7, per-token log-probs in (-2, -0.3), log-ratios O(1), prompt 2..4 tokens."""
    rng = np.random.default_rng(seed)
    nw, nl = rng.integers(1, 8, B).astype(float), rng.integers(1, 8, B).astype(float)
    lw, ll = -nw * rng.uniform(0.3, 2.0, B), -nl * rng.uniform(0.3, 2.0, B)
    rw0 = np.minimum(lw - rng.uniform(-2.0, 2.0, B), -0.05)  # reference log-probs stay <= 0
    rl0 = np.minimum(ll - rng.uniform(-2.0, 2.0, B), -0.05)
    P = rng.integers(2, 5, B).astype(float)  # prompt tokens in the sequence (ORPO scores P - 1)
    tp = -rng.uniform(0.3, 2.0, B)  # per-token prompt log-prob
    return dict(lw=lw, ll=ll, rw0=rw0, rl0=rl0, nw=nw, nl=nl, P=P, tp=tp)


def _ours(name, st, hp, sym_hp):
    """(per-pair loss, d_w, d_l via jax.grad, d_w, d_l via SymPy, batch loss, batch d_w, d_l)."""
    import jax

    spec = losses.get(name)
    pl, plen = st["tp"] * (st["P"] - 1), st["P"] - 1
    args = (st["lw"], st["ll"], st["rw0"], st["rl0"], st["nw"], st["nl"])
    kw = dict(prompt_logps=pl, prompt_len=plen, **hp)
    val = np.asarray(spec(*args, **kw))
    g = jax.vmap(jax.grad(lambda a, b, *r: spec(a, b, *r[:4], prompt_logps=r[4], prompt_len=r[5], **hp),
                          argnums=(0, 1)))(*args, pl, plen)
    der = derive(spec, **sym_hp)
    vals = dict(chosen_logps=st["lw"], rejected_logps=st["ll"], ref_chosen_logps=st["rw0"],
                ref_rejected_logps=st["rl0"], chosen_len=st["nw"], rejected_len=st["nl"], prompt_logps=pl,
                prompt_len=plen, **{k: v for k, v in spec.resolve(**hp).items() if not isinstance(v, str)})
    shape = st["lw"].shape
    dw_s = np.broadcast_to(np.asarray(der.d_w(**vals), float), shape)
    dl_s = np.broadcast_to(np.asarray(der.d_l(**vals), float), shape)
    bval = float(spec.batch(*args, **kw))
    gb = jax.grad(lambda a, b: spec.batch(a, b, *args[2:], **kw), argnums=(0, 1))(st["lw"], st["ll"])
    return (val, -np.asarray(g[0]), np.asarray(g[1]), dw_s, dl_s, bval, -np.asarray(gb[0]), np.asarray(gb[1]))


# ----------------------------------------------------------------------------------------------
# Stand-ins


class _Acc:
    device = torch.device("cpu")

    def gather_for_metrics(self, x):
        return x

    def gather(self, x):
        return x


def _base_self(**attrs):
    return SimpleNamespace(model=SimpleNamespace(training=True), accelerator=_Acc(), aux_loss_enabled=False,
                           _metrics=defaultdict(lambda: defaultdict(list)), _total_train_tokens=0, _tp_size=1,
                           **attrs)


def _token_table(sums, lens, T):
    """[R, T] per-token log-probs: row i holds lens[i] tokens of sums[i]/lens[i], then zeros."""
    pos = torch.arange(T, dtype=T64)[None, :]
    mask = (pos < lens[:, None]).to(T64)
    return (sums / lens)[:, None] * mask, mask


def _leaves(st, idx):
    lw = torch.tensor(st["lw"][idx], dtype=T64, requires_grad=True)
    ll = torch.tensor(st["ll"][idx], dtype=T64, requires_grad=True)
    return lw, ll


def _grads(loss, lw, ll):
    gw, gl = torch.autograd.grad(loss, (lw, ll), allow_unused=True)
    gw = torch.zeros_like(lw) if gw is None else gw
    gl = torch.zeros_like(ll) if gl is None else gl
    return float(loss.detach()), -gw.double().numpy(), gl.double().numpy()


# ---- DPOTrainer._compute_loss with a fused-head stand-in model


def trl_dpo(loss_type, st, idx, *, beta=0.1, label_smoothing=0.0, f_divergence_type="reverse_kl",
            f_alpha_divergence_coef=0.5, discopop_tau=0.05):
    global T64
    # TRL's alpha-divergence branch only runs in float16/bfloat16/float32 (its clamp table has no
    # float64 key), so those cases are computed by TRL in float32.
    alpha = f_divergence_type == "alpha_divergence" and abs(f_alpha_divergence_coef - 1) >= 1e-6
    saved, T64 = T64, (torch.float32 if alpha else T64)
    try:
        return _trl_dpo(loss_type, st, idx, beta=beta, label_smoothing=label_smoothing,
                        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef,
                        discopop_tau=discopop_tau)
    finally:
        T64 = saved


def _trl_dpo(loss_type, st, idx, *, beta, label_smoothing, f_divergence_type, f_alpha_divergence_coef,
             discopop_tau):
    lw, ll = _leaves(st, idx)
    lens = torch.tensor(np.concatenate([st["nw"][idx], st["nl"][idx]]), dtype=T64)
    T = int(lens.max())
    logps, mask = _token_table(torch.cat([lw, ll]), lens, T)
    R = len(lens)
    completion_mask = torch.cat([torch.zeros(R, 1, dtype=torch.long), mask.long()], 1)
    zeros = torch.zeros(R, T, dtype=T64)
    outputs = SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros,
                              is_top1=torch.zeros(R, T, dtype=torch.bool))
    inputs = {"input_ids": torch.zeros(R, T + 1, dtype=torch.long), "attention_mask": torch.ones(R, T + 1),
              "completion_mask": completion_mask,
              "ref_chosen_logps": torch.tensor(st["rw0"][idx], dtype=T64),
              "ref_rejected_logps": torch.tensor(st["rl0"][idx], dtype=T64)}
    self = _base_self(ld_alpha=None, precompute_ref_logps=True, f_divergence_type=f_divergence_type,
                      f_alpha_divergence_coef=f_alpha_divergence_coef, beta=beta, loss_types=[loss_type],
                      loss_weights=[1.0], label_smoothing=label_smoothing, use_weighting=False,
                      args=SimpleNamespace(discopop_tau=discopop_tau))
    loss = DPOTrainer._compute_loss(self, lambda **kw: outputs, inputs, return_outputs=False)
    return _grads(loss, lw, ll)


# ---- KTOTrainer._compute_loss: rows [chosen..., rejected...], z0 from the KL rows


def trl_kto(loss_type, st, idx, *, beta=0.1, desirable_weight=1.0, undesirable_weight=1.0, kl=0.0):
    lw, ll = _leaves(st, idx)
    B = len(lw)
    lens = torch.tensor(np.concatenate([st["nw"][idx], st["nl"][idx]]), dtype=T64)
    T = int(lens.max())
    logps, mask = _token_table(torch.cat([lw, ll]), lens, T)
    R = 2 * B
    zeros = torch.zeros(R, T, dtype=T64)
    kl_ids = torch.zeros(R, 2, dtype=torch.long)
    # KL rows: one token each, log-prob kl + 0.3 under the policy and 0.3 under the reference,
    # so TRL's estimate mean(KL_logps - ref_KL_logps) (detached, clamped at 0) is z0 = kl.
    kl_out = SimpleNamespace(log_probs=torch.full((R, 1), -0.3 + kl, dtype=T64))

    def model(**kw):
        if kw["input_ids"] is kl_ids:
            return kl_out
        return SimpleNamespace(log_probs=logps, entropy=zeros, mean_logits=zeros)

    inputs = {"input_ids": torch.zeros(R, T + 1, dtype=torch.long), "attention_mask": torch.ones(R, T + 1),
              "completion_mask": torch.cat([torch.zeros(R, 1, dtype=torch.long), mask.long()], 1),
              "label": torch.tensor([True] * B + [False] * B),
              "ref_logps": torch.tensor(np.concatenate([st["rw0"][idx], st["rl0"][idx]]), dtype=T64),
              "KL_input_ids": kl_ids, "KL_attention_mask": torch.ones(R, 2, dtype=torch.long),
              "KL_completion_mask": torch.tensor([[0, 1]] * R), "ref_KL_logps": torch.full((R,), -0.3, dtype=T64)}
    self = _base_self(calculate_KL=True, precompute_ref_logps=True, loss_type=loss_type, beta=beta,
                      desirable_weight=desirable_weight, undesirable_weight=undesirable_weight)
    self._compute_kl_logps = MethodType(KTOTrainer._compute_kl_logps, self)
    loss = KTOTrainer._compute_loss(self, model, inputs, return_outputs=False)
    return _grads(loss, lw, ll)


# ---- CPO / ORPO / TPO: a stand-in model returning two-token logits


def _logit_model(targets):
    """Model whose logits [R, S, 2] give log-softmax[..., 0] = targets (label id 0 everywhere)."""
    t = torch.clamp(targets, max=-1e-12)
    logits = torch.stack([torch.zeros_like(t), torch.log(torch.expm1(-t))], -1)
    return lambda *a, **kw: SimpleNamespace(logits=logits)


def _sequences(st, idx, lw, ll, *, gold=None):
    """Rows [chosen..., rejected..., (gold...)]: prompt of P tokens then the completion.

    Returns (targets [R, S] per-position log-prob of the NEXT token, attention [R, S], completion
    mask [R, S], labels [R, S] with -100 outside completions)."""
    P = st["P"][idx].astype(int)
    parts = [(lw, st["nw"][idx]), (ll, st["nl"][idx])] + ([gold] if gold is not None else [])
    S = int(max((P + np.asarray(n).astype(int)).max() for _, n in parts))
    rows_t, rows_a, rows_c = [], [], []
    for sums, n in parts:
        for i in range(len(P)):
            p, k = int(P[i]), int(n[i])
            tgt = [torch.tensor(-0.7, dtype=T64)] * S
            for j in range(1, p):  # position j-1 predicts prompt token j
                tgt[j - 1] = torch.tensor(st["tp"][idx][i], dtype=T64)
            for j in range(p, p + k):  # completion tokens: l / n each
                tgt[j - 1] = sums[i] / k
            rows_t.append(torch.stack(tgt))
            rows_a.append([1] * (p + k) + [0] * (S - p - k))
            rows_c.append([0] * p + [1] * k + [0] * (S - p - k))
    att, comp = torch.tensor(rows_a), torch.tensor(rows_c)
    labels = torch.where(comp == 1, torch.zeros_like(comp), torch.full_like(comp, -100))
    return torch.stack(rows_t), att, comp, labels


def _pair_batch(att, comp, labels, B):
    ids = torch.zeros_like(att)
    return {"chosen_input_ids": ids[:B], "chosen_attention_mask": att[:B], "chosen_labels": labels[:B],
            "rejected_input_ids": ids[B:2 * B], "rejected_attention_mask": att[B:2 * B],
            "rejected_labels": labels[B:2 * B]}


def trl_cpo(loss_type, st, idx, *, beta=0.1, label_smoothing=0.0, cpo_alpha=1.0, alpha=0.0, simpo_gamma=0.5):
    lw, ll = _leaves(st, idx)
    tgt, att, comp, labels = _sequences(st, idx, lw, ll)
    self = _base_self(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, cpo_alpha=cpo_alpha,
                      alpha=alpha, simpo_gamma=simpo_gamma, is_encoder_decoder=False, pad_token_id=0,
                      concatenated_inputs=CPOTrainer.concatenated_inputs, get_batch_logps=CPOTrainer.get_batch_logps)
    self.cpo_loss = MethodType(CPOTrainer.cpo_loss, self)
    self.concatenated_forward = MethodType(CPOTrainer.concatenated_forward, self)
    loss, _ = CPOTrainer.get_batch_loss_metrics(self, _logit_model(tgt), _pair_batch(att, comp, labels, len(lw)))
    return _grads(loss, lw, ll)


def trl_orpo(st, idx, *, beta=0.1):
    lw, ll = _leaves(st, idx)
    tgt, att, comp, labels = _sequences(st, idx, lw, ll)
    self = _base_self(beta=beta, is_encoder_decoder=False, padding_value=0,
                      concatenated_inputs=ORPOTrainer.concatenated_inputs, get_batch_logps=ORPOTrainer.get_batch_logps)
    self.odds_ratio_loss = MethodType(ORPOTrainer.odds_ratio_loss, self)
    self.concatenated_forward = MethodType(ORPOTrainer.concatenated_forward, self)
    loss, _ = ORPOTrainer.get_batch_loss_metrics(self, _logit_model(tgt), _pair_batch(att, comp, labels, len(lw)))
    return _grads(loss, lw, ll)


def trl_tpo(loss_type, st, idx, *, beta=0.01, label_smoothing=0.0, tpo_l_gamma=0.5, tpo_alpha=0.0):
    lw, ll = _leaves(st, idx)
    gold = None
    if tpo_alpha != 0.0:
        ng = st["nw"][idx]
        gold = (torch.tensor(-0.9 * ng, dtype=T64), ng)
    tgt, att, comp, labels = _sequences(st, idx, lw, ll, gold=gold)
    inputs = {"input_ids": torch.zeros_like(att), "attention_mask": att, "completion_mask": comp}
    self = _base_self(loss_type=loss_type, beta=beta, label_smoothing=label_smoothing, tpo_l_gamma=tpo_l_gamma,
                      tpo_alpha=tpo_alpha)
    loss = TPOTrainer._compute_loss(self, _logit_model(tgt), inputs, return_outputs=False)
    return _grads(loss, lw, ll)


# ----------------------------------------------------------------------------------------------
# Cases: registry entry -> (TRL call, our hyperparameters)

_F_CASES = [dict(f_divergence_type="forward_kl"), dict(f_divergence_type="js_divergence"),
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=0.5),
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.0),  # reverse-KL fallback
            dict(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=1.5)]
_DPO_EXTRA = {"robust": dict(label_smoothing=0.2), "exo_pair": dict(label_smoothing=1e-3),
              "aot": dict(label_smoothing=0.1), "aot_unpaired": dict(label_smoothing=0.1)}


def _cases():
    dpo = ["sigmoid", "hinge", "ipo", "exo_pair", "nca_pair", "robust", "bco_pair", "sppo_hard", "aot",
           "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft", "sigmoid_norm"]
    for n in dpo:
        yield n, n, "dpo", dict(_DPO_EXTRA.get(n, {}))
        if n in losses.F_DIVERGENCE_LOSSES and n != "sft":
            for f in _F_CASES:
                yield n, n, "dpo", dict(_DPO_EXTRA.get(n, {}), **f)
    for n, t, hp in [("cpo_sigmoid", "sigmoid", {}), ("cpo_sigmoid", "sigmoid", dict(label_smoothing=0.1)),
                     ("cpo_simpo", "simpo", {}), ("cpo_simpo", "simpo", dict(alpha=-0.3)),
                     ("simpo", "simpo", {}), ("simpo", "simpo", dict(label_smoothing=0.1)),
                     ("cpo_hinge", "hinge", {}), ("cpo_ipo", "ipo", {}), ("alphapo", "simpo", dict(alpha=0.25))]:
        yield n, t, "cpo", hp
    yield "orpo", None, "orpo", {}
    for n in ("kto", "apo_zero_unpaired"):
        yield n, n, "kto", dict(reduction="row_mean")
    yield "kto", "kto", "kto", dict(reduction="row_mean", kl=0.7, desirable_weight=1.5, undesirable_weight=0.5)
    for n, t, hp in [("tpo", "sigmoid", {}), ("tpo", "sigmoid", dict(label_smoothing=0.1)),
                     ("tpo_hinge", "hinge", {}), ("tpo_ipo", "ipo", {}), ("tpo_l", "tpo-l", {})]:
        yield n, t, "tpo", hp


CASES = list(_cases())


def _trl(kind, trl_type, name, st, idx, hp):
    spec = losses.get(name)
    full = spec.resolve(**hp)
    if kind == "dpo":
        kw = {k: full[k] for k in ("beta", "label_smoothing", "f_divergence_type", "f_alpha_divergence_coef",
                                   "discopop_tau") if k in full}
        return trl_dpo(trl_type, st, idx, **kw)
    if kind == "cpo":
        kw = {k: full[k] for k in ("beta", "label_smoothing", "cpo_alpha", "alpha", "simpo_gamma") if k in full}
        return trl_cpo(trl_type, st, idx, **kw)
    if kind == "orpo":
        return trl_orpo(st, idx, beta=full["beta"])
    if kind == "kto":
        kw = {k: full[k] for k in ("beta", "desirable_weight", "undesirable_weight", "kl") if k in full}
        return trl_kto(trl_type, st, idx, **kw)
    kw = {k: full[k] for k in ("beta", "label_smoothing", "tpo_l_gamma") if k in full}
    return trl_tpo(trl_type, st, idx, **kw)


def _sym_hp(name, hp):
    """Hyperparameters fixed in the derivation: structural ones, and the alpha-divergence
    coefficient except for `sigmoid`, which keeps `a` a symbol so the SymPy Piecewise fallback
    (|a - 1| < 1e-6 -> reverse KL) is exercised numerically; fixed values keep the others fast."""
    spec = losses.get(name)
    keep = {k: v for k, v in hp.items() if spec.hyper(k).structural or spec.hyper(k).keep_value}
    if "f_alpha_divergence_coef" in hp and name != "sigmoid":
        keep["f_alpha_divergence_coef"] = hp["f_alpha_divergence_coef"]
    return keep


def _rel_elementwise(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b) / np.maximum(np.abs(b), ATOL / RTOL)))


EPS32 = float(np.finfo(np.float32).eps)
F32_TOL = 64 * EPS32  # ~7.6e-6: 64 float32 ulps of the batch's largest magnitude


def _trl_float32(kind, hp):
    """TRL's alpha-divergence branch (a != 1) cannot run in float64: it looks the dtype up in a
    {float16, bfloat16, float32} clamp table (KeyError for float64). Those cases run TRL in float32
    and are compared normwise, max|ours - TRL| / max|TRL| <= 64 eps_32, since an incentive that is
    a difference of terms (discopop near its zero crossing) has no float32 relative accuracy."""
    return (kind == "dpo" and hp.get("f_divergence_type") == "alpha_divergence"
            and abs(hp.get("f_alpha_divergence_coef", 0.5) - 1) >= 1e-6)


def _normwise(a, b):
    a, b = np.asarray(a, float), np.asarray(b, float)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), ATOL / RTOL))


def agreement(name, trl_type, kind, hp, B=5, seed=0):
    """Max relative error of every compared quantity (per pair and batch) for one case
    (normwise for the float32 TRL cases, see `_trl_float32`)."""
    _rel = _normwise if _trl_float32(kind, hp) else _rel_elementwise
    st = _states(B, seed)
    if name in ("hinge", "cpo_hinge", "tpo_hinge"):  # stay away from the hinge's kink
        st = _states(B, seed + 100)
    ours = _ours(name, st, hp, _sym_hp(name, hp))
    errs = {}
    per = [_trl(kind, trl_type, name, st, [i], hp) for i in range(B)]
    tv = np.array([p[0] for p in per])
    tdw = np.array([p[1][0] for p in per])
    tdl = np.array([p[2][0] for p in per])
    errs["value"] = _rel(ours[0], tv)
    errs["d_w (jax.grad)"] = _rel(ours[1], tdw)
    errs["d_l (jax.grad)"] = _rel(ours[2], tdl)
    errs["d_w (SymPy)"] = _rel(ours[3], tdw)
    errs["d_l (SymPy)"] = _rel(ours[4], tdl)
    bv, bdw, bdl = _trl(kind, trl_type, name, st, list(range(B)), hp)
    errs["batch value"] = _rel(ours[5], bv)
    errs["batch d_w"] = _rel(ours[6], bdw)
    errs["batch d_l"] = _rel(ours[7], bdl)
    return errs


@pytest.mark.parametrize("name,trl_type,kind,hp", CASES,
                         ids=[f"{c[0]}-{'-'.join(f'{k}={v}' for k, v in c[3].items())}" for c in CASES])
def test_registry_equals_trl_loss_code(name, trl_type, kind, hp):
    errs = agreement(name, trl_type, kind, hp)
    tol = RTOL
    if _trl_float32(kind, hp):
        # discopop's incentive holds mu (1 - mu)/tau_d terms, 1/tau_d (= 20) times its own scale,
        # which multiplies the float32 rounding by the same factor.
        tol = F32_TOL * (1 + (1 / losses.get(name).resolve(**hp)["discopop_tau"] if name == "discopop" else 0))
    bad = {k: v for k, v in errs.items() if not v <= tol}
    assert not bad, f"{name} {hp}: relative errors above {tol}: {bad}"


def test_every_trl_entry_is_checked():
    """Each registry entry that names a TRL equivalent has at least one case above."""
    with_trl = {n for n in losses.names() if losses.get(n).trl}
    assert with_trl == {c[0] for c in CASES}
    for n in with_trl:
        assert losses.get(n).trl_version and losses.TRL_TESTED in losses.get(n).trl_version


def test_f_divergence_refusals_match_trl():
    """TRL's own list of losses that accept an f-divergence (read from its __init__), and ours."""
    src = inspect.getsource(DPOTrainer.__init__)
    found = re.search(r"f_divergence_loss_types = \{([^}]*)\}", src)
    trl_set = set(re.findall(r'"(\w+)"', found.group(1)))
    assert trl_set == set(losses.F_DIVERGENCE_LOSSES)
    dpo_entries = [n for n in losses.names() if (losses.get(n).trl or "").startswith("DPOTrainer:")]
    for n in dpo_entries:
        spec = losses.get(n)
        if n in trl_set:
            spec(-1.0, -2.0, f_divergence_type="forward_kl")  # accepted
        else:
            with pytest.raises(ValueError, match="only with"):
                spec(-1.0, -2.0, f_divergence_type="forward_kl")


def test_tpo_gold_nll_leaves_incentives_unchanged():
    """With TRL's default tpo_alpha = 1 the gold NLL changes TRL's value but not d_w, d_l."""
    st = _states(4, 3)
    for name, t in (("tpo", "sigmoid"), ("tpo_l", "tpo-l")):
        ours = _ours(name, st, {}, {})
        v1, dw1, dl1 = trl_tpo(t, st, list(range(4)), tpo_alpha=1.0)
        assert _rel_elementwise(ours[6], dw1) <= RTOL and _rel_elementwise(ours[7], dl1) <= RTOL
        assert abs(v1 - ours[5]) > 0.1  # the gold term is really there on TRL's side


def test_kto_pair_sum_is_twice_trl():
    st = _states(3, 5)
    ours = _ours("kto", st, {}, {})
    v, dw, dl = trl_kto("kto", st, list(range(3)))
    r = _rel_elementwise
    assert r(ours[5], 2 * v) <= RTOL and r(ours[6], 2 * dw) <= RTOL and r(ours[7], 2 * dl) <= RTOL


if __name__ == "__main__":  # agreement table: entry -> max relative error over its cases
    import jax

    jax.config.update("jax_enable_x64", True)
    table, table32 = defaultdict(float), defaultdict(float)
    for c in CASES:
        t = table32 if _trl_float32(c[2], c[3]) else table
        t[c[0]] = max(t[c[0]], max(agreement(*c).values()))
    for k, v in table.items():
        extra = f"   alpha-div vs TRL float32 (normwise): {table32[k]:.2e}" if k in table32 else ""
        print(f"{k:20s} {v:.2e}{extra}")
    print("max", f"{max(table.values()):.2e}", "cases", len(CASES))
