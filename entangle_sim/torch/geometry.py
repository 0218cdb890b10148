"""Per-pair, per-response and per-token gradient geometry of a PyTorch causal LM (Hugging Face forward).

A batch is TRL's collated preference format: `input_ids`, `attention_mask`, `completion_mask`, each
[2B, S], right-padded, rows 0..B-1 the chosen and B..2B-1 the rejected responses (exactly what
`trl.trainer.dpo_trainer.DataCollatorForPreference` and `entangle_sim.torch.data.collate` return).
The log-prob of a response is the sum over its completion tokens of log p(y_t | y_<t) (TRL's
`logps/chosen`, `logps/rejected`); g = d(log-prob)/d(theta) over the selected parameters.

Every driver (`pair_gram`, `response_gram`, `directional`, `token_gram`) goes the same way:

* ``ghost``: one capture per chunk (`capture.capture`: a hooked forward and one backward to the
  outputs of the modules owning selected parameters; per-module rules in `rules`), then a contraction
  of the factors. For y_t = W a_t the per-response gradient is sum_t delta_t a_t^T, so

      <dW, dW'> = sum_{t,s} <a_t, a'_s> <delta_t, delta'_s>

  and no parameter-sized per-response gradient is formed (Opacus' "ghost" products). The first capture
  of every (model, selection, layout) is verified response by response (`capture.verify`);
* ``exact``: per-response gradients by `torch.func` (`exact.exact_grads`), or one ordinary backward
  per response where `torch.func` cannot transform the model;
* ``auto``: ghost when its estimated cost is lower, and exact whenever ghost is unsupported
  (`rules.Unsupported`: unknown layout, failed verification, ...). ``ghost`` raises instead.

Subsets: None (all parameters), "trainable" (requires_grad, e.g. LoRA-only under PEFT), or a list
of name prefixes ("lm_head", "transformer.h.11"); a prefix matches a name or a dotted ancestor. A
parameter shared by several modules is selected if any of its names matches.

Size: the four public drivers, their shared method choice / fallback and the log-prob definition they
all measure belong together (one contract: every driver the same pipeline).
"""
from __future__ import annotations

import contextlib
import logging
from typing import NamedTuple, Sequence, Union

import torch
from torch import nn

from .capture import acc_dtype, capture, inner, is_verified, param_group, sel_key, verify
from .capture import directional as factor_directional
from .exact import exact_grads
from .rules import Unsupported
from .staged import Mismatch, staged_token_gram

log = logging.getLogger("entangle_sim.torch")

Subset = Union[None, str, Sequence[str]]


# ----------------------------------------------------------------------------------------------
# results
# ----------------------------------------------------------------------------------------------
class PairGram(NamedTuple):
    """Per-pair Gram statistics, each [B] (same fields as `entangle_sim.geometry.PairGram`).

    G_ww = |g_w|^2, G_wl = <g_w, g_l>, G_ll = |g_l|^2, cos = G_wl / sqrt(G_ww G_ll),
    rho_w = G_wl / G_ww, rho_l = G_wl / G_ll, rho = max(rho_w, rho_l) (chosen rises and rejected
    falls under the plain DPO step for every pair with rho <= 1).
    """

    G_ww: torch.Tensor
    G_wl: torch.Tensor
    G_ll: torch.Tensor
    cos: torch.Tensor
    rho_w: torch.Tensor
    rho_l: torch.Tensor
    rho: torch.Tensor


class TokenGram(NamedTuple):
    """Token-level geometry of one pair: inner[t, u] = <g_t(y_w), g_u(y_l)> ([T_w, T_l]), whose
    entries sum to G_wl; cos[t, u] the cosine; norm_w [T_w], norm_l [T_l] the token gradient norms."""

    inner: torch.Tensor
    cos: torch.Tensor
    norm_w: torch.Tensor
    norm_l: torch.Tensor


def gram_stats(G_ww, G_wl, G_ll) -> PairGram:
    """Derived statistics from the three Gram entries (zero norms floored at the dtype's tiny)."""
    tiny = torch.finfo(G_ww.dtype).tiny
    cos = G_wl / torch.sqrt(torch.clamp(G_ww * G_ll, min=tiny))
    rho_w = G_wl / torch.clamp(G_ww, min=tiny)
    rho_l = G_wl / torch.clamp(G_ll, min=tiny)
    return PairGram(G_ww, G_wl, G_ll, cos, rho_w, rho_l, torch.maximum(rho_w, rho_l))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------



def named_parameter_aliases(model) -> dict[nn.Parameter, list[str]]:
    """Every parameter with all names it has (tied weights have several)."""
    out: dict[nn.Parameter, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        out.setdefault(p, []).append(name)
    return out


def select_parameters(model, subset: Subset = None) -> dict[str, nn.Parameter]:
    """Selected parameters by (first) name. Raises ValueError naming a prefix that matches nothing."""
    aliases = named_parameter_aliases(model)
    if subset is None:
        return {names[0]: p for p, names in aliases.items()}
    if isinstance(subset, str) and subset == "trainable":
        sel = {names[0]: p for p, names in aliases.items() if p.requires_grad}
        if not sel:
            raise ValueError("subset 'trainable': the model has no parameter with requires_grad=True")
        return sel
    prefixes = [subset] if isinstance(subset, str) else list(subset)

    def match(name, pre):
        return name == pre or name.startswith(pre.rstrip(".") + ".")

    for pre in prefixes:
        if not any(match(n, pre) for names in aliases.values() for n in names):
            raise ValueError(f"unknown subset prefix {pre!r}: no parameter name starts with it "
                             f"(e.g. {next(iter(aliases.values()))[0]!r})")
    return {names[0]: p for p, names in aliases.items() if any(match(n, pre) for n in names for pre in prefixes)}


@contextlib.contextmanager
def measuring(model):
    """Eval mode (no dropout, no HF checkpointing), no autocast, for the measurement; restores all.

    A model prepared by accelerate for mixed precision (TRL's DPOConfig turns bf16 on by default) has
    its `forward` wrapped in autocast; the wrapper is lifted meanwhile, so the measurement runs in the
    parameters' own dtype (float32, or float64)."""
    # Hugging Face sets `gradient_checkpointing = True` on the modules it checkpoints and checkpoints only
    # in training mode, so eval mode switches it off; any other checkpointing module is refused.
    if any(getattr(m, "gradient_checkpointing", False) is True and not type(m).__module__.startswith("transformers.")
           for m in model.modules()):
        raise ValueError("gradient checkpointing is on: call model.gradient_checkpointing_disable() "
                         "before measuring the gradient geometry")
    was_training = model.training
    # HF's input-embedding hook for checkpointed training (`enable_input_require_grads`, possibly
    # registered twice by TRL + transformers) calls requires_grad_ inside the forward, which functorch
    # transforms reject; it changes nothing for the measurement, so it is lifted meanwhile.
    lifted = []
    for m in model.modules():
        for key, h in list(m._forward_hooks.items()):
            if getattr(h, "__name__", "") == "make_inputs_require_grads":
                lifted.append((m, key, h))
                del m._forward_hooks[key]
    wrapped = []
    for m in {model, getattr(model, "base_model", model)}:
        orig = m.__dict__.get("_original_forward")
        if orig is not None and "forward" in m.__dict__:
            wrapped.append((m, m.__dict__["forward"]))
            m.forward = orig
    model.eval()
    try:
        with contextlib.ExitStack() as st:
            for dev in ("cpu", "cuda"):
                if dev == "cpu" or torch.cuda.is_available():
                    st.enter_context(torch.autocast(device_type=dev, enabled=False))
            yield
    finally:
        model.train(was_training)
        for m, key, h in lifted:
            m._forward_hooks[key] = h
        for m, fwd in wrapped:
            m.forward = fwd


def _accepts_logits_to_keep(model) -> bool:
    import inspect

    try:
        return "logits_to_keep" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def response_logps(model, input_ids, attention_mask, completion_mask, *, per_token: bool = False):
    """Sum over completion tokens of log p(token | prefix) per row ([N]); with per_token also the
    [N, K] per-token log-probs of the last K positions (zeros outside the completion).

    Log-softmax is taken in float32 (float64 for float64 models), like TRL's fused LM head.
    Only the logits from the first completion position on are computed when the model accepts
    `logits_to_keep`.
    """
    S = input_ids.shape[1]
    cm = completion_mask[:, 1:].bool()
    first = int(cm.any(0).nonzero()[0]) if cm.any() else 0   # first shifted column with a completion token
    K = S - 1 - first                                        # label columns kept
    kw = {}
    if _accepts_logits_to_keep(model):
        kw["logits_to_keep"] = K + 1  # logits of positions first..S-1; the last one has no label
    out = model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, **kw)
    logits = out.logits[:, -(K + 1):-1] if kw else out.logits[:, first:S - 1]
    acc = acc_dtype(model)
    lp = torch.log_softmax(logits.to(acc), dim=-1)
    labels = input_ids[:, first + 1:]
    tok = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * cm[:, first:].to(acc)
    if per_token:
        return tok.sum(1), tok, first
    return tok.sum(1)


def _pairs_chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))




def chunks(n: int, chunk: int):
    """Slices of range(n), `chunk` at a time."""
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


def trim(batch):
    """Drop all-padding columns at the right end (keeps numbers, saves work)."""
    am = batch["attention_mask"]
    S = int(am.sum(1).max())
    return {k: (v[:, :S] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in batch.items()}


# ----------------------------------------------------------------------------------------------
# method choice and fallback (shared by every driver)
# ----------------------------------------------------------------------------------------------
METHODS = ("auto", "ghost", "exact")


def check_method(method: str) -> None:
    if method not in METHODS:
        raise ValueError(f"method must be 'auto', 'ghost' or 'exact', got {method!r}")


def ghost_cost(model, params, N, S):
    """(ghost_extra_flops, exact_extra_flops) rough estimates for `auto` (per batch of N responses)."""
    sel = set(params.values())
    P_sel = sum(p.numel() for p in sel)
    ghost = 0
    for m in model.modules():
        for p in m.parameters(recurse=False):
            if p in sel:
                # matrices: three S x S Gram products per pair; anything else is materialised per response
                ghost += 3 * S * S * sum(p.shape) if p.dim() == 2 else 4 * S * p.numel()
    exact = 2 * S * P_sel + 3 * P_sel
    return ghost * N / 2, exact * N


def choose(model, params, method, N, S) -> str:
    """The method a driver starts with: `ghost`/`exact` as asked, `auto` by estimated cost."""
    check_method(method)
    if method != "auto":
        return method
    g, e = ghost_cost(model, params, N, S)
    return "ghost" if g <= e else "exact"


def fallback(method: str, err: Unsupported, what: str):
    """`ghost` raises on Unsupported; `auto` says why (one line, log level INFO) and goes exact."""
    if method == "ghost":
        raise ValueError(f"ghost method unsupported for this model: {err}") from None
    log.info("entangle_sim %s: ghost unsupported (%s); using exact", what, err)


def ghost_capture(model, params, ids, am, cm, kind: str):
    """One verified capture of rows (ids, am, cm) -> (logps [N], Factors)."""
    sel = set(params.values())
    N = ids.shape[0]
    key = (kind, sel_key(params))
    fwd = lambda: response_logps(model, ids, am, cm)  # noqa: E731
    # the forward graph is kept for the verification only (keeping it raises the peak memory)
    retain = not is_verified(model, key)
    logps, F, graph = capture(model, sel, fwd, N, retain_graph=retain)
    if not is_verified(model, key, F):  # a layout not seen before: capture again, keeping the graph
        if not retain:
            logps, F, graph = capture(model, sel, fwd, N, retain_graph=True)
        verify(model, key, F, graph, list(sel))
    return logps.detach(), F


def param_groups(model, params) -> dict:
    """parameter -> coarse group name (`capture.param_group` of its first name)."""
    return {p: param_group(n) for n, p in params.items()}


# ----------------------------------------------------------------------------------------------
# public drivers
# ----------------------------------------------------------------------------------------------
def pair_gram(model, batch, *, subset: Subset = None, method: str = "auto", chunk_size: int | None = None,
              return_logps: bool = False, by_group: bool = False):
    """Per-pair Gram of the chosen and rejected response gradients.

    model: a causal LM (`model(input_ids=, attention_mask=).logits`); batch: TRL-collated dict
    ([2B, S] `input_ids`, `attention_mask`, `completion_mask`, chosen rows first).
    Returns `PairGram` of [B] tensors (float32, float64 for a float64 model); with return_logps also
    (chosen_logps [B], rejected_logps [B]); with by_group a dict group -> PairGram of the split
    (`param_group`: embedding, layer<i>.attention / .mlp / .norm, norm, head, adapter; the G entries of
    the groups add up to the total) instead of the total.

    >>> g = pair_gram(model, collate(tokenize_rows(tok, rows), tok.pad_token_id))  # doctest: +SKIP
    >>> g.cos                                                                       # doctest: +SKIP
    """
    batch = trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    N = ids.shape[0]
    if N % 2:
        raise ValueError("batch must hold 2B rows: B chosen then B rejected")
    B = N // 2
    params = select_parameters(model, subset)
    acc = acc_dtype(model)
    groups = param_groups(model, params) if by_group else None
    names = sorted(set(groups.values())) if groups else None

    def dense(x, b):  # a group with no factor entry in this chunk (unused parameters) has zero Gram
        return x if groups is None else {n: x.get(n, torch.zeros(b, dtype=acc)) for n in names}

    with measuring(model):
        meth = choose(model, params, method, N, ids.shape[1])
        chunk = chunk_size or (8 if meth == "ghost" else 2)
        parts, lw, ll = [], [], []
        for sl in chunks(B, chunk):
            rows = torch.cat([torch.arange(sl.start, sl.stop), B + torch.arange(sl.start, sl.stop)])
            b = sl.stop - sl.start
            if meth == "ghost":
                try:
                    lp, F = ghost_capture(model, params, ids[rows], am[rows], cm[rows], "pair")
                except Unsupported as e:
                    fallback(method, e, "pair_gram")
                    meth, parts, lw, ll = "exact", [], [], []
                    break
                w, l = slice(0, b), slice(b, 2 * b)
                parts.append([dense(x, b) for x in inner(F, [(w, w), (w, l), (l, l)], groups=groups)])
            else:
                with torch.no_grad():
                    lp = response_logps(model, ids[rows], am[rows], cm[rows])
                g = exact_grads(model, params, ids[rows], am[rows], cm[rows], acc)
                gw, gl = g[:b], g[b:]
                if groups is None:
                    parts.append([(gw * gw).sum(1), (gw * gl).sum(1), (gl * gl).sum(1)])
                else:
                    parts.append([dense(x, b) for x in _split_exact(params, groups, gw, gl)])
            lw.append(lp[:b].to(acc))
            ll.append(lp[b:].to(acc))
        if meth == "exact" and not parts:  # ghost fell back: start again exactly
            return pair_gram(model, batch, subset=subset, method="exact", chunk_size=chunk_size,
                             return_logps=return_logps, by_group=by_group)
    if groups is None:
        res = gram_stats(*(torch.cat([p[k] for p in parts]) for k in range(3)))
    else:
        res = {n: gram_stats(*(torch.cat([p[k][n] for p in parts]) for k in range(3))) for n in names}
    if return_logps:
        return res, (torch.cat(lw), torch.cat(ll))
    return res


def _split_exact(params, groups, gw, gl):
    out = [{}, {}, {}]
    s = 0
    for p in params.values():
        n = p.numel()
        a, c = gw[:, s:s + n], gl[:, s:s + n]
        g = groups[p]
        for k, v in enumerate(((a * a).sum(1), (a * c).sum(1), (c * c).sum(1))):
            out[k][g] = out[k].get(g, 0) + v
        s += n
    return out


def response_gram(model, batch, *, groups=None, subset: Subset = None, method: str = "auto",
                  chunk_size: int | None = None) -> torch.Tensor:
    """Gram <g_i, g_j> of the summed completion log-probs of N sequences, within groups.

    batch: `input_ids`, `attention_mask`, `completion_mask` [N, S] (any N; e.g. the G completions of
    each GRPO prompt one after the other). groups: None (one group of all N: returns [N, N]) or the
    group size G (consecutive rows; N % G == 0: returns [N // G, G, G]). chunk_size: groups per capture.
    """
    batch = trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    N = ids.shape[0]
    G = N if groups is None else int(groups)
    if G <= 0 or N % G:
        raise ValueError(f"groups={groups!r}: the group size must divide the {N} rows")
    params = select_parameters(model, subset)
    acc = acc_dtype(model)
    chunk = max(1, chunk_size or max(1, 16 // G))
    n_groups = N // G
    out = torch.zeros(n_groups, G, G, dtype=acc)
    I, J = torch.meshgrid(torch.arange(G), torch.arange(G), indexing="ij")
    with measuring(model):
        meth = choose(model, params, method, N, ids.shape[1])
        if meth == "ghost":
            try:
                for sl in chunks(n_groups, chunk):
                    rows = torch.arange(sl.start * G, sl.stop * G)
                    _, F = ghost_capture(model, params, ids[rows], am[rows], cm[rows], "response")
                    for k in range(sl.stop - sl.start):
                        out[sl.start + k] = inner(F, k * G + I.reshape(-1), k * G + J.reshape(-1)).reshape(G, G)
            except Unsupported as e:
                fallback(method, e, "response_gram")
                meth = "exact"
        if meth == "exact":
            for g0 in range(n_groups):
                rows = torch.arange(g0 * G, (g0 + 1) * G)
                g = exact_grads(model, params, ids[rows], am[rows], cm[rows], acc)
                out[g0] = g @ g.T
    return out[0] if groups is None else out


def directional(model, batch, weights, *, subset: Subset = None, method: str = "auto",
                chunk_size: int | None = None):
    """First-order change of every response's log-prob under one step theta += sum_j w_j g_j.

    weights: [2B] (chosen then rejected; any N rows in fact). Returns [N]  sum_j w_j <g_i, g_j>  (the
    row sums of the N x N response Gram weighted by w), computed without the Gram: one autograd pass for
    v = sum_j w_j g_j (parameter-sized, `directional_vector`), one verified ghost capture (or exact
    gradients) for <g_i, v> (`directional_at`). For rows that do not fit in memory at once, call the two
    halves chunk by chunk (`session.MeasurementSession.predict_stream`): the result is the same sum.
    """
    batch = trim(batch)
    chunk = chunk_size or 16
    v = directional_vector(model, [(batch, weights)], subset=subset, chunk_size=chunk)
    return directional_at(model, batch, v, subset=subset, method=method, chunk_size=chunk)


def directional_vector(model, weighted_batches, *, subset: Subset = None, chunk_size: int | None = None) -> dict:
    """v = sum_j w_j g_j over every (batch, weights [N]) of the iterable `weighted_batches` (pass 1 of a
    streamed `directional`); {parameter: tensor shaped like it} in the accumulation dtype."""
    params = select_parameters(model, subset)
    acc = acc_dtype(model)
    v = {p: torch.zeros(p.shape, dtype=acc) for p in params.values()}
    with measuring(model):
        for batch, weights in weighted_batches:
            batch = trim(batch)
            ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
            weights = torch.as_tensor(weights, dtype=acc)
            if weights.shape != (ids.shape[0],):
                raise ValueError(f"weights of shape {tuple(weights.shape)} for {ids.shape[0]} rows")
            _v_autograd(model, params, ids, am, cm, weights, chunk_size or 16, acc, v)
    return v


def directional_at(model, batch, v: dict, *, subset: Subset = None, method: str = "auto",
                   chunk_size: int | None = None) -> torch.Tensor:
    """[N] of <g_i, v> for the rows of `batch` (pass 2 of a streamed `directional`); v from
    `directional_vector` on the same model and subset."""
    batch = trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    N = ids.shape[0]
    params = select_parameters(model, subset)
    acc = acc_dtype(model)
    plist = list(params.values())
    chunk = chunk_size or 16
    with measuring(model):
        meth = choose(model, params, method, N, ids.shape[1])
        if meth == "ghost":
            try:
                out = []
                for sl in chunks(N, chunk):
                    _, F = ghost_capture(model, params, ids[sl], am[sl], cm[sl], "directional")
                    out.append(factor_directional(F, v))
                return torch.cat(out)
            except Unsupported as e:
                fallback(method, e, "directional")
        vflat = torch.cat([v[p].reshape(-1).to(acc) for p in plist])
        out = []
        for sl in chunks(N, min(chunk, 4)):
            out.append(exact_grads(model, params, ids[sl], am[sl], cm[sl], acc) @ vflat)
    return torch.cat(out)


def _v_autograd(model, params, ids, am, cm, weights, chunk, acc, v=None):
    """v (+)= sum_j w_j g_j per parameter (one forward + backward per chunk, ordinary autograd)."""
    plist = list(params.values())
    if v is None:
        v = {p: torch.zeros(p.shape, dtype=acc) for p in plist}
    for sl in chunks(ids.shape[0], chunk):
        with torch.enable_grad():
            lp = response_logps(model, ids[sl], am[sl], cm[sl])
            gs = torch.autograd.grad((lp * weights[sl].to(lp.dtype)).sum(), plist, allow_unused=True)
        for p, g in zip(plist, gs):
            if g is not None:
                v[p] += g.to(acc)
    return v


def token_gram(model, pair, *, subset: Subset = None, method: str = "auto") -> TokenGram:
    """Per-token inner products <g_t(y_w), g_u(y_l)> of one pair (Figure 4b of the paper), [T_w, T_l].

    pair: a TRL-collated batch with B = 1 (2 rows) or a dict with `prompt_ids`, `chosen_ids`,
    `rejected_ids` lists. Returns `TokenGram` ([T_w, T_l] inner and cos, [T_w] / [T_l] norms).

    ghost / auto: staged (`staged.staged_token_gram`): each response alone, the head's token gradients
    from one ordinary backward, then one batched backward of the response's tokens per decoder block
    (~2 S |theta_block| FLOPs per token), each block's factors contracted with shared activations
    (<delta_i, M delta_j>, M = A_w A_l^T once) and dropped; tokens in groups of 16 by position, the first
    groups on the response cut after their last token (causal savings); verified token by token the
    first time.
    Where the blocks cannot be found, or (auto only) the staged factors fail verification: one forward
    of both rows and one batched backward to every module output (all signals at once), verified too.
    exact: one ordinary backward per completion token (T x |theta| memory, small models only).

    >>> tg = token_gram(model, {"prompt_ids": [5, 6], "chosen_ids": [7, 8], "rejected_ids": [9]})  # doctest: +SKIP
    >>> tg.inner.shape                                                                             # doctest: +SKIP
    torch.Size([2, 1])
    """
    if "input_ids" not in pair:
        from .data import collate
        pair = collate([pair], pad_token_id=0)
    pair = trim(pair)
    ids, am, cm = pair["input_ids"], pair["attention_mask"], pair["completion_mask"]
    if ids.shape[0] != 2:
        raise ValueError("token_gram takes one pair (a batch of 2 rows)")
    params = select_parameters(model, subset)
    acc = acc_dtype(model)
    check_method(method)
    with measuring(model):
        if method != "exact":
            try:
                try:
                    res = _token_result(*staged_token_gram(model, params, _row_forwards(model, ids, am, cm)))
                    log.debug("entangle_sim token_gram: staged")
                    return res
                except Mismatch:
                    if method == "ghost":
                        raise
                    log.info("entangle_sim token_gram: staged map failed verification; trying the one-shot map")
                except Unsupported as e:  # no block list / head: the one-shot capture of both rows
                    log.info("entangle_sim token_gram: staged map unsupported (%s); trying the one-shot map", e)
                res = _token_gram_ghost(model, params, ids, am, cm, acc)
                log.debug("entangle_sim token_gram: one-shot")
                return res
            except Unsupported as e:
                fallback(method, e, "token_gram")
        return _token_gram_exact(model, params, ids, am, cm, acc)


def _row_forwards(model, ids, am, cm):
    """(chosen, rejected) forwards of one unpadded row each, cut after `upto` tokens unless None ->
    (per-token log-probs [1, C], label columns of the completion tokens, their positions in the row)."""
    def make(row):
        n = int(am[row].sum())

        def fwd(upto=None):
            m = n if upto is None else upto
            r_ids, r_cm = ids[row:row + 1, :m], cm[row:row + 1, :m]
            _, tok, first = response_logps(model, r_ids, torch.ones_like(r_ids), r_cm, per_token=True)
            cols = r_cm[0, first + 1:].bool().nonzero().squeeze(1)
            return tok, cols, cols + first + 1
        return fwd

    return make(0), make(1)


def _token_gram_ghost(model, params, ids, am, cm, acc):
    sel = set(params.values())

    def fwd():
        return response_logps(model, ids, am, cm, per_token=True)[1]

    # positions are known before the forward: the same columns response_logps keeps
    cmask = cm[:, 1:].bool()
    first = int(cmask.any(0).nonzero()[0]) if cmask.any() else 0
    mask = cm[:, first + 1:].bool()
    pos_w, pos_l = mask[0].nonzero().squeeze(1), mask[1].nonzero().squeeze(1)
    Tw, Tl = len(pos_w), len(pos_l)
    if Tw == 0 or Tl == 0:
        raise ValueError("token_gram: a response has no completion tokens")
    K = Tw + Tl
    go = torch.zeros(K, 2, mask.shape[1], dtype=acc_dtype(model))
    go[torch.arange(Tw), 0, pos_w] = 1
    go[Tw + torch.arange(Tl), 1, pos_l] = 1
    rows = torch.cat([torch.zeros(Tw, dtype=torch.long), torch.ones(Tl, dtype=torch.long)])
    tok, F, graph = capture(model, sel, fwd, 2, targets=(go, rows))
    # verify every token (one backward for all of them)
    cells = [(0, int(pos_w[k])) if k < Tw else (1, int(pos_l[k - Tw])) for k in range(K)]
    verify(model, ("token", sel_key(params)), F, graph, list(sel), picks=(list(range(K)), cells))
    I = torch.arange(Tw).repeat_interleave(Tl)
    J = Tw + torch.arange(Tl).repeat(Tw)
    ip = inner(F, I, J, chunk=16).reshape(Tw, Tl)
    nw = inner(F, torch.arange(Tw), torch.arange(Tw))
    nl = inner(F, Tw + torch.arange(Tl), Tw + torch.arange(Tl))
    return _token_result(ip, nw, nl)


def _token_result(inner_, nw, nl):
    nw, nl = nw.clamp(min=0).sqrt(), nl.clamp(min=0).sqrt()
    tiny = torch.finfo(inner_.dtype).tiny
    cos = inner_ / torch.clamp(nw[:, None] * nl[None, :], min=tiny)
    return TokenGram(inner_, cos, nw, nl)


def _token_gram_exact(model, params, ids, am, cm, acc):
    plist = list(params.values())
    gw, gl = [], []
    for row, store in ((0, gw), (1, gl)):
        n = int(am[row].sum())
        r_ids, r_cm = ids[row:row + 1, :n], cm[row:row + 1, :n]
        with torch.enable_grad():
            _, tok, first = response_logps(model, r_ids, torch.ones_like(r_ids), r_cm, per_token=True)
            for t in r_cm[0, first + 1:].bool().nonzero().squeeze(1).tolist():
                g = torch.autograd.grad(tok[0, t], plist, retain_graph=True, allow_unused=True)
                store.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).to(acc)
                                        for p, x in zip(plist, g)]))
    Gw, Gl = torch.stack(gw), torch.stack(gl)
    return _token_result(Gw @ Gl.T, (Gw * Gw).sum(1), (Gl * Gl).sum(1))
