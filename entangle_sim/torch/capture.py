"""One capture: a hooked forward + one backward to the module outputs -> per-parameter `Factors`;
contractions of the factors (pair / response / token Grams, directional products, group split) and the
per-response verification.

The capture hooks every module that owns a selected parameter and applies its rule (`rules.rule_for`).
Module outputs changed in place later in the forward (Falcon adds the attention output into the MLP
output) are detected by their version counter; those modules are then captured again with their output
protected by a copy (remembered per model). Any failure is `rules.Unsupported`.

Verification (`verify`): for the first capture of a (model, parameter selection, layout signature,
kind) the factors must reproduce, response by response, <g_k, v> along a random direction v, against
autograd on the same forward (one backward, random weights over the responses or tokens). A
response mix-up (a sequence-first layer read as batch-first, a parameter also used outside its module)
changes the per-response values even when their sum is right. Layouts that the shapes cannot tell apart
get their own signature, so each such shape is verified when first seen.
"""
from __future__ import annotations

import weakref

import torch

from .rules import Unsupported, layout_of, normalise, rule_for


def acc_dtype(model) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (bf16/fp16 models accumulate in float32)."""
    p = next(model.parameters())
    return torch.float64 if p.dtype == torch.float64 else torch.float32


# model -> names of modules whose outputs must be protected (changed in place by the model)
PROTECT: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()
# model -> verified keys (selection, kind, layout signature)
VERIFIED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class Factors:
    """Per selected parameter, the factor entries of its per-response gradients (see `rules`), for K
    (pseudo-)responses; `signature` is the layout of every captured use."""

    def __init__(self, fac: dict, K: int, signature: tuple, acc):
        self.fac, self.K, self.signature, self.acc = fac, K, signature, acc


class Recorder:
    """Forward hooks (with kwargs) on every module owning a selected parameter."""

    def __init__(self, model, sel: set, N: int, protect: set):
        self.N, self.protect, self.sel = N, protect, sel
        self.uses: list[dict] = []
        self.error: Exception | None = None
        self.handles = []
        for name, m in model.named_modules():
            if any(p in sel for p in m.parameters(recurse=False)):
                self.handles.append(m.register_forward_hook(self._hook(name), with_kwargs=True))

    def _hook(self, name):
        def hook(m, args, kwargs, out):
            if not torch.is_grad_enabled() or self.error is not None:
                return None
            try:
                rule = rule_for(m)
                if torch.is_tensor(out):
                    tensors, idx = [out], None
                elif isinstance(out, (tuple, list)) and rule.multi_output:
                    # e.g. a MoE router: (logits, weights, indices); the float outputs carry gradient
                    idx = [i for i, t in enumerate(out) if torch.is_tensor(t) and t.is_floating_point()]
                    # the model gets aliases: the signal of each alias is then only what the model does
                    # with that output (not also the path from one output to another inside the module)
                    out = type(out)(t.view_as(t) if i in idx else t for i, t in enumerate(out))
                    tensors = [out[i] for i in idx]
                    if not tensors:
                        raise Unsupported(f"{name} ({type(m).__name__}) returns no float tensor")
                else:
                    raise Unsupported(f"{name} ({type(m).__name__}) returns {type(out).__name__}, not a tensor")
                tags = [layout_of(t, self.N) for t in tensors]
                tag, amb = tags[0]
                if any(t[0] != tag for t in tags):
                    raise Unsupported(f"{name} ({type(m).__name__}): outputs in different layouts")
                ret = None if idx is None else out
                if tag == "bcast":  # give every row its own copy, so the backward keeps rows apart
                    if idx is not None:
                        raise Unsupported(f"{name}: broadcast tuple output")
                    ret = out = out.expand(self.N, *out.shape[1:])
                    tensors = [out]
                    args = tuple(a.expand(self.N, *a.shape[1:]) if torch.is_tensor(a) and a.dim() >= 1
                                 and a.shape[0] == 1 else a for a in args)
                    tag = "NS"
                cap = rule.capture(m, args, kwargs, tensors[0], tag, self.N)
                cap.update(tag=tag, N=self.N, out_idx=idx)
                if name in self.protect:
                    cap = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in cap.items()}
                    if idx is None:
                        ret = out.clone()
                    else:
                        ret = type(out)(t.clone() if i in idx else t for i, t in enumerate(out))
                kept = [v for v in cap.values() if torch.is_tensor(v)]
                self.uses.append({"name": name, "module": m, "rule": rule, "cap": cap, "outs": tensors,
                                  "amb": amb, "ver": [(t, t._version) for t in [*tensors, *kept]]})
                return ret
            except Unsupported as e:
                self.error = e
            except Exception as e:  # noqa: BLE001 - a rule's failure is "unsupported", never a crash
                self.error = Unsupported(f"{name} ({type(m).__name__}): {type(e).__name__}: {e}")
            return None

        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


def run_hooked(rec: Recorder, forward, handles=()):
    """forward() with gradients on, under the recorder's hooks (and any extra hook `handles`); every
    failure, a rule's or the forward's, is Unsupported; all hooks are removed afterwards."""
    try:
        with torch.enable_grad():
            out = forward()
    except Unsupported:
        raise
    except Exception as e:  # noqa: BLE001 - the hooked forward failing is "unsupported"
        if rec.error is not None:
            raise rec.error from None
        raise Unsupported(f"the model's forward failed under the capture hooks: {type(e).__name__}: {e}")
    finally:
        rec.close()
        for h in handles:
            h.remove()
    if rec.error is not None:
        raise rec.error
    return out


def capture(model, sel: set, forward, N: int, *, targets=None, retain_graph: bool = True):
    """Run `forward()` (returns the [N] (or [N, K']) log-probs) under hooks and back-propagate to the
    captured module outputs.

    targets: None for per-response signals (the gradient of sum_i logp_i), or (grad_outputs [K, ...],
    rows [K]) for K pseudo-responses (token maps: one-hot grad_outputs, rows = the response of each token).
    Returns (logps, Factors, graph) where graph = (logps, outs) for the verification (usable only
    with retain_graph; without it the forward's saved tensors are freed during the backward).
    """
    acc = acc_dtype(model)
    protect = PROTECT.setdefault(model, set())
    for attempt in range(2):
        rec = Recorder(model, sel, N, protect)
        logps = run_hooked(rec, forward)
        changed = {u["name"] for u in rec.uses if any(t._version != v for t, v in u["ver"])}
        if not changed:
            break
        if attempt == 1 or changed <= protect:
            raise Unsupported(f"module output changed in place: {sorted(changed)[:3]}")
        protect |= changed  # capture again with those outputs copied
    uses = rec.uses
    outs = [o for u in uses for o in u["outs"]]
    need = [o.requires_grad for o in outs]
    req = [o for o, r in zip(outs, need) if r]
    if targets is None:
        grads = torch.autograd.grad(logps.sum(), req, allow_unused=True, retain_graph=retain_graph) if req else []
        rows = torch.arange(N)
        K = N
    else:
        go, rows = targets
        K = len(rows)
        grads = torch.autograd.grad(logps, req, grad_outputs=go, is_grads_batched=True, allow_unused=True,
                                    retain_graph=retain_graph) if req else []
    it = iter(grads)
    per_out = [next(it) if r else None for r in need]
    fac: dict = {}
    sig = []
    pos = 0
    for u in uses:
        gs = per_out[pos:pos + len(u["outs"])]
        pos += len(u["outs"])
        cap = u["cap"]
        tag = cap["tag"]
        sig.append((u["name"], tag, u["amb"] and N > 1))
        if all(g is None for g in gs):
            continue
        ds = []
        for g, o in zip(gs, u["outs"]):
            if g is None:
                g = torch.zeros((K, *o.shape) if targets is not None else o.shape, dtype=acc)
            g = g.to(acc)
            if targets is None:
                ds.append(normalise(g, tag, N))
            else:  # [K, *out] -> [K, N, T, d] -> each token's own row
                ds.append(normalise(g, tag, N, batch_dims=1)[torch.arange(K), rows])
        d = ds if u["rule"].multi_output else ds[0]
        for p, entry in u["rule"].entries(u["module"], cap, d, rows, sel, acc):
            fac.setdefault(p, []).append(entry)
    return logps, Factors(fac, K, tuple(sig), acc), (logps, outs)


# ----------------------------------------------------------------------------------------------
# contractions
# ----------------------------------------------------------------------------------------------
def _lr_dot(L1, L2, acc):
    """[P,T1,T2] of <L1_t, L2_s>, L dense [P,T,r] or token ids [P,T] (one-hot rows)."""
    if L1.dtype.is_floating_point and L2.dtype.is_floating_point:
        return torch.bmm(L1, L2.transpose(1, 2))
    if not L1.dtype.is_floating_point and not L2.dtype.is_floating_point:
        return (L1.unsqueeze(2) == L2.unsqueeze(1)).to(acc)
    if L1.dtype.is_floating_point:
        return torch.gather(L1, 2, L2.unsqueeze(1).expand(-1, L1.shape[1], -1))
    return torch.gather(L2, 2, L1.unsqueeze(1).expand(-1, L2.shape[1], -1)).transpose(1, 2)


def _blocks(I, J, chunk):
    """(i, j, out-slice) pieces: slices stay slices (views, no copies), index tensors are chunked."""
    if isinstance(I, slice):
        return [(I, J, slice(0, I.stop - I.start))]
    return [(I[s:s + chunk], J[s:s + chunk], slice(s, min(len(I), s + chunk))) for s in range(0, len(I), chunk)]


def _entries_inner(entries, pairs, acc, chunk):
    outs = [torch.zeros((I.stop - I.start) if isinstance(I, slice) else len(I), dtype=acc) for I, _ in pairs]
    for e1 in entries:
        for e2 in entries:
            if e1[0] != e2[0]:  # one parameter both as a matrix and elementwise
                raise Unsupported("a parameter used both as a matrix and elementwise")
            for out, (I, J) in zip(outs, pairs):
                for i, j, o in _blocks(I, J, chunk):
                    if e1[0] == "vec":
                        out[o] += (e1[1][i] * e2[1][j]).sum(-1)
                    else:
                        LL = _lr_dot(e1[1][i], e2[1][j], acc)
                        RR = torch.bmm(e1[2][i], e2[2][j].transpose(1, 2))
                        out[o] += (LL * RR).sum((1, 2))
    return outs


def inner(F: Factors, I, J=None, *, groups: dict | None = None, chunk: int = 64):
    """<g_I[p], g_J[p]> for index pairs p ([P]); I, J index tensors or slices (views: no copies).
    I may instead be a list of (I, J) pairs (then a list of results, one pass over the factors).
    With groups (parameter -> group name) each result is a dict of per-group [P] tensors instead
    (their sum is the total)."""
    many = J is None
    pairs = I if many else [(I, J)]
    pairs = [(i if isinstance(i, slice) else torch.as_tensor(i), j if isinstance(j, slice) else torch.as_tensor(j))
             for i, j in pairs]
    if groups is None:
        tot = None
        for entries in F.fac.values():
            r = _entries_inner(entries, pairs, F.acc, chunk)
            tot = r if tot is None else [a + b for a, b in zip(tot, r)]
        if tot is None:
            tot = [torch.zeros((i.stop - i.start) if isinstance(i, slice) else len(i), dtype=F.acc) for i, _ in pairs]
        return tot if many else tot[0]
    res = [dict() for _ in pairs]
    for p, entries in F.fac.items():
        g = groups[p]
        for d, r in zip(res, _entries_inner(entries, pairs, F.acc, chunk)):
            d[g] = d.get(g, 0) + r
    return res if many else res[0]


def is_shared(x: torch.Tensor) -> bool:
    """Whether the K rows of a factor are one and the same (stride 0 on K, or K == 1)."""
    return x.shape[0] == 1 or x.stride(0) == 0


def entry_directional(e, vp) -> torch.Tensor:
    """[K] of <g_k, V> for one "vec" or "mat" entry of a parameter: V parameter-shaped, or for a matrix
    the rank-one V = u w^T given as (u, w) (`Direction`), where <sum_t L_t^T R_t, u w^T> =
    sum_t (L_t.u)(R_t.w) costs one matrix-vector product per factor (a shared factor once)."""
    if e[0] == "vec":
        return e[1] @ (vp[0][:, None] * vp[1][None, :] if isinstance(vp, tuple) else vp).reshape(-1)
    L, R = e[1], e[2]
    if isinstance(vp, tuple):
        def side(F, x):   # [K, T] of F_t . x; token ids are one-hot rows
            if not F.is_floating_point():
                return x[F]
            return (F[:1] @ x).expand(F.shape[:2]) if is_shared(F) else F @ x
        return (side(L, vp[0]) * side(R, vp[1])).sum(1)
    if L.is_floating_point():   # g = sum_t L_t^T R_t; <g, V> = sum_t <L_t, V R_t>
        return ((L @ vp) * R).sum((1, 2))
    return (vp[L] * R).sum((1, 2))


def directional(F: Factors, v) -> torch.Tensor:
    """[K] of <g_k, v>, v given per parameter (parameter-shaped, or a `Direction`)."""
    out = torch.zeros(F.K, dtype=F.acc)
    for p, entries in F.fac.items():
        vp = v[p]
        vp = vp if isinstance(vp, tuple) else vp.to(F.acc)
        for e in entries:
            out += entry_directional(e, vp)
    return out


# ----------------------------------------------------------------------------------------------
# verification
# ----------------------------------------------------------------------------------------------
# Relative to the largest |<g_k, v>| of the capture. A misread layout or mixed responses is an O(1) error
# (0.57 for a foreign weight use); round-off is not: float64 models that compute parts in float32 (MoE
# routers' softmax, GPT-Neo's attention scores, Cohere's norms) differ from their own re-computation by
# ~1e-6, so float64 is checked at 1e-5.
TOL = {torch.float64: 1e-5, torch.float32: 2e-3}


def is_verified(model, key, F: Factors | None = None) -> bool:
    """Whether (key, F's layout signature) was verified; with F None, whether any layout of key was."""
    done = VERIFIED.get(model, set())
    if F is not None:
        return (key, F.signature) in done
    return any(k[0] == key for k in done)


class Direction:
    """The verification's random direction v, parameter by parameter, each v_p from its own seed: a
    matrix gets a random rank-one v_p = u w^T, kept as (u, w), anything else a dense random v_p.

    Rank one loses nothing: for factors whose sum differs from the true gradient by D != 0, u^T D w is a
    nonzero polynomial in (u, w), so it vanishes with probability 0, and E[(u^T D w)^2] = |D|_F^2 as for a
    dense v. It costs |rows| + |columns| random numbers instead of |p| (0.5 GB of them at 124M), and a
    matrix-vector product per factor (`entry_directional`) instead of a matrix product."""

    def __init__(self, params, acc):
        self.index = {p: i for i, p in enumerate(params)}
        self.acc = acc

    def __getitem__(self, p):
        gen = torch.Generator().manual_seed(1234 + self.index[p])
        if p.dim() == 2:
            return tuple(torch.randn(n, generator=gen, dtype=self.acc) for n in p.shape)
        return torch.randn(p.shape, generator=gen, dtype=self.acc)

    def dot(self, p, g: torch.Tensor) -> float:
        """<g, v_p> for a parameter-shaped g."""
        v = self[p]
        g = g.to(self.acc)
        return float(v[0] @ g @ v[1]) if isinstance(v, tuple) else float((g * v).sum())


def check_agreement(model, full, mine: float, ref: float, scale: float, dtype, error, what: str, cause: str):
    """The verification's verdict: |mine - ref| / scale within `TOL` of `dtype` records `full` as verified
    for `model`; otherwise raises `error` (an Unsupported class): "<what> (relative error e): <cause>"."""
    err = abs(mine - ref) / max(scale, abs(ref), 1e-30)
    if err > TOL.get(dtype, 5e-2):
        raise error(f"{what} (relative error {err:.2g}): {cause}")
    VERIFIED.setdefault(model, set()).add(full)


def verify(model, key, F: Factors, graph, params: list, picks=None):
    """Check the factors response by response against autograd (see module docstring); raises
    Unsupported on a mismatch.

    With a random direction v (`Direction`) and random weights r over the responses, sum_k r_k <g_k, v>
    from the factors must equal <grad of sum_k r_k logp_k, v> from one backward through the capture's own
    forward graph. A permutation or mixing of responses changes the left side (r is not symmetric), so
    this is a per-response check at the cost of one backward. picks: for pseudo-responses (token maps),
    (k indices, cells of the log-prob tensor); default: response k = row k of logps.
    """
    full = (key, F.signature)
    if full in VERIFIED.get(model, set()):
        return
    logps, _ = graph
    gen = torch.Generator().manual_seed(1234)
    v = Direction(params, F.acc)
    ks, cells = (list(range(F.K)), [(k,) for k in range(F.K)]) if picks is None else picks
    r = torch.randn(len(cells), generator=gen, dtype=F.acc)
    per = directional(F, v)[torch.as_tensor(ks)]
    target = sum(r[i].to(logps.dtype) * logps[c] for i, c in enumerate(cells))
    gs = torch.autograd.grad(target, params, retain_graph=True, allow_unused=True)
    ref = sum(v.dot(p, g) for p, g in zip(params, gs) if g is not None)
    check_agreement(model, full, float((r * per).sum()), ref, float((r * per).abs().sum()),
                    next(iter(params)).dtype if params else torch.float64, Unsupported,
                    "the factored gradients disagree with autograd response by response",
                    "a parameter is used outside its module or a layout was misread")


def param_group(name: str) -> str:
    """Coarse group of a parameter name: 'adapter', 'embedding', 'head', 'norm', 'layer<i>.attention',
    'layer<i>.mlp', 'layer<i>.other' or 'other' (by Hugging Face naming conventions)."""
    import re

    low = name.lower()
    if "lora_" in low or "adapter" in low:
        return "adapter"
    m = re.search(r"\.(?:h|layers|layer|blocks|block|decoder\.layers)\.(\d+)\.", "." + low)
    if m:
        i = m.group(1)
        rest = low[m.end() - 1:]
        if any(k in rest for k in ("attn", "attention", "q_proj", "k_proj", "v_proj", "o_proj", "query", "dense.")):
            if "mlp" not in rest and "ffn" not in rest and "fc" not in rest.split(".")[1]:
                return f"layer{i}.attention"
        if any(k in rest for k in ("mlp", "ffn", "fc", "expert", "gate", "up_proj", "down_proj")):
            return f"layer{i}.mlp"
        if "norm" in rest or "ln" in rest:
            return f"layer{i}.norm"
        return f"layer{i}.other"
    if any(k in low for k in ("embed", "wte", "wpe", "tok_emb")):
        return "embedding"
    if "lm_head" in low or "embed_out" in low or low.startswith("output."):
        return "head"
    if "norm" in low or "ln_f" in low:
        return "norm"
    return "other"


def sel_key(params: dict) -> tuple:
    return tuple(params), tuple(id(p) for p in params.values())

