"""Per-module rules: how one call of a module factors the per-response gradients of its own parameters.

Like Opacus' per-layer grad samplers, one rule is registered per module type (`register`); the
capture looks a module's rule up by its type (most specific class first) and falls back to the
generic `materialise` rule. A rule works on tensors in a *normalised layout* [K, T, ...]: K responses
(or per-token pseudo-responses), T positions. The capture knows N (rows) and S (positions) of the
batch, so a module's output is read as

    [N, S, d] ("NS")  |  [N*S, d] flattened, N-major ("flat", OPT)  |  [S, N, d] ("SN")  |  [1, S, d]
    broadcast over rows ("bcast", e.g. a position embedding)

and anything else is unsupported. A layout that the shape alone cannot tell apart (S == N, or any
flattened one) is marked ambiguous, so the per-response verification runs on it (see `capture`).

Factor entries per parameter p (the per-response gradient g_k(p)):
    ("mat", L, R)  g_k(p) = sum_t L[k,t]^T R[k,t]   (L dense [K,T,r] or token ids [K,T] = one-hot rows)
    ("vec", V)     g_k(p) = V[k] (flattened, [K, p.numel()])

Every failure is `Unsupported` (the one signal: `auto` falls back to exact, `ghost` raises).
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn


class Unsupported(Exception):
    """The factored (ghost) path cannot measure this model/selection; `auto` falls back to exact."""


# ----------------------------------------------------------------------------------------------
# layouts
# ----------------------------------------------------------------------------------------------
def layout_of(x: torch.Tensor, N: int) -> tuple[str, bool]:
    """(tag, ambiguous) of a module output with N rows; raises Unsupported for any other layout."""
    if x.dim() >= 2 and x.shape[0] == N:
        return "NS", x.dim() >= 3 and x.shape[1] == N
    if x.dim() >= 3 and x.shape[0] == 1:
        return "bcast", False
    if x.dim() >= 3 and x.shape[1] == N:
        return "SN", False
    if x.dim() == 2 and x.shape[0] % N == 0:
        # N-major vs position-major cannot be told from the shape (with one row they are the same)
        return "flat", N > 1
    raise Unsupported(f"output of shape {tuple(x.shape)} has no known layout for {N} rows")


def normalise(x: torch.Tensor, tag: str, N: int, feature_dims: int = 1, batch_dims: int = 0) -> torch.Tensor:
    """x in layout `tag` ("NS", "flat" or "SN") -> [*batch, N, T, *features] (features = the last
    `feature_dims` dims, batch = the first `batch_dims`, e.g. the token axis of batched signals)."""
    b = tuple(x.shape[:batch_dims])
    trail = tuple(x.shape[x.dim() - feature_dims:]) if feature_dims else ()
    if tag == "SN":
        x = x.transpose(batch_dims, batch_dims + 1)
    return x.reshape(*b, N, -1, *trail)


def take_rows(x: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """x[rows] ([N, ...] -> [K, ...]); with one row (N == 1) a stride-0 view instead of K copies (stride 0
    even for K == 1), so the contractions can see that every pseudo-response shares this factor
    (`staged.is_shared`, `staged.merge_groups`)."""
    if x.shape[0] == 1:
        return x.as_strided((len(rows), *x.shape[1:]), (0, *x.stride()[1:]), x.storage_offset())
    return x[rows]


# ----------------------------------------------------------------------------------------------
# registry
# ----------------------------------------------------------------------------------------------
class Rule:
    """A per-module rule. `capture` runs in the forward hook (keeps what the factors need);
    `entries` runs after the backward to the module outputs and returns [(param, entry)]."""

    name = "rule"
    multi_output = False  # True: the rule takes tuple outputs, `entries` gets one signal per float output

    def applies(self, module) -> bool:
        return True

    def capture(self, module, args, kwargs, out, tag: str, N: int) -> dict:
        raise NotImplementedError

    def entries(self, module, cap: dict, delta: torch.Tensor, rows: torch.Tensor, sel: set, acc) -> list:
        raise NotImplementedError


RULES: dict[type, Rule] = {}


def register(*types) -> Callable:
    """Class decorator: `@register(nn.Linear)` makes the rule handle those module types (and subclasses
    without a more specific rule)."""
    def deco(cls):
        inst = cls()
        for t in types:
            RULES[t] = inst
        return cls
    return deco


def rule_for(module) -> Rule:
    """The registered rule of the most specific class of `module`, else the generic `materialise`."""
    for cls in type(module).__mro__:
        r = RULES.get(cls)
        if r is not None and r.applies(module):
            return r
    return MATERIALISE


def _first_tensor(args, kwargs, key="input"):
    if args:
        return args[0]
    return kwargs.get(key, next((v for v in kwargs.values() if torch.is_tensor(v)), None))


@register(nn.Linear)
class LinearRule(Rule):
    """y = x W^T + b: g(W) = sum_t delta_t x_t^T, g(b) = sum_t delta_t."""

    name = "linear"

    def capture(self, module, args, kwargs, out, tag, N):
        x = _first_tensor(args, kwargs)
        if not torch.is_tensor(x) or x.shape[:-1] != out.shape[:-1]:
            raise Unsupported(f"{type(module).__name__}: input/output shapes differ in leading dims")
        return {"x": x.detach()}

    def entries(self, module, cap, delta, rows, sel, acc):
        x = take_rows(normalise(cap["x"], cap["tag"], cap["N"]).to(acc), rows)
        out = []
        if module.weight in sel:
            out.append((module.weight, ("mat", delta, x)))
        if module.bias is not None and module.bias in sel:
            out.append((module.bias, ("vec", delta.sum(1))))
        return out


class Conv1DRule(LinearRule):
    """GPT-2's Conv1D: y = x W + b with W [in, out]: g(W) = sum_t x_t^T delta_t."""

    name = "conv1d"

    def entries(self, module, cap, delta, rows, sel, acc):
        x = take_rows(normalise(cap["x"], cap["tag"], cap["N"]).to(acc), rows)
        out = []
        if module.weight in sel:
            out.append((module.weight, ("mat", x, delta)))
        if module.bias is not None and module.bias in sel:
            out.append((module.bias, ("vec", delta.sum(1))))
        return out


try:  # transformers missing or moved: no Conv1D rule (the generic rule still applies)
    from transformers.pytorch_utils import Conv1D as _HFConv1D

    register(_HFConv1D)(Conv1DRule)
except Exception:  # noqa: BLE001
    pass


@register(nn.Embedding)
class EmbeddingRule(Rule):
    """y_t = c * W[id_t] (c = 1, or the module's `embed_scale`, e.g. Gemma): g(W) = sum_t onehot(id_t)^T c delta_t.
    The padding row gets no gradient."""

    name = "embedding"

    def applies(self, module):
        # a subclass with its own forward (OPT's learned positions) goes to the generic rule, unless it
        # only scales the output by its `embed_scale` (Gemma)
        own_forward = type(module).forward is not nn.Embedding.forward
        return (module.max_norm is None and not module.scale_grad_by_freq and not module.sparse
                and (not own_forward or hasattr(module, "embed_scale")))

    def capture(self, module, args, kwargs, out, tag, N):
        ids = _first_tensor(args, kwargs)
        if not torch.is_tensor(ids) or ids.dtype.is_floating_point or ids.shape != out.shape[:-1]:
            raise Unsupported(f"{type(module).__name__}: not called on token ids")
        scale = getattr(module, "embed_scale", None)
        c = 1.0 if scale is None else float(scale)
        return {"ids": ids, "scale": c}

    def entries(self, module, cap, delta, rows, sel, acc):
        if module.weight not in sel:
            return []
        ids = take_rows(normalise(cap["ids"], cap["tag"], cap["N"], feature_dims=0), rows)
        d = delta * cap["scale"]
        if module.padding_idx is not None:
            d = d * (ids != module.padding_idx).unsqueeze(-1).to(acc)
        return [(module.weight, ("mat", ids, d))]


@register(nn.LayerNorm)
class LayerNormRule(Rule):
    """y = xhat * w + b with xhat = LayerNorm(x) without affine: g(w) = sum_t delta_t * xhat_t."""

    name = "layernorm"

    def applies(self, module):
        return type(module).forward is nn.LayerNorm.forward

    def capture(self, module, args, kwargs, out, tag, N):
        x = _first_tensor(args, kwargs)
        with torch.no_grad():
            xhat = torch.nn.functional.layer_norm(x, module.normalized_shape, None, None, module.eps)
        if len(module.normalized_shape) != 1:
            raise Unsupported("LayerNorm over several dims")
        return {"xhat": xhat}

    def entries(self, module, cap, delta, rows, sel, acc):
        xh = take_rows(normalise(cap["xhat"], cap["tag"], cap["N"]).to(acc), rows)
        out = []
        if module.weight is not None and module.weight in sel:
            out.append((module.weight, ("vec", (delta * xh).sum(1))))
        if module.bias is not None and module.bias in sel:
            out.append((module.bias, ("vec", delta.sum(1))))
        return out


class MaterialiseRule(Rule):
    """Any other module owning selected parameters (norms computed in float32, Gemma's (1 + w) norms,
    routed expert weights of Mixtral / Qwen2-MoE, custom layers): its per-response parameter gradient is
    formed exactly by re-running the module on each response's slice of its captured inputs and one
    small backward to its own parameters with that response's output signal (memory K x its parameters).
    The module must act on rows/positions independently (checked by the per-response verification)."""

    name = "materialise"
    multi_output = True

    def capture(self, module, args, kwargs, out, tag, N):
        sliced = {}
        lead = out.shape[0] if tag in ("NS", "flat") else out.shape[1]
        axis = 0 if tag in ("NS", "flat") else 1
        for i, a in enumerate(args):
            sliced[i] = a.detach() if torch.is_tensor(a) and a.dim() > axis and a.shape[axis] == lead else a
        kw = {k: (v.detach() if torch.is_tensor(v) else v) for k, v in kwargs.items()}
        return {"args": [sliced[i] for i in range(len(args))], "kwargs": kw, "lead": lead, "axis": axis}

    def entries(self, module, cap, delta, rows, sel, acc):
        own = [(n, p) for n, p in module.named_parameters(recurse=False) if p in sel]
        if not own:
            return []
        N, tag, axis, lead = cap["N"], cap["tag"], cap["axis"], cap["lead"]
        per = lead // N  # rows of the module's own leading axis per response

        def piece(t, n):
            if not (torch.is_tensor(t) and t.dim() > axis and t.shape[axis] == lead):
                return t
            return t.narrow(axis, n * per, per)

        names = [n for n, _ in own]
        out_vecs = []
        # delta is [K, T, d] in the normalised layout; bring each row back to the module's own layout
        deltas = delta if isinstance(delta, list) else [delta]
        idx = cap.get("out_idx")
        for k in range(deltas[0].shape[0]):
            n = int(rows[k])
            a = [piece(t, n) for t in cap["args"]]
            kw = {key: piece(v, n) for key, v in cap["kwargs"].items()}
            ps = {nm: p.detach().requires_grad_(True) for nm, p in own}
            with torch.enable_grad():
                y = torch.func.functional_call(module, ps, tuple(a), kw)
                ys = [y] if idx is None else [y[i] for i in idx]
                # [T, d] -> the slice's own layout (same element order)
                ds = [dl[k].to(t.dtype).reshape(t.shape) for dl, t in zip(deltas, ys)]
                pairs = [(t, dd) for t, dd in zip(ys, ds) if t.requires_grad]
                gs = torch.autograd.grad([t for t, _ in pairs], [ps[nm] for nm in names],
                                         grad_outputs=[dd for _, dd in pairs], allow_unused=True)
            out_vecs.append([(torch.zeros_like(ps[nm]) if g is None else g).reshape(-1).to(acc)
                             for nm, g in zip(names, gs)])
        return [(p, ("vec", torch.stack([v[i] for v in out_vecs]))) for i, (_, p) in enumerate(own)]


MATERIALISE = MaterialiseRule()
