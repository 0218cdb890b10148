"""Staged token maps: per-token gradient inner products of one pair, block by block.

The token map of a pair needs, for every completion token k of both responses, the factors of
g_k = d logp_k / d theta. One batched backward of all K = T_w + T_l tokens to every captured module
output at once (the one-shot path in `geometry`) holds [K, S, d] signals of every module, the
vocabulary-wide head included, and sends each chosen token through the rejected row too. Here instead:

1. each response is forwarded on its own (one row, unpadded) under the capture hooks, plus pre-hooks on
   the decoder blocks (the longest `nn.ModuleList` of one module type, not inside another one) that
   record each block's input hidden state x_l, and a hook on the output head recording its input h;
2. the head: token k's log-prob depends on h only at its own position, so ONE ordinary backward of
   sum_k logp_k gives every dlogp_k/dh and dlogp_k/dlogits (distinct positions). The head weight's
   per-token gradient is rank one, outer(dlogits_k, h_k): no [K, S, vocabulary] tensor is formed;
3. stage by stage, top down, one batched backward (`batched_grad`) of the K tokens of a row from the
   stage's upper boundary (h, then x_{l+1}) to its lower one (x_l) and the outputs of the modules called
   in between (the last stage includes the final norm; the bottom one the embeddings). The stage's factor
   entries come from the registered rules and are contracted at once, then dropped; only one stage's
   signals live at a time. A parameter used in several stages (a tied embedding) keeps its entries
   until its last (lowest) use, and the cross terms new x old are added. Attention runs in its composite
   (math) form, whose backward is batched over the tokens (the fused CPU kernel's is not);
4. contraction with shared factors: within one row a Linear's input (or an Embedding's token ids) is
   the same for every token (`rules.take_rows` returns a stride-0 view), so for entries
   g_k = sum_t L_k[t]^T R[t] the inner products are <L_a, M L_b> with M = R_w R_l^T [S_w, S_l] formed once:
   cost T_l S^2 d + T_w T_l S d per matrix instead of T_w T_l S^2 (d + d').

Cost (dominant): one batched backward to the activations per completion token, ~2 S |theta_blocks|
FLOPs each (the weight gradients are never formed), plus the contractions above.

Verification as everywhere (`capture.verify`): for the first capture of a (model, selection, layout and
stage signature), sum_k r_k <g_k, v> from the factors (random v, random r over the tokens) must equal
<grad of sum_k r_k logp_k, v> from one ordinary backward. A model that breaks the stage structure (a
module output or a hidden state used by a later block directly) fails it: `Mismatch`. The check runs on
each response's full row (its last token group); the cut rows of the other groups are the same forward
on a prefix, accepted only with the full row's stage signature and log-probs, so their graphs are freed
as the stages go down. A matrix's direction is a random rank-one u w^T (`capture.Direction`).

Causal savings: a response's tokens go in groups of `TOKENS_PER_GROUP` by position; every group but the
last runs on the row cut after its last token (fewer positions in its backwards), and the groups'
entries become one "rows" entry per shared factor (`merge_groups`): the longest X, each group's own
per-token factor over its own positions, so the contraction skips the positions a group does not have.

Size: the driver, its shared-factor contractions and the group merge are one algorithm (the contraction
relies on the entry structure the merge produces).
"""
from __future__ import annotations

import logging

import torch
from torch import nn

from .capture import (PROTECT, TOL, VERIFIED, Direction, Recorder, acc_dtype, check_agreement, is_shared,
                      run_hooked, sel_key)
from .capture import entry_directional as _entry_directional
from .rules import Unsupported, normalise


class Mismatch(Unsupported):
    """The staged factors failed the per-token verification (as opposed to a model without a
    recognisable block list or head, where the one-shot path is tried)."""


# ----------------------------------------------------------------------------------------------
# structure
# ----------------------------------------------------------------------------------------------
def block_list(model) -> nn.ModuleList:
    """The decoder blocks: the longest `nn.ModuleList` of modules of one type owning parameters that
    is not inside another such list (so a MoE layer's expert list is not taken for the blocks)."""
    cands = []
    for name, m in model.named_modules():
        if isinstance(m, nn.ModuleList) and len(m) and len({type(c) for c in m}) == 1 \
                and any(True for _ in m[0].parameters()):
            cands.append((name, m))
    outer = [(n, m) for n, m in cands if not any(n != o and n.startswith(o + ".") for o, _ in cands)]
    if not outer:
        raise Unsupported("no decoder block list (nn.ModuleList of one block type) found")
    return max(outer, key=lambda nm: len(nm[1]))[1]


def output_head(model) -> nn.Module:
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is None:
        raise Unsupported("the model has no output embeddings (get_output_embeddings)")
    return head


# ----------------------------------------------------------------------------------------------
# contractions with shared factors
# ----------------------------------------------------------------------------------------------
def _dots(A, B, acc):
    """[T1, T2] of <A_t, B_s>; A, B dense [T, r] or token ids [T] (one-hot rows)."""
    fa, fb = A.is_floating_point(), B.is_floating_point()
    if fa and fb:
        return A @ B.T
    if not fa and not fb:
        return (A[:, None] == B[None, :]).to(acc)
    return A[:, B] if fa else B[:, A].T


def _pair_dots(A, B, acc):
    """[K1, K2, T1, T2] of <A[a,t], B[b,s]> (dense [K, T, r] or ids [K, T])."""
    fa, fb = A.is_floating_point(), B.is_floating_point()
    if fa and fb:
        return torch.einsum("atr,bsr->abts", A, B)
    if not fa and not fb:
        return (A[:, None, :, None] == B[None, :, None, :]).to(acc)
    if not fa:
        return _pair_dots(B, A, acc).permute(1, 0, 3, 2)
    K1, T1 = A.shape[:2]
    K2, T2 = B.shape
    return A[:, :, B.reshape(-1)].reshape(K1, T1, K2, T2).permute(0, 2, 1, 3)


def _quad(A, M, B) -> torch.Tensor:
    """[K] of <A_k, M B_k> (A [K, T1, r], M [T1, T2], B [K, T2, r]), token by token: each M B_k
    ([T1, r], a few MB) is still in cache for its dot product, where a batched M B and a batched dot
    would stream [K, T1, r] through memory twice."""
    out = torch.empty(A.shape[0], dtype=A.dtype)
    for k in range(A.shape[0]):
        out[k] = torch.dot(A[k].reshape(-1), (M @ B[k]).reshape(-1))
    return out


def _mat_cross(e1, e2, acc, diag: bool):
    """[K1, K2] (or [K] with diag) of <g1_a, g2_b> for g_k = sum_t L[k,t]^T R[k,t]."""
    L1, R1, L2, R2 = e1[1], e1[2], e2[1], e2[2]
    for S1, S2, O1, O2 in ((R1, R2, L1, L2), (L1, L2, R1, R2)):
        if is_shared(S1) and is_shared(S2) and O1.is_floating_point() and O2.is_floating_point():
            M = _dots(S1[0], S2[0], acc)                 # [T1, T2], once
            if diag:
                return _quad(O1, M, O2)
            Y = torch.matmul(M, O2)                       # [K2, T1, r]: (M O2[b])[t] = sum_s M[t,s] O2[b,s]
            return O1.reshape(O1.shape[0], -1) @ Y.reshape(Y.shape[0], -1).T
    # general factors (the head's rank-one entries): chunks of a, [c, K2, T1, T2] at a time
    K1, K2 = L1.shape[0], L2.shape[0]
    out = []
    step = max(1, 2**22 // max(1, K2 * L1.shape[1] * L2.shape[1]))
    for s in range(0, K1, step):
        a = slice(s, min(K1, s + step))
        if diag:
            LL = _pair_dots(L1[a], L2[a], acc).diagonal(0, 0, 1)    # [T1, T2, c]
            RR = _pair_dots(R1[a], R2[a], acc).diagonal(0, 0, 1)
            out.append((LL * RR).sum((0, 1)))
        else:
            out.append((_pair_dots(L1[a], L2, acc) * _pair_dots(R1[a], R2, acc)).sum((2, 3)))
    return torch.cat(out)


def _rows_cross(e1, e2, acc, diag: bool):
    """`cross` of two "rows" entries on the same side: M = X1 X2^T once; per part of e2,
    Y = M[:, :T_g] O2 (its positions only), then <O1_a, Y_b> over each part of e1's positions."""
    X1, P1, K1 = e1[2:]
    X2, P2, K2 = e2[2:]
    M = _dots(X1, X2, acc)                               # [T1, T2]
    if diag:
        out = torch.zeros(K1, dtype=acc)
        for k1, O1 in P1:
            for k2, O2 in P2:
                r0, r1 = max(k1, k2), min(k1 + O1.shape[0], k2 + O2.shape[0])
                if r0 < r1:
                    A, B = O1[r0 - k1:r1 - k1], O2[r0 - k2:r1 - k2]
                    out[r0:r1] += _quad(A, M[:A.shape[1], :B.shape[1]], B)
        return out
    out = torch.zeros(K1, K2, dtype=acc)
    for k2, O2 in P2:
        Y = torch.matmul(M[:, :O2.shape[1]], O2)         # [K2_g, T1, r]
        for k1, O1 in P1:
            # Y[:, :T1_g] flattened is a strided view (row stride T1 r): no copy
            out[k1:k1 + O1.shape[0], k2:k2 + O2.shape[0]] += \
                O1.reshape(O1.shape[0], -1) @ Y[:, :O1.shape[1]].reshape(O2.shape[0], -1).T
    return out


def as_mat(e):
    """A "rows" entry as a "mat" one: the per-token factor zero-padded to all K tokens and positions."""
    if e[0] != "rows":
        return e
    _, side, X, parts, K = e
    O = torch.zeros((K, X.shape[0], *parts[0][1].shape[2:]), dtype=parts[0][1].dtype)
    for k, P in parts:
        O[k:k + P.shape[0], :P.shape[1]] += P
    Xe = X.expand(K, *X.shape)
    return ("mat", O, Xe) if side == "R" else ("mat", Xe, O)


def cross(e1, e2, acc, diag: bool = False) -> torch.Tensor:
    """<g1_a, g2_b> of two factor entries of one parameter: [K1, K2], or [K] (a == b) with diag."""
    if (e1[0] == "vec") != (e2[0] == "vec"):
        raise Unsupported("a parameter used both as a matrix and elementwise")
    if e1[0] == "vec":
        return (e1[1] * e2[1]).sum(1) if diag else e1[1] @ e2[1].T
    if e1[0] == "rows" and e2[0] == "rows" and e1[1] == e2[1]:
        return _rows_cross(e1, e2, acc, diag)
    return _mat_cross(as_mat(e1), as_mat(e2), acc, diag)


def entry_directional(e, vp) -> torch.Tensor:
    """[K] of <g_k, V> (`capture.entry_directional`), "rows" entries included: with the rank-one
    V = u w^T, sum_t (O_kt.u)(X_t.w) over each part's own positions (side R; (X_t.u)(O_kt.w) for L)."""
    if e[0] == "rows" and isinstance(vp, tuple):
        _, side, X, parts, K = e
        xv, ov = (vp[1], vp[0]) if side == "R" else vp
        xd = xv[X] if not X.is_floating_point() else X @ xv      # [T]
        out = torch.zeros(K, dtype=xd.dtype)
        for k, O in parts:
            out[k:k + O.shape[0]] += ((O @ ov) * xd[:O.shape[1]]).sum(1)
        return out
    return _entry_directional(as_mat(e), vp)


# ----------------------------------------------------------------------------------------------
# one row: forward with stage marks
# ----------------------------------------------------------------------------------------------
def _batchable_attention():
    """Scaled-dot-product attention by its composite (math) form, whose backward functorch batches over
    the tokens; the fused CPU kernel's backward has no batching rule and runs once per token."""
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
        return sdpa_kernel([SDPBackend.MATH])
    except ImportError:   # older torch: the default kernels
        import contextlib
        return contextlib.nullcontext()


class Row:
    """One response forwarded alone: its tokens' log-probs, the captured uses by stage, the stage
    boundaries and the current batched signal at the upper boundary."""

    def __init__(self, model, sel, forward, blocks, head):
        protect = PROTECT.setdefault(model, set())
        for attempt in range(2):
            rec = Recorder(model, sel, 1, protect)
            marks, hd, handles = [], [], []

            def pre(i):
                def hook(m, args, kwargs):
                    x = args[0] if args else kwargs.get("hidden_states")
                    marks.append((i, x, len(rec.uses)))
                return hook

            def head_hook(m, args, out):
                hd.append((args[0] if args else None, out, len(rec.uses)))

            handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
            handles.append(head.register_forward_hook(head_hook))
            with _batchable_attention():
                tok, cols, lab = run_hooked(rec, forward, handles)
            changed = {u["name"] for u in rec.uses if any(t._version != v for t, v in u["ver"])}
            if not changed:
                break
            if attempt == 1 or changed <= protect:
                raise Unsupported(f"module output changed in place: {sorted(changed)[:3]}")
            protect |= changed
        L = len(blocks)
        if [m[0] for m in marks] != list(range(L)) or any(not torch.is_tensor(m[1]) for m in marks):
            raise Unsupported("the decoder blocks are not each called once, in order, on a hidden-state tensor")
        if len(hd) != 1 or not torch.is_tensor(hd[0][0]) or not torch.is_tensor(hd[0][1]):
            raise Unsupported("the output head is not called once on one tensor")
        h, out, n_head = hd[0]
        if h.dim() != 3 or out.dim() != 3 or h.shape[:2] != out.shape[:2] or h.shape[0] != 1:
            raise Unsupported(f"head input/output shapes {tuple(h.shape)} / {tuple(out.shape)}")
        self.tok, self.h, self.out = tok, h, out
        self.pos = cols + (out.shape[1] - 1 - tok.shape[1])   # label column -> head position
        self.K = len(cols)
        self.cols, self.lab = cols, lab
        self.xs = [m[1] for m in marks]
        starts = [m[2] for m in marks]
        self.stages: dict[int, list] = {}    # stage -> uses (-1: below block 0; L-1 includes the final norm)
        self.head_uses = []
        for i, u in enumerate(rec.uses):
            if u["module"] is head:   # the head's own factors come from `_head_entries`: drop its logits
                self.head_uses.append({"module": u["module"]})
                continue
            if i >= n_head:
                raise Unsupported(f"{u['name']} is called after the output head")
            s = sum(1 for st in starts if st <= i) - 1
            self.stages.setdefault(s, []).append(u)
        self.signature = tuple((u["name"], u["cap"]["tag"], s) for s, us in sorted(self.stages.items()) for u in us)
        self.G = None   # batched signal [K, *boundary] at the current upper boundary

    def keep(self, b: int, e: int):
        """Only the tokens b..e-1 (of this row's completion tokens) are this row's pseudo-responses."""
        self.cols, self.lab, self.pos = self.cols[b:e], self.lab[b:e], self.pos[b:e]
        self.K = e - b


def _head_entries(row: Row, head, sel, acc, retain: bool):
    """One ordinary backward of sum_k logp_k to (h, logits): dlogp/dh per token (-> row.G) and the
    head's rank-one entries."""
    wants = [t for t in (row.h, row.out) if t.requires_grad]
    # without verification the head's part of the graph (its [S, vocabulary] log-softmax) is freed here
    gs = torch.autograd.grad(row.tok.sum(), wants, retain_graph=retain, allow_unused=True) if wants else []
    got = dict(zip([id(t) for t in wants], gs))
    dh, dout = got.get(id(row.h)), got.get(id(row.out))
    k = torch.arange(row.K)
    if dh is not None:
        row.G = torch.zeros((row.K, *row.h.shape), dtype=dh.dtype)
        row.G[k, 0, row.pos] = dh[0, row.pos]
    ents = []
    own = [p for p in head.parameters(recurse=False) if p in sel]
    if own:
        if not (isinstance(head, nn.Linear) and type(head).forward is nn.Linear.forward):
            raise Unsupported(f"output head {type(head).__name__} is not a plain Linear")
        if dout is None:
            raise Unsupported("no gradient reaches the output head")
        dl = dout[0, row.pos].to(acc)
        if head.weight in sel:
            ents.append((head.weight, ("mat", dl[:, None], row.h[0, row.pos].detach().to(acc)[:, None])))
        if head.bias is not None and head.bias in sel:
            ents.append((head.bias, ("vec", dl)))
    row.out = None   # the logits: no longer needed
    return ents


# functorch has no batching rule for the CPU attention kernel's backward (torch 2.13): it loops over
# the tokens for that one op, correctly; the notice it raises is about speed only
_SLOW_NOTICE = "There is a performance drop because we have not yet implemented the batching rule"


def batched_grad(upper, inputs: list, G: torch.Tensor, retain: bool) -> tuple:
    """d<upper, G[k]>/d inputs for every k: one backward vectorised over G's first axis.

    torch.func.vmap first (functorch's batching rules cover layer norms and pointwise backwards, which
    `is_grads_batched`'s older vmap runs as per-token loops), else `is_grads_batched`."""
    import warnings

    def one(g):   # called once, with g batched: one backward
        gs = torch.autograd.grad(upper, inputs, grad_outputs=g, retain_graph=retain, allow_unused=True)
        return tuple(torch.zeros_like(i) if x is None else x for i, x in zip(inputs, gs))

    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=_SLOW_NOTICE)
            return torch.func.vmap(one)(G)
    except Exception as e:  # noqa: BLE001 - an op functorch cannot batch: the engine's own batched backward
        logging.getLogger("entangle_sim.torch").debug("staged backward: torch.func.vmap failed (%s: %s); "
                                                      "is_grads_batched instead", type(e).__name__, e)
    try:
        return torch.autograd.grad(upper, inputs, grad_outputs=G, is_grads_batched=True, retain_graph=retain,
                                   allow_unused=True)
    except RuntimeError as e:
        raise Unsupported(f"staged backward failed: {e}") from None


def _stage_entries(row: Row, s: int, sel, acc, retain: bool):
    """Back-propagate row.G from stage s's upper boundary to its lower one and its captured outputs;
    the stage's factor entries (row.G moves down; None once nothing below carries gradient)."""
    uses = row.stages.get(s, [])
    upper = row.h if s == len(row.xs) - 1 else row.xs[s + 1]
    lower = row.xs[s] if s >= 0 else None
    if row.G is None or not upper.requires_grad:
        row.G = None
        return []
    outs = [o for u in uses for o in u["outs"]]
    need = [o.requires_grad for o in outs]
    low = lower is not None and lower.requires_grad
    inputs = ([lower] if low else []) + [o for o, r in zip(outs, need) if r]
    if not inputs:
        row.G = None
        return []
    grads = list(batched_grad(upper, inputs, row.G, retain))
    G = grads.pop(0) if low else None
    row.G = G.to(row.G.dtype) if G is not None else None
    it = iter(grads)
    per_out = [next(it) if r else None for r in need]
    rows = torch.zeros(row.K, dtype=torch.long)
    ents, pos = [], 0
    for u in uses:
        gs = per_out[pos:pos + len(u["outs"])]
        pos += len(u["outs"])
        if all(g is None for g in gs):
            continue
        ds = []
        for g, o in zip(gs, u["outs"]):
            g = torch.zeros((row.K, *o.shape), dtype=acc) if g is None else g.to(acc)
            ds.append(normalise(g, u["cap"]["tag"], 1, batch_dims=1)[:, 0])
        d = ds if u["rule"].multi_output else ds[0]
        ents.extend(u["rule"].entries(u["module"], u["cap"], d, rows, sel, acc))
    return ents


# ----------------------------------------------------------------------------------------------
# driver
# ----------------------------------------------------------------------------------------------
# Causal savings: a token's log-prob needs only the positions up to its own. A response's tokens are
# split into groups of this many (by position); each group but the last runs on the row cut after its
# last token, so its batched backwards cover fewer positions (checked: the cut row's log-probs must equal
# the full row's, else the row is not cut).
TOKENS_PER_GROUP = 16


def token_groups(model, sel, fwd, blocks, head):
    """The Rows of one response: [cut rows of the first groups..., the full row with the last group]."""
    full = Row(model, sel, lambda: fwd(None), blocks, head)
    n = full.K
    if n <= TOKENS_PER_GROUP:
        return [full]
    bounds = list(range(0, n, TOKENS_PER_GROUP))
    rows = []
    for b in bounds[:-1]:
        e = min(n, b + TOKENS_PER_GROUP)
        upto = int(full.lab[e - 1]) + 1
        r = Row(model, sel, lambda: fwd(upto), blocks, head)
        if r.K != e:
            raise Unsupported("the cut row has other completion tokens than the full one")
        a = full.tok[0, full.cols[b:e]].detach()
        c = r.tok[0, r.cols[b:e]].detach()
        tol = TOL.get(a.dtype, 5e-2)
        if float((a - c).abs().max()) > tol * max(1.0, float(a.abs().max())) or r.signature != full.signature:
            return [full]   # not causal, not reproducible, or another structure: no cut
        r.keep(b, e)
        rows.append(r)
    full.keep(bounds[-1], n)
    return rows + [full]


def staged_token_gram(model, params: dict, forwards):
    """(inner [T_w, T_l], |g_t|^2 [T_w], |g_u|^2 [T_l]) of one pair.

    forwards: two callables (chosen, rejected); forward(upto) runs the model on its one unpadded row
    (cut after `upto` tokens unless None) and returns (per-token log-probs [1, C], the label columns [T]
    of its completion tokens, their positions in the row [T]).
    Raises Unsupported (no block list or head, ...) or Mismatch (failed verification)."""
    sel = set(params.values())
    acc = acc_dtype(model)
    blocks, head = block_list(model), output_head(model)
    RW, RL = token_groups(model, sel, forwards[0], blocks, head), token_groups(model, sel, forwards[1], blocks, head)
    rows = RW + RL
    Tw, Tl = sum(r.K for r in RW), sum(r.K for r in RL)
    if Tw == 0 or Tl == 0:
        raise ValueError("token_gram: a response has no completion tokens")
    # the groups of a response are merged into one set of entries per stage ("slot": chosen, rejected)
    sl = [slice(0, Tw), slice(0, Tl)]
    key = ("token-staged", sel_key(params))
    full = (key, tuple(r.signature for r in (RW[-1], RL[-1])))
    verifying = full not in VERIFIED.get(model, set())
    # the verification runs on the full rows (every token of the last group of each response; the cut rows
    # are the same forward on a prefix, with the same stage signature and log-probs, `token_groups`): their
    # graphs are kept for its backward, the cut rows' are freed stage by stage
    checked = [RW[-1], RL[-1]] if verifying else []
    L = len(blocks)
    # the lowest stage (L = the head) where each parameter is used: its entries are kept until then
    last: dict = {}
    for r in rows:
        for u in r.head_uses:
            for p in u["module"].parameters(recurse=False):
                last.setdefault(p, L)
        for s, us in r.stages.items():
            for u in us:
                for p in u["module"].parameters(recurse=False):
                    last[p] = min(last.get(p, s), s)
    ip = torch.zeros(Tw, Tl, dtype=acc)
    nw, nl = torch.zeros(Tw, dtype=acc), torch.zeros(Tl, dtype=acc)
    norm, is_w = [nw, nl], [True, False]
    if verifying:
        v = Direction(params.values(), acc)
        dirs = [torch.zeros(Tw, dtype=acc), torch.zeros(Tl, dtype=acc)]
    kept: dict = {}   # parameter -> per slot, its entries from upper stages

    # nothing selected below the lowest stage with a captured use: the backward stops there
    lowest = min([L] + [s for r in rows for s in r.stages])
    for s in range(L, lowest - 1, -1):
        new = []
        for r in rows:
            retain = any(r is c for c in checked)
            ents = _head_entries(r, head, sel, acc, retain) if s == L else _stage_entries(r, s, sel, acc, retain)
            g: dict = {}
            for p, e in ents:
                g.setdefault(p, []).append(e)
            new.append(g)
        new = [merge_groups(new[:len(RW)], [r.K for r in RW], acc),
               merge_groups(new[len(RW):], [r.K for r in RL], acc)]
        for p in set().union(*new):
            nn_ = [g.get(p, []) for g in new]
            old = kept.get(p, [[], []])
            for i in range(2):
                for a in nn_[i]:
                    for b in nn_[i]:
                        norm[i][sl[i]] += cross(a, b, acc, diag=True)
                    for b in old[i]:
                        norm[i][sl[i]] += 2 * cross(a, b, acc, diag=True)
                    if verifying:
                        dirs[i] += entry_directional(a, v[p])
                if not is_w[i]:
                    continue
                for j in (1,):
                    for a in nn_[i]:
                        for b in nn_[j] + old[j]:
                            ip[sl[i], sl[j]] += cross(a, b, acc)
                    for a in old[i]:
                        for b in nn_[j]:
                            ip[sl[i], sl[j]] += cross(a, b, acc)
            if last.get(p, s) < s:
                kept[p] = [o + n_ for o, n_ in zip(old, nn_)]
            else:
                kept.pop(p, None)
        if all(r.G is None for r in rows):
            break
    if verifying:
        per_row = torch.cat(dirs).split([r.K for r in rows])
        _verify(model, full, params, checked, v, [per_row[len(RW) - 1], per_row[-1]], acc)
    return ip, nw, nl


def _embed(e, o: int, K: int):
    """A group's entry (its K_g tokens) as an entry of the response's K tokens (rows o.. o+K_g; zero
    elsewhere)."""
    def pad(x):
        out = torch.zeros((K, *x.shape[1:]), dtype=x.dtype)
        out[o:o + x.shape[0]] = x
        return out

    if e[0] == "vec":
        return ("vec", pad(e[1]))
    Lf, Rf = e[1], e[2]
    if is_shared(Rf) and not is_shared(Lf):
        return ("mat", pad(Lf), Rf[0].expand(K, *Rf.shape[1:]))
    if is_shared(Lf) and not is_shared(Rf):
        return ("mat", Lf[0].expand(K, *Lf.shape[1:]), pad(Rf))
    # both per token (the head's entries: zero rows contribute nothing), or both shared (K_g == 1)
    return ("mat", pad(Lf.contiguous()), pad(Rf.contiguous()))


def _prefix_close(a, b) -> bool:
    n = min(a.shape[0], b.shape[0])
    if not a.is_floating_point():
        return torch.equal(a[:n], b[:n])
    tol = 1e-10 if a.dtype == torch.float64 else 1e-5
    return torch.allclose(a[:n], b[:n], rtol=tol, atol=tol * float(b[:n].abs().max()))


def merge_groups(groups: list, Ks: list, acc) -> dict:
    """One response's entries from its token groups ({param: [entries]} each, K_g tokens each) ->
    {param: [entries]} over all K = sum K_g tokens.

    A matrix entry with a shared factor X (a layer's input, token ids: stride 0 over the tokens) and a
    per-token factor O becomes one "rows" entry: the groups' X are prefixes of one another (causal: the
    cut rows' activations are the full row's), so X is the longest one and each group keeps its own O
    [K_g, T_g, r] (no padding): ("rows", side, X, ((k_0, O_0), ...), K), side "R" when X is the right
    factor (g_k = sum_t O_kt^T X_t, e.g. a Linear) and "L" when it is the left one (X_t^T O_kt, e.g. an
    Embedding's ids). The contraction then forms M = X_w X_l^T once per pair of responses and uses only
    each group's positions. Entries without that structure (or whose X differ beyond round-off) are
    kept apart, zero outside their group's tokens."""
    K = sum(Ks)
    offs = [sum(Ks[:i]) for i in range(len(Ks))]
    out: dict = {}
    for p in set().union(*groups):
        buckets, rest = [], []    # bucket: [side, X, [(o, O)]]
        vec = None                # "vec" entries add up (one per parameter)
        for g, o in zip(groups, offs):
            for e in g.get(p, []):
                if e[0] == "vec":
                    if vec is None:
                        vec = torch.zeros((K, *e[1].shape[1:]), dtype=e[1].dtype)
                    vec[o:o + e[1].shape[0]] += e[1]
                    continue
                side = None
                if e[1].stride(0) != 0 and e[2].stride(0) == 0 and e[1].is_floating_point():
                    side, X, O = "R", e[2][0], e[1]
                elif e[1].stride(0) == 0 and e[2].stride(0) != 0 and e[2].is_floating_point():
                    side, X, O = "L", e[1][0], e[2]
                if side is None:
                    rest.append(_embed(e, o, K) if len(groups) > 1 else e)
                    continue
                for b in buckets:
                    if b[0] == side and b[1].shape[1:] == X.shape[1:] and b[1].dtype == X.dtype \
                            and b[2][0][1].shape[2:] == O.shape[2:] and _prefix_close(X, b[1]):
                        if X.shape[0] > b[1].shape[0]:
                            b[1] = X
                        b[2].append((o, O))
                        break
                else:
                    buckets.append([side, X, [(o, O)]])
        out[p] = list(rest) + ([("vec", vec)] if vec is not None else []) + \
            [("rows", side, X, tuple(parts), K) for side, X, parts in buckets]
    return out


def _verify(model, full, params, rows, v, dirs, acc):
    """sum_k r_k <g_k, v> from the factors (dirs: [K] of <g_k, v> per row) against <grad of
    sum_k r_k logp_k, v> from one ordinary backward through the rows' own forward graphs; random r."""
    gen = torch.Generator().manual_seed(4321)
    rs = [torch.randn(r.K, generator=gen, dtype=acc) for r in rows]
    mine = float(sum((r_ * d).sum() for r_, d in zip(rs, dirs)))
    target = sum((row.tok[0, row.cols] * r_.to(row.tok.dtype)).sum() for row, r_ in zip(rows, rs))
    plist = list(params.values())
    gs = torch.autograd.grad(target, plist, allow_unused=True) if target.requires_grad else [None] * len(plist)
    ref = sum(v.dot(p, g) for p, g in zip(plist, gs) if g is not None)
    scale = float(sum((r_ * d).abs().sum() for r_, d in zip(rs, dirs)))
    check_agreement(model, full, mine, ref, scale, plist[0].dtype if plist else torch.float64, Mismatch,
                    "the staged token factors disagree with autograd token by token",
                    "a module output or hidden state is used outside its stage, or a parameter outside its module")
