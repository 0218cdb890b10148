"""Exact per-response gradients: `torch.func.vmap(grad)` over responses, and, where `torch.func` cannot
transform the model (custom autograd functions such as BLOOM's GELU, data-dependent control flow such
as an eager mixture-of-experts loop), one ordinary backward per response, chunked, with a one-line
notice saying why (once per model)."""
from __future__ import annotations

import logging
import warnings
import weakref

import torch

log = logging.getLogger("entangle_sim.torch")

# model -> reason torch.func could not transform it (the loop is used from then on)
NO_VMAP: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def _row_logp(model, ids, cm, acc, **extra):
    """Sum of completion-token log-probs of one unpadded row (ids [S], cm [S])."""
    ones = torch.ones(1, ids.shape[-1], dtype=torch.long)
    out = model(input_ids=ids[None], attention_mask=ones, use_cache=False, **extra)
    lp = torch.log_softmax(out.logits[0, :-1].to(acc), -1)
    return (lp.gather(-1, ids[1:, None]).squeeze(-1) * cm[1:].to(acc)).sum()


def _vmap_grads(model, params, input_ids, completion_mask, acc):
    from torch.func import functional_call, grad, vmap

    names = list(params)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def logp_one(psel, ids, cm):
        # Right padding is causal-invisible to the real tokens, so one row takes an all-ones mask (an
        # unbatched constant: the model's mask checks are no data-dependent control flow under vmap).
        ones = torch.ones(1, ids.shape[-1], dtype=torch.long)
        out = functional_call(model, (psel, frozen, buffers), args=(),
                              kwargs={"input_ids": ids[None], "attention_mask": ones, "use_cache": False})
        lp = torch.log_softmax(out.logits[0, :-1].to(acc), -1)
        return (lp.gather(-1, ids[1:, None]).squeeze(-1) * cm[1:].to(acc)).sum()

    psel = {n: params[n].detach() for n in names}
    with warnings.catch_warnings():
        # functorch loops over attention kernels without a batching rule: slower, same numbers
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        g = vmap(grad(logp_one), in_dims=(None, 0, 0))(psel, input_ids, completion_mask)
    return torch.cat([g[n].reshape(input_ids.shape[0], -1).to(acc) for n in names], 1)


def loop_grads(model, params, input_ids, attention_mask, completion_mask, acc):
    """[N, |theta_sel|]: one ordinary forward + backward per response (unpadded)."""
    plist = list(params.values())
    out = []
    for i in range(input_ids.shape[0]):
        n = int(attention_mask[i].sum())
        with torch.enable_grad():
            lp = _row_logp(model, input_ids[i, :n], completion_mask[i, :n], acc)
            gs = torch.autograd.grad(lp, plist, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1).to(acc)
                              for p, g in zip(plist, gs)]))
    return torch.stack(out)


def exact_grads(model, params, input_ids, attention_mask, completion_mask, acc):
    """[N, |theta_sel|] per-response gradients (flattened, accumulation dtype), vmapped when possible."""
    if model not in NO_VMAP:
        try:
            return _vmap_grads(model, params, input_ids, completion_mask, acc)
        except Exception as e:  # noqa: BLE001 - any torch.func failure: the ordinary loop gives the same numbers
            why = str(e).splitlines()[0][:160] if str(e) else type(e).__name__
            NO_VMAP[model] = why
            log.warning("entangle_sim: torch.func cannot transform %s (%s); exact uses one backward per "
                        "response", type(model).__name__, why)
    return loop_grads(model, params, input_ids, attention_mask, completion_mask, acc)
