"""Adam-preconditioned gradient geometry: per-pair Grams <g_w, P g_l> and one-step Adam predictions.

With P = diag(1/(sqrt(v_hat) + eps)) from an Adam state (`optim_state.AdamState`), the per-pair
preconditioned Gram is

    G_ww_adam = <g_w, P g_w>,  G_wl_adam = <g_w, P g_l>,  G_ll_adam = <g_l, P g_l>

and the per-pair first-order changes under the preconditioned step theta -= eta P dL/dtheta are the
plain formulas with these entries (delta_chosen = eta (d_w G_ww_adam - d_l G_wl_adam), ...): pass
them to `entangle_sim.torch.theory.evaluate` as G_ww/G_wl/G_ll. The ghost identity does not factor
a diagonal P, so per-response gradients have to be formed, but only ONE parameter's at a time
(method "auto"/"ghost"): one verified ghost capture of `chunk_size` pairs gives every module's
factors (`capture.capture`: g_k(p) = sum_t L[k,t]^T R[k,t], or a flat vector), and each parameter's
per-response gradients [2 chunk_size, *p.shape] are rebuilt from them (one weight-gradient-sized
matmul per parameter: L^T R), reduced against P and freed before the next; a parameter larger than
`GRAD_SLICE_ELEMS` elements across the responses (an embedding / LM head of 50257 x 768) is rebuilt
in slices of its first dimension. Peak memory ~ one layer, not |theta|. Where the capture is
unsupported ("auto"), or with method "exact", the whole per-response gradients are materialised
instead (`torch.func.vmap(grad)` over responses; memory ~ 2 chunk_size |theta|). Per-parameter-group
splits come at no extra cost (`parameter_group`).

One real Adam(W) step from a state (m, v, t) on a batch gradient grad = dL/dtheta is
(torch.optim.AdamW, derived from its update rule):

    m' = b1 m + (1-b1) grad,   v' = b2 v + (1-b2) grad^2,   t' = t + 1
    dtheta = -lr [ m'/(1-b1^t') / (sqrt(v'/(1-b2^t')) + eps) + wd theta ]

and each log-prob changes by <g_i, dtheta> to first order in lr (this project's prediction).
`adam_step_prediction` evaluates that with v' either frozen at the checkpoint's v (P of the state:
the per-pair Gram's linearisation) or updated with grad^2 (the step's exact direction). It also
splits the change into the loss-driven part  lr (1-b1)/(1-b1^t') <g_i, P (-grad)>  and the
loss-independent drift from momentum and weight decay.
"""
from __future__ import annotations

import re

import numpy as np
import torch

from .capture import acc_dtype
from .exact import exact_grads
from .geometry import (check_method, fallback, ghost_capture, measuring, named_parameter_aliases, response_logps,
                       select_parameters)
from .rules import Unsupported

# elements of one rebuilt slice [K responses, rows, ...] of a parameter's per-response gradients
# (2^24: 64 MB in float32): bounds the per-layer path's peak at about one GPT-2-small layer's worth
GRAD_SLICE_ELEMS = 1 << 24


# ----------------------------------------------------------------------------------------------
# parameter groups
# ----------------------------------------------------------------------------------------------
_BLOCK = re.compile(r"(?:^|\.)(?:h|layers|layer|blocks|block)\.(\d+)\.")


def parameter_group(name: str) -> str:
    """Coarse group of a parameter name: 'lora', 'embeddings', 'lm_head', 'norms', 'block{i}.attention',
    'block{i}.mlp', 'block{i}.other' or 'other'.

    >>> parameter_group("transformer.h.1.attn.c_attn.weight"), parameter_group("model.norm.weight")
    ('block1.attention', 'norms')
    """
    low = name.lower()
    if "lora_" in low:
        return "lora"
    if re.search(r"(^|\.)(lm_head|embed_out)(\.|$)", low):
        return "lm_head"
    if re.search(r"(^|\.)(wte|wpe|embed_tokens|embed_in|embed_positions|word_embeddings)(\.|$)", low):
        return "embeddings"
    if re.search(r"(^|[._])(ln|norm|layernorm|rmsnorm)[_.0-9]|norm(\.|$)", low):
        return "norms"
    m = _BLOCK.search(name)
    if m:
        i = m.group(1)
        if re.search(r"attn|attention", low):
            return f"block{i}.attention"
        if re.search(r"mlp|ffn|feed_forward", low):
            return f"block{i}.mlp"
        return f"block{i}.other"
    return "other"


def parameter_groups(model, names) -> dict[str, str]:
    """{name: group} with a weight tied across groups (GPT-2's wte = lm_head) labelled by all its
    groups joined with '+' (e.g. 'embeddings+lm_head')."""
    out = {}
    aliases = named_parameter_aliases(model)
    first = {al[0]: al for al in aliases.values()}
    for n in names:
        gs = sorted({parameter_group(a) for a in first.get(n, [n])})
        out[n] = "+".join(gs)
    return out


# ----------------------------------------------------------------------------------------------
# per-response gradients
# ----------------------------------------------------------------------------------------------
def response_grads(model, params: dict, input_ids, completion_mask, attention_mask=None) -> dict[str, torch.Tensor]:
    """{name: [N, *shape]} per-response gradients of the summed completion log-prob (accumulation
    dtype: float64 for a float64 model, else float32), from `exact.exact_grads`: vmapped, or one ordinary
    backward per response where torch.func cannot transform the model (BLOOM, eager MoE loops).
    Rows are right-padded; attention_mask (default all ones: right padding is causally invisible to
    the completion) only trims each row for the ordinary-backward path."""
    am = torch.ones_like(input_ids) if attention_mask is None else attention_mask
    flat = exact_grads(model, params, input_ids, am, completion_mask, acc_dtype(model))
    out, i = {}, 0
    for n, p in params.items():
        out[n] = flat[:, i:i + p.numel()].reshape(-1, *p.shape)
        i += p.numel()
    return out


def _trim(batch):
    S = int(batch["attention_mask"].sum(1).max())
    return {k: v[:, :S] for k, v in batch.items() if k in ("input_ids", "attention_mask", "completion_mask")}


def _params(model, subset, P):
    params = select_parameters(model, subset)
    if P is not None:
        missing = [n for n in params if n not in P]
        if missing:
            from .optim_state import OptimizerStateError
            raise OptimizerStateError(f"the optimiser state has no entry for parameter {missing[0]!r} "
                                      f"({len(missing)} of {len(params)} selected; measure the trainable "
                                      "parameters, subset='trainable')")
        for n, p in params.items():
            if tuple(P[n].shape) != tuple(p.shape):
                from .optim_state import OptimizerStateError
                raise OptimizerStateError(f"preconditioner of {n!r} has shape {tuple(P[n].shape)}, "
                                          f"the parameter {tuple(p.shape)}")
    return params


def preconditioned_pair_gram(model, batch, P: dict[str, torch.Tensor] | None = None, *, subset=None,
                             chunk_size: int = 2, by_group: bool = False, method: str = "auto") -> dict:
    """Per pair (numpy float64 [B]): G_ww, G_wl, G_ll (plain) and, when P is given, G_ww_adam,
    G_wl_adam, G_ll_adam = <g_a, P g_b>; with by_group also {'by_group': {group: {key: [B]}}}.

    batch: TRL-collated ([2B, S], chosen rows first); P: {name: tensor shaped like the parameter}
    covering every selected parameter (`AdamState.preconditioners()`). method: "auto" (per layer from
    the ghost factors, the whole gradients where the capture is unsupported), "ghost" (per layer, or
    ValueError) or "exact" (the whole per-response gradients, `chunk_size` pairs at a time).
    """
    check_method(method)
    batch = _trim(batch)
    N = batch["input_ids"].shape[0]
    if N % 2:
        raise ValueError("batch must hold 2B rows: B chosen then B rejected")
    params = _params(model, subset, P)
    acc = acc_dtype(model)
    Pa = None if P is None else {n: P[n].to(acc) for n in params}
    keys = ["G_ww", "G_wl", "G_ll"] + (["G_ww_adam", "G_wl_adam", "G_ll_adam"] if P is not None else [])
    groups = parameter_groups(model, params)
    if method != "exact":
        try:
            parts = _gram_per_layer(model, batch, params, Pa, keys, groups, chunk_size, acc)
        except Unsupported as e:
            fallback(method, e, "preconditioned_pair_gram")
            parts = None
    if method == "exact" or parts is None:
        parts = _gram_materialised(model, batch, params, Pa, keys, groups, chunk_size, acc)
    tot, grp = parts
    out = {k: torch.cat(v).double().numpy() for k, v in tot.items()}
    if by_group:
        out["by_group"] = {gname: {k: torch.cat(v).double().numpy() for k, v in d.items()}
                           for gname, d in sorted(grp.items())}
    return out


def _reduce(gw, gl, Pa, b):
    """The Gram entries of one parameter (or slice) from its per-response gradients gw, gl [b, ...]."""
    gw, gl = gw.reshape(b, -1), gl.reshape(b, -1)
    vals = {"G_ww": (gw * gw).sum(1), "G_wl": (gw * gl).sum(1), "G_ll": (gl * gl).sum(1)}
    if Pa is not None:
        Pn = Pa.reshape(1, -1)
        pw = gw * Pn
        vals.update(G_ww_adam=(pw * gw).sum(1), G_wl_adam=(pw * gl).sum(1), G_ll_adam=((gl * Pn) * gl).sum(1))
    return vals


def _add(part, gpart, group, vals):
    for k, v in vals.items():
        part[k] += v
        gp = gpart.setdefault(group, {})
        gp[k] = gp.get(k, 0) + v


def _collect(tot, grp, part, gpart):
    for k, v in part.items():
        tot[k].append(v)
    for gname, d in gpart.items():
        for k, v in d.items():
            grp.setdefault(gname, {}).setdefault(k, []).append(v)


def _chunked_gram(model, batch, keys, chunk_size, acc, fill):
    """The loop both Gram paths share: pairs `chunk_size` at a time (chosen rows s..e, then their
    rejected rows), `fill(ids, attention_mask, completion_mask, b, part, gpart)` adding every
    parameter's reduction of the chunk; the chunks' parts collected."""
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    B = ids.shape[0] // 2
    tot = {k: [] for k in keys}
    grp: dict[str, dict[str, list]] = {}
    with measuring(model):
        for s in range(0, B, chunk_size):
            e = min(B, s + chunk_size)
            rows = torch.cat([torch.arange(s, e), B + torch.arange(s, e)])
            part = {k: torch.zeros(e - s, dtype=acc) for k in keys}
            gpart: dict[str, dict[str, torch.Tensor]] = {}
            fill(ids[rows], am[rows], cm[rows], e - s, part, gpart)
            _collect(tot, grp, part, gpart)
    return tot, grp


def _gram_materialised(model, batch, params, Pa, keys, groups, chunk_size, acc):
    """Whole per-response gradients (`response_grads`), `chunk_size` pairs at a time."""
    def fill(ids, am, cm, b, part, gpart):
        g = response_grads(model, params, ids, cm, am)
        for n, gn in g.items():
            _add(part, gpart, groups[n], _reduce(gn[:b], gn[b:], None if Pa is None else Pa[n], b))

    return _chunked_gram(model, batch, keys, chunk_size, acc, fill)


def param_grad_slices(p, entries, K: int, acc, max_elems: int | None = None):
    """(rows, g) pieces of parameter p's per-response gradients rebuilt from its factor entries
    (`rules`: ("mat", L, R) with g_k = sum_t L[k,t]^T R[k,t], L dense [K,T,r] or token ids [K,T];
    ("vec", V [K, numel])): g [K, *p.shape] restricted to p's first-dimension `rows` (a slice), in
    slices of at most max_elems (default `GRAD_SLICE_ELEMS`) elements (at least one row). Raises Unsupported for a matrix entry
    of a parameter that is not 2-D."""
    max_elems = GRAD_SLICE_ELEMS if max_elems is None else max_elems
    shape = tuple(p.shape) or (1,)
    n_rows, per_row = shape[0], int(np.prod(shape[1:], dtype=np.int64))
    step = max(1, max_elems // max(1, K * per_row))
    for e in entries:
        if e[0] == "mat" and len(shape) != 2:
            raise Unsupported(f"a matrix factor for a parameter of shape {tuple(p.shape)}")
    for i0 in range(0, n_rows, step):
        i1 = min(n_rows, i0 + step)
        g = torch.zeros(K, i1 - i0, *shape[1:], dtype=acc)
        for e in entries:
            if e[0] == "vec":
                g += e[1].reshape(K, *shape)[:, i0:i1].to(acc)
            elif e[1].dtype.is_floating_point:  # L [K,T,rows] -> sum_t L[k,t,i] R[k,t,j]
                g += torch.bmm(e[1][:, :, i0:i1].transpose(1, 2).to(acc), e[2].to(acc))
            else:  # token ids: row ids[k,t] of g_k gets R[k,t]
                ids, R = e[1], e[2]
                hit = (ids >= i0) & (ids < i1)
                k_of = torch.arange(K).unsqueeze(1).expand_as(ids)[hit]
                g.view(K * (i1 - i0), -1).index_add_(0, k_of * (i1 - i0) + (ids[hit] - i0), R[hit].to(acc))
        yield slice(i0, i1), g


def _gram_per_layer(model, batch, params, Pa, keys, groups, chunk_size, acc):
    """One verified ghost capture per `chunk_size` pairs; each parameter's per-response gradients
    rebuilt (`param_grad_slices`), reduced against P and freed before the next parameter."""
    def fill(ids, am, cm, b, part, gpart):
        _, F = ghost_capture(model, params, ids, am, cm, "pair")
        for n, p in params.items():
            entries = F.fac.get(p)
            if not entries:  # not used by this forward: zero gradient (the group still listed)
                _add(part, gpart, groups[n], {k: torch.zeros(b, dtype=acc) for k in keys})
                continue
            Pn = None if Pa is None else Pa[n].reshape(p.shape[0] if p.dim() else 1, -1)
            for sl, g in param_grad_slices(p, entries, 2 * b, acc):
                _add(part, gpart, groups[n], _reduce(g[:b], g[b:], None if Pn is None else Pn[sl], b))
                del g

    return _chunked_gram(model, batch, keys, chunk_size, acc, fill)


# ----------------------------------------------------------------------------------------------
# one Adam step, to first order
# ----------------------------------------------------------------------------------------------
def adam_step_prediction(model, batch, state, c_w, c_l, *, lr: float | None = None, v_update: bool = False,
                         subset="trainable", chunk_size: int = 4, method: str = "auto") -> dict[str, np.ndarray]:
    """First-order change of every chosen/rejected log-prob under ONE more Adam(W) step from `state`.

    The batch loss gradient is  grad = -sum_j (c_w[j] g_w,j - c_l[j] g_l,j)  (c = incentives / B for
    a mean loss, as `measure.batch_prediction`). Returns numpy [B] arrays:
    delta_chosen / delta_rejected (total), *_loss (the part driven by this batch's gradient) and
    *_drift (momentum + weight decay, independent of the loss). v_update=False freezes v at the
    state's (the preconditioner of the per-pair Gram); True updates it with grad^2 as the step does.
    lr: default the state's (last scheduled) learning rate. <g_i, step> per response comes from one
    verified ghost capture per `chunk_size` responses (a directional product of the factors: no
    per-response gradient is formed) with method "auto"/"ghost", else (unsupported, or "exact") from
    the materialised per-response gradients.
    """
    check_method(method)
    batch = _trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    B = ids.shape[0] // 2
    params = select_parameters(model, subset)
    missing = [n for n in params if n not in state.exp_avg_sq]
    if missing:
        from .optim_state import OptimizerStateError
        raise OptimizerStateError(f"the optimiser state has no entry for parameter {missing[0]!r}")
    if lr is None and not any(state.lr[n] > 0 for n in params):
        raise ValueError(f"the optimiser state's learning rate is {state.lr[next(iter(params))]:g} (end of the "
                         f"schedule?); pass lr (the schedule's initial lr was {state.initial_lr.get(next(iter(params)))})")
    acc = acc_dtype(model)
    w = torch.cat([torch.as_tensor(np.asarray(c_w, dtype=float)), -torch.as_tensor(np.asarray(c_l, dtype=float))])
    with measuring(model):
        # u = -grad = sum_j w_j g_j (one backward of the weighted log-probs)
        with torch.enable_grad():
            lp = response_logps(model, ids, am, cm)
            gs = torch.autograd.grad((lp * w.to(lp.dtype)).sum(), list(params.values()), allow_unused=True)
        u = {n: (torch.zeros(p.shape, dtype=acc) if g is None else g.to(acc)) for (n, p), g in zip(params.items(), gs)}
        step_loss, step_drift = {}, {}
        for n, p in params.items():
            b1, b2 = state.betas[n]
            t = state.step[n]
            eps, wd = state.eps[n], state.weight_decay[n]
            eta = state.lr[n] if lr is None else lr
            v = state.exp_avg_sq[n].to(acc)
            if v_update:
                v = b2 * v + (1 - b2) * u[n] ** 2
                vhat = v / (1 - b2 ** (t + 1))
            else:
                vhat = v / (1 - b2 ** t)
            Pn = 1.0 / (vhat.sqrt() + eps)
            bc1 = 1 - b1 ** (t + 1)
            step_loss[n] = eta * (1 - b1) / bc1 * Pn * u[n]
            step_drift[n] = -eta * b1 / bc1 * Pn * state.exp_avg[n].to(acc) - eta * wd * p.detach().to(acc)
        lo_dr = None
        if method != "exact":
            try:
                lo_dr = _directional_ghost(model, params, ids, am, cm, [step_loss, step_drift], chunk_size)
            except Unsupported as e:
                fallback(method, e, "adam_step_prediction")
        if lo_dr is None:
            loss_part, drift_part = [], []
            for s in range(0, ids.shape[0], chunk_size):
                sl = slice(s, min(ids.shape[0], s + chunk_size))
                g = response_grads(model, params, ids[sl], cm[sl], am[sl])
                n_rows = sl.stop - sl.start
                loss_part.append(sum((g[n].reshape(n_rows, -1) @ step_loss[n].reshape(-1)) for n in params))
                drift_part.append(sum((g[n].reshape(n_rows, -1) @ step_drift[n].reshape(-1)) for n in params))
            lo_dr = torch.cat(loss_part), torch.cat(drift_part)
    lo, dr = (x.double().numpy() for x in lo_dr)
    return {"delta_chosen": lo[:B] + dr[:B], "delta_rejected": lo[B:] + dr[B:],
            "delta_chosen_loss": lo[:B], "delta_rejected_loss": lo[B:],
            "delta_chosen_drift": dr[:B], "delta_rejected_drift": dr[B:]}


def _directional_ghost(model, params, ids, am, cm, vs: list[dict], chunk_size: int):
    """[<g_i, v> for v in vs] ([N] each; v keyed by name) from one verified ghost capture per chunk."""
    from .capture import directional as factor_directional

    vps = [{params[n]: v[n] for n in params} for v in vs]
    outs = [[] for _ in vs]
    with measuring(model):
        for s in range(0, ids.shape[0], chunk_size):
            sl = slice(s, min(ids.shape[0], s + chunk_size))
            _, F = ghost_capture(model, params, ids[sl], am[sl], cm[sl], "directional")
            for o, v in zip(outs, vps):
                o.append(factor_directional(F, v))
    return [torch.cat(o) for o in outs]


def measure_adam(model, examples: list[dict], pad_token_id: int, state, *, subset="trainable", batch_size: int = 8,
                 chunk_size: int = 2, max_length: int | None = 1024, by_group: bool = False, progress=None,
                 method: str = "auto") -> dict:
    """`preconditioned_pair_gram` over tokenised examples, `batch_size` pairs per collated batch, with
    P from `state` (an `AdamState`; None: plain Gram only). Columns numpy [N]; by_group concatenated.
    method: "auto" (per layer from the ghost factors where supported), "ghost" or "exact"."""
    from .data import collate

    P = None
    if state is not None:
        names = list(select_parameters(model, subset))
        P = state.preconditioners(names, dtype=acc_dtype(model))
    cols: dict[str, list] = {}
    groups: dict[str, dict[str, list]] = {}
    for s in range(0, len(examples), batch_size):
        exs = examples[s:s + batch_size]
        r = preconditioned_pair_gram(model, collate(exs, pad_token_id, max_length=max_length), P, subset=subset,
                                     chunk_size=chunk_size, by_group=by_group, method=method)
        for gname, d in r.pop("by_group", {}).items():
            for k, v in d.items():
                groups.setdefault(gname, {}).setdefault(k, []).append(v)
        for k, v in r.items():
            cols.setdefault(k, []).append(v)
        if progress is not None:
            progress(len(exs))
    out = {k: np.concatenate(v) for k, v in cols.items()}
    if by_group:
        out["by_group"] = {g: {k: np.concatenate(v) for k, v in d.items()} for g, d in groups.items()}
    return out


def callback_metrics(model, examples: list[dict], pad_token_id: int, optimizer, c_w, c_l, *, lr: float | None = None,
                     subset="trainable", max_length: int | None = 1024) -> dict[str, float]:
    """`EntanglementCallback` values from the live optimiser: the mean first-order change of the probe
    pairs' chosen and rejected log-probs under one more AdamW step of `optimizer` on the probe batch
    (`adam_step_prediction`, v frozen at the optimiser's, momentum and weight decay included):

        {"entangle/pred_delta_chosen_adam": float, "entangle/pred_delta_rejected_adam": float}

    c_w, c_l: incentives / B of the probe batch's mean loss (as for `measure.batch_prediction`);
    lr: default the optimiser's current (scheduled) learning rate."""
    from .data import collate
    from .optim_state import from_optimizer

    state = from_optimizer(optimizer, model, copy=False)  # used at once, before the optimiser steps again
    batch = collate(examples, pad_token_id, max_length=max_length)
    p = adam_step_prediction(model, batch, state, c_w, c_l, lr=lr, subset=subset)
    return {"entangle/pred_delta_chosen_adam": float(np.mean(p["delta_chosen"])),
            "entangle/pred_delta_rejected_adam": float(np.mean(p["delta_rejected"]))}
