"""Per-pair and per-token gradient geometry of a PyTorch causal LM (Hugging Face forward signature).

A batch is TRL's collated preference format: `input_ids`, `attention_mask`, `completion_mask`, each
[2B, S], right-padded, rows 0..B-1 the chosen and B..2B-1 the rejected responses (exactly what
`trl.trainer.dpo_trainer.DataCollatorForPreference` and `entangle_sim.torch.data.collate` return).
The log-prob of a response is the sum over its completion tokens of log p(y_t | y_<t) (TRL's
`logps/chosen`, `logps/rejected`); g = d(log-prob)/d(theta) over the selected parameters.

Two exact methods (same numbers up to round-off):

* ``exact``: `torch.func.functional_call` + `vmap(grad)` over responses, `chunk_size` at a time;
  holds chunk x |theta| gradient entries.
* ``ghost``: one batched forward and one backward to the *outputs* of every `nn.Linear`, GPT-2
  `Conv1D` and `nn.Embedding` (hooks keep their inputs). A weight used as y_t = W a_t has per-response
  gradient  sum_t delta_t a_t^T, so

      <dW, dW'> = sum_{t,s} <a_t, a'_s> <delta_t, delta'_s>

  and no per-response parameter-sized gradient is formed (Opacus' ghost clipping / "ghost dot
  product"). An embedding is the same with a_t the one-hot token, so a weight tied between the
  input embedding and the LM head (GPT-2) gets the sum of both uses, cross terms included. Biases
  and elementwise-affine norms (LayerNorm, RMSNorm) are small: their per-response gradients are
  formed exactly. Parameters used anywhere else make ghost refuse (and `auto` use exact); the first
  ghost chunk of each model and parameter selection is checked against autograd's summed gradient,
  so an unseen use raises instead of giving a wrong number (a model whose forward is changed after
  that is not re-checked).

``auto`` picks ghost when every selected parameter is covered and its estimated cost is lower.

Subsets: None (all parameters), "trainable" (requires_grad, e.g. LoRA-only under PEFT), or a list
of name prefixes ("lm_head", "transformer.h.11"); a prefix matches a name or a dotted ancestor. A
parameter shared by several modules is selected if any of its names matches.

Size: both methods, the hooks that collect the ghost factors, the coverage check and the one-time
check against autograd belong together (ghost is only trusted where it was checked against exact).
"""
from __future__ import annotations

import contextlib
import warnings
import weakref
from typing import NamedTuple, Sequence, Union

import torch
from torch import nn

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
def _acc_dtype(model) -> torch.dtype:
    """float64 for float64 models, float32 otherwise (bf16/fp16 models accumulate in float32)."""
    p = next(model.parameters())
    return torch.float64 if p.dtype == torch.float64 else torch.float32


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
def _measuring(model):
    """Eval mode (no dropout, no HF checkpointing) for the measurement; restores training mode."""
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
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)
        for m, key, h in lifted:
            m._forward_hooks[key] = h


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
    acc = _acc_dtype(model)
    lp = torch.log_softmax(logits.to(acc), dim=-1)
    labels = input_ids[:, first + 1:]
    tok = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1) * cm[:, first:].to(acc)
    if per_token:
        return tok.sum(1), tok, first
    return tok.sum(1)


def _pairs_chunks(n: int, chunk: int):
    for s in range(0, n, chunk):
        yield slice(s, min(n, s + chunk))


# ----------------------------------------------------------------------------------------------
# ghost: factored per-response gradients
# ----------------------------------------------------------------------------------------------
def _conv1d_type():
    try:
        from transformers.pytorch_utils import Conv1D
        return Conv1D
    except Exception:  # transformers missing or moved: no Conv1D support
        return None


def _is_affine_norm(m) -> bool:
    w = getattr(m, "weight", None)
    if not isinstance(w, nn.Parameter) or w.dim() != 1:
        return False
    if len(list(m.children())) or len(list(m.parameters(recurse=False))) > 2:
        return False
    b = getattr(m, "bias", None)
    return isinstance(m, nn.LayerNorm) or ("norm" in type(m).__name__.lower() and (b is None or b.dim() == 1))


class _Use:
    """One call of a hooked module in the forward: how its parameters' gradients factor."""

    __slots__ = ("module", "kind", "inp", "out", "ids", "u", "version")

    def __init__(self, module, kind, inp=None, out=None, ids=None, u=None):
        self.module, self.kind, self.inp, self.out, self.ids, self.u = module, kind, inp, out, ids, u
        self.version = None if out is None else out._version


class _Recorder:
    """Forward hooks on Linear / Conv1D / Embedding / affine norms recording each call."""

    def __init__(self, model, params: dict[str, nn.Parameter]):
        self.model = model
        self.sel = set(params.values())
        self.uses: list[_Use] = []
        self.handles = []
        self.n = None
        conv1d = _conv1d_type()
        self.covered: set = set()
        self.bad: list[str] = []
        for name, m in model.named_modules():
            own = [p for p in m.parameters(recurse=False) if p in self.sel]
            if not own:
                continue
            if isinstance(m, nn.Linear):
                kind = "linear"
            elif conv1d is not None and isinstance(m, conv1d):
                kind = "conv1d"
            elif isinstance(m, nn.Embedding):
                if m.max_norm is not None or m.scale_grad_by_freq or m.sparse:
                    self.bad.append(f"{name} (Embedding with max_norm/scale_grad_by_freq/sparse)")
                    continue
                kind = "embedding"
            elif _is_affine_norm(m):
                kind = "norm"
            else:
                self.bad.append(f"{name} ({type(m).__name__})")
                continue
            self.covered.update(own)
            self.handles.append(m.register_forward_hook(self._hook(kind)))
        # A selected parameter owned by no hooked module (e.g. a bare nn.Parameter used in a custom op)
        self.uncovered = [p for p in self.sel if p not in self.covered]

    def supported(self) -> bool:
        return not self.bad and not self.uncovered

    def why(self) -> str:
        if self.bad:
            return "modules the ghost method cannot factor: " + ", ".join(self.bad[:3])
        return f"{len(self.uncovered)} selected parameter(s) not owned by a Linear/Conv1D/Embedding/norm module"

    def _hook(self, kind):
        def hook(m, args, out):
            if not torch.is_grad_enabled() or not isinstance(out, torch.Tensor):
                return None
            x = args[0] if args else None
            n = self.n
            if out.shape[0] != n:
                if out.shape[0] == 1 and n is not None:  # broadcast (e.g. GPT-2 position embedding)
                    out = out.expand(n, *out.shape[1:])
                    x = x.expand(n, *x.shape[1:]) if x is not None else x
                else:
                    raise ValueError(f"ghost: module {type(m).__name__} output batch {out.shape[0]} != {n}")
            if kind == "embedding":
                self.uses.append(_Use(m, kind, out=out, ids=x))
            elif kind == "norm":
                # Elementwise-affine in the weight: y = u0 + w * (u1 - u0) (+ b); check it on this call.
                with torch.no_grad():
                    w = m.weight
                    b = getattr(m, "bias", None)
                    pz = {"weight": torch.zeros_like(w)}
                    po = {"weight": torch.ones_like(w)}
                    if b is not None:
                        pz["bias"] = torch.zeros_like(b)
                        po["bias"] = torch.zeros_like(b)
                    u0 = torch.func.functional_call(m, pz, (x,))
                    u1 = torch.func.functional_call(m, po, (x,))
                    recon = u0 + w * (u1 - u0) + (b if b is not None else 0)
                    tol = 1e-4 if out.dtype in (torch.float32, torch.float64) else 5e-2
                    if not torch.allclose(recon.to(out.dtype), out.detach(), rtol=tol, atol=tol):
                        raise _Unsupported(f"{type(m).__name__} is not elementwise-affine in its weight")
                self.uses.append(_Use(m, kind, out=out, u=(u1 - u0)))
            else:
                self.uses.append(_Use(m, kind, inp=x.detach(), out=out))
            return out

        return hook

    def close(self):
        for h in self.handles:
            h.remove()
        self.handles = []


class _Unsupported(ValueError):
    pass


def _factors(uses: list[_Use], deltas: list[torch.Tensor], sel: set, acc) -> dict:
    """Per parameter, its per-use factors.

    Each entry is ('mat', L, R) with per-response gradient sum_t L_t^T R_t (L: [N,S,rows] dense or
    [N,S] token ids = one-hot rows; R: [N,S,cols]) or ('vec', V) with V [N, size] the per-response
    gradient itself. A leading token dimension may precede N (token_gram).
    """
    fac: dict = {}
    for use, d in zip(uses, deltas):
        m = use.module
        if d is None:
            d = torch.zeros_like(use.out)
        d = d.to(acc)
        w = m.weight
        b = getattr(m, "bias", None)
        if use.kind == "linear":
            if w in sel:
                fac.setdefault(w, []).append(("mat", d, use.inp.to(acc)))
            if b is not None and b in sel:
                fac.setdefault(b, []).append(("vec", d.sum(-2)))
        elif use.kind == "conv1d":
            if w in sel:
                fac.setdefault(w, []).append(("mat", use.inp.to(acc), d))
            if b is not None and b in sel:
                fac.setdefault(b, []).append(("vec", d.sum(-2)))
        elif use.kind == "embedding":
            if w in sel:
                ids = use.ids
                if m.padding_idx is not None:  # the padding row gets no gradient
                    d = d * (ids != m.padding_idx).unsqueeze(-1).to(acc)
                fac.setdefault(w, []).append(("mat", ids, d))
        elif use.kind == "norm":
            u = use.u.to(acc)
            red = tuple(range(1, d.dim() - 1))  # sum over positions, keep the response and feature dims
            if w in sel:
                fac.setdefault(w, []).append(("vec", (d * u).sum(red)))
            if b is not None and b in sel:
                fac.setdefault(b, []).append(("vec", d.sum(red)))
    return fac


def _left_right_dot(L1, L2, acc):
    """[P,S1,S2] matrix of <L1_t, L2_s> where L are dense [P,S,r] or ids [P,S] (one-hot rows)."""
    if L1.dtype.is_floating_point and L2.dtype.is_floating_point:
        return torch.bmm(L1, L2.transpose(1, 2))
    if not L1.dtype.is_floating_point and not L2.dtype.is_floating_point:
        return (L1.unsqueeze(2) == L2.unsqueeze(1)).to(acc)
    if L1.dtype.is_floating_point:  # dense x ids: out[p,t,s] = L1[p,t,ids2[p,s]]
        idx = L2.unsqueeze(1).expand(-1, L1.shape[1], -1)
        return torch.gather(L1, 2, idx)
    idx = L1.unsqueeze(1).expand(-1, L2.shape[1], -1)       # ids x dense: out[p,t,s] = L2[p,s,ids1[p,t]]
    return torch.gather(L2, 2, idx).transpose(1, 2)


def _ghost_inner(fac: dict, I: torch.Tensor, J: torch.Tensor, acc, chunk: int = 64) -> torch.Tensor:
    """<g_I[p], g_J[p]> for index pairs p, from the factors (sums over every pair of uses)."""
    out = torch.zeros(len(I), dtype=acc)
    for entries in fac.values():
        for e1 in entries:
            for e2 in entries:
                if e1[0] != e2[0]:
                    raise _Unsupported("a parameter used both as a matrix and elementwise")
                for sl in _pairs_chunks(len(I), chunk):
                    i, j = I[sl], J[sl]
                    if e1[0] == "vec":
                        out[sl] += (e1[1][i] * e2[1][j]).sum(-1)
                    else:
                        LL = _left_right_dot(e1[1][i], e2[1][j], acc)
                        RR = torch.bmm(e1[2][i], e2[2][j].transpose(1, 2))
                        out[sl] += (LL * RR).sum((1, 2))
    return out


def _ghost_summed_grad(fac: dict, p: nn.Parameter, acc) -> torch.Tensor:
    """sum over responses of the factored gradient of p (parameter-sized, one per parameter)."""
    g = torch.zeros(p.shape, dtype=acc)
    for e in fac[p]:
        if e[0] == "vec":
            g += e[1].reshape(-1, *p.shape).sum(0)
            continue
        L, R = e[1], e[2]
        R2 = R.reshape(-1, R.shape[-1])
        if L.dtype.is_floating_point:
            G = L.reshape(-1, L.shape[-1]).T @ R2
        else:
            G = torch.zeros(p.shape[0], R2.shape[1], dtype=acc).index_add_(0, L.reshape(-1), R2)
        g += G.reshape(p.shape)
    return g


def _ghost_directional(fac: dict, vecs: dict, n: int, acc) -> torch.Tensor:
    """<g_i, v> for every response i, v given per parameter (parameter-sized)."""
    out = torch.zeros(n, dtype=acc)
    for p, entries in fac.items():
        v = vecs[p].to(acc)
        for e in entries:
            if e[0] == "vec":
                out += e[1].reshape(n, -1) @ v.reshape(-1)
                continue
            L, R = e[1], e[2]
            # gradient sum_t L_t^T R_t ([rows, cols]) dotted with V ([rows, cols]) = sum_t L_t^T V R_t
            if L.dtype.is_floating_point:    # factors are laid out so that the gradient has p's shape
                out += ((L @ v) * R).sum((1, 2))
            else:
                out += (v[L] * R).sum((1, 2))
    return out


# (model -> parameter selections whose ghost factors were checked against autograd): the check costs
# one extra parameter-gradient backward, so it runs on the first chunk of a model/selection only.
_CHECKED: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


class _Ghost:
    """One forward + backward of a chunk with hooks; yields per-response factors."""

    def __init__(self, model, params):
        self.model = model
        self.params = params
        self.sel = set(params.values())
        self.acc = _acc_dtype(model)
        self.key = (tuple(params), tuple(id(p) for p in params.values()))

    @property
    def checked(self) -> bool:
        return self.key in _CHECKED.get(self.model, ())

    def run(self, input_ids, attention_mask, completion_mask, check: bool):
        rec = _Recorder(self.model, self.params)
        try:
            if not rec.supported():
                raise _Unsupported(rec.why())
            rec.n = input_ids.shape[0]
            with torch.enable_grad():
                logps = response_logps(self.model, input_ids, attention_mask, completion_mask)
        finally:
            rec.close()
        uses = rec.uses
        if any(u.out._version != u.version for u in uses):  # modified in place later: its grad is not delta
            raise _Unsupported("a hooked module's output is modified in place by the model")
        outs = [u.out for u in uses]
        need = [o.requires_grad for o in outs]
        grads = torch.autograd.grad(logps.sum(), [o for o, r in zip(outs, need) if r], allow_unused=True,
                                    retain_graph=check)
        it = iter(grads)
        deltas = [next(it) if r else None for r in need]
        fac = _factors(uses, deltas, self.sel, self.acc)
        if check:
            self._check(fac, logps)
        return logps.detach(), fac

    def _check(self, fac, logps):
        """The factors must add up to autograd's gradient of sum_i logp_i for every selected parameter."""
        plist = list(self.sel)
        true = torch.autograd.grad(logps.sum(), plist, allow_unused=True)
        for p, g in zip(plist, true):
            g = torch.zeros(p.shape, dtype=self.acc) if g is None else g.to(self.acc)
            mine = _ghost_summed_grad(fac, p, self.acc) if p in fac else torch.zeros_like(g)
            scale = max(float(g.abs().max()), float(mine.abs().max()), 1e-30)
            # round-off of autograd's own gradient in the model dtype (bf16 keeps ~3 digits)
            tol = {torch.float64: 1e-9, torch.float32: 1e-3}.get(p.dtype, 5e-2)
            if float((mine - g).abs().max()) > tol * scale:
                raise _Unsupported("a selected parameter is used outside the hooked modules "
                                   "(ghost factors disagree with autograd)")
        _CHECKED.setdefault(self.model, set()).add(self.key)


# ----------------------------------------------------------------------------------------------
# exact: vmap(grad) over responses
# ----------------------------------------------------------------------------------------------
def _exact_grads(model, params, input_ids, completion_mask, acc):
    """[N, |theta_sel|] per-response gradients (flattened, accumulation dtype)."""
    from torch.func import functional_call, grad, vmap

    names = list(params)
    frozen = {n: p.detach() for n, p in model.named_parameters() if n not in params}
    buffers = dict(model.named_buffers())

    def logp_one(psel, ids, cm):
        # Right padding is causal-invisible to the real tokens, so one row takes an all-ones mask; it is
        # an unbatched constant, so the model's mask checks are no data-dependent control flow under vmap.
        ones = torch.ones(1, ids.shape[-1], dtype=torch.long)
        out = functional_call(model, (psel, frozen, buffers), args=(),
                              kwargs={"input_ids": ids[None], "attention_mask": ones, "use_cache": False})
        lp = torch.log_softmax(out.logits[0, :-1].to(acc), -1)
        tok = lp.gather(-1, ids[1:, None]).squeeze(-1)
        return (tok * cm[1:].to(acc)).sum()

    psel = {n: params[n].detach() for n in names}
    with warnings.catch_warnings():
        # functorch falls back to a loop for attention kernels without a batching rule: slower, same numbers
        warnings.filterwarnings("ignore", message="There is a performance drop because we have not yet")
        g = vmap(grad(logp_one), in_dims=(None, 0, 0))(psel, input_ids, completion_mask)
    return torch.cat([g[n].reshape(input_ids.shape[0], -1).to(acc) for n in names], 1)


# ----------------------------------------------------------------------------------------------
# public entry points
# ----------------------------------------------------------------------------------------------
def _trim(batch):
    """Drop all-padding columns at the right end (keeps numbers, saves work)."""
    am = batch["attention_mask"]
    S = int(am.sum(1).max())
    return {k: (v[:, :S] if torch.is_tensor(v) and v.dim() == 2 else v) for k, v in batch.items()}


def _ghost_cost(model, params, N, S):
    """(ghost_extra_flops, exact_extra_flops, exact_bytes) rough estimates for `auto`."""
    P_sel = sum(p.numel() for p in params.values())
    ghost = 0
    for m in model.modules():
        w = getattr(m, "weight", None)
        if isinstance(w, nn.Parameter) and w in set(params.values()) and w.dim() == 2:
            ghost += 3 * S * S * sum(w.shape)          # three Gram entries per pair
    exact = 2 * S * P_sel + 3 * P_sel                  # per-response weight gradients + dot products
    return ghost * N / 2, exact * N, P_sel * 4


def _choose(model, params, method, N, S, chunk):
    if method not in ("auto", "ghost", "exact"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'exact', got {method!r}")
    if method != "auto":
        return method
    rec = _Recorder(model, params)
    rec.close()
    if not rec.supported():
        return "exact"
    g, e, _ = _ghost_cost(model, params, N, S)
    return "ghost" if g <= e else "exact"


def pair_gram(model, batch, *, subset: Subset = None, method: str = "auto", chunk_size: int | None = None,
              return_logps: bool = False):
    """Per-pair Gram of the chosen and rejected response gradients.

    model: a causal LM (`model(input_ids=, attention_mask=).logits`); batch: TRL-collated dict
    ([2B, S] `input_ids`, `attention_mask`, `completion_mask`, chosen rows first).
    Returns `PairGram` of [B] tensors (float32, float64 for a float64 model); with return_logps also
    (chosen_logps [B], rejected_logps [B]).

    >>> g = pair_gram(model, collate(tokenize_rows(tok, rows), tok.pad_token_id))  # doctest: +SKIP
    >>> g.cos                                                                       # doctest: +SKIP
    """
    batch = _trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    N = ids.shape[0]
    if N % 2:
        raise ValueError("batch must hold 2B rows: B chosen then B rejected")
    B = N // 2
    params = select_parameters(model, subset)
    acc = _acc_dtype(model)
    with _measuring(model):
        meth = _choose(model, params, method, N, ids.shape[1], chunk_size)
        chunk = chunk_size or (8 if meth == "ghost" else 2)
        Gww, Gwl, Gll, lw, ll = [], [], [], [], []
        ghost = _Ghost(model, params) if meth == "ghost" else None
        for sl in _pairs_chunks(B, chunk):
            rows = torch.cat([torch.arange(sl.start, sl.stop), B + torch.arange(sl.start, sl.stop)])
            b = sl.stop - sl.start
            if meth == "ghost":
                try:
                    lp, fac = ghost.run(ids[rows], am[rows], cm[rows], check=not ghost.checked)
                except _Unsupported as e:
                    if method == "ghost":
                        raise ValueError(f"ghost method unsupported for this model: {e}") from None
                    return pair_gram(model, batch, subset=subset, method="exact", chunk_size=chunk_size,
                                     return_logps=return_logps)
                w, l = torch.arange(b), b + torch.arange(b)
                Gww.append(_ghost_inner(fac, w, w, acc))
                Gwl.append(_ghost_inner(fac, w, l, acc))
                Gll.append(_ghost_inner(fac, l, l, acc))
            else:
                with torch.no_grad():
                    lp = response_logps(model, ids[rows], am[rows], cm[rows])
                g = _exact_grads(model, params, ids[rows], cm[rows], acc)
                gw, gl = g[:b], g[b:]
                Gww.append((gw * gw).sum(1))
                Gwl.append((gw * gl).sum(1))
                Gll.append((gl * gl).sum(1))
                del g, gw, gl
            lw.append(lp[:b].to(acc))
            ll.append(lp[b:].to(acc))
    res = gram_stats(torch.cat(Gww), torch.cat(Gwl), torch.cat(Gll))
    if return_logps:
        return res, (torch.cat(lw), torch.cat(ll))
    return res


def directional(model, batch, weights, *, subset: Subset = None, chunk_size: int | None = None):
    """First-order change of every response's log-prob under one step theta += sum_j w_j g_j.

    weights: [2B] (chosen then rejected). Returns [2B] tensor  sum_j w_j <g_i, g_j>  (the row sums of
    the 2B x 2B response Gram weighted by w), computed without the Gram: one pass for
    v = sum_j w_j g_j (parameter-sized, autograd), one ghost (or exact) pass for <g_i, v>.
    """
    batch = _trim(batch)
    ids, am, cm = batch["input_ids"], batch["attention_mask"], batch["completion_mask"]
    N = ids.shape[0]
    params = select_parameters(model, subset)
    acc = _acc_dtype(model)
    weights = torch.as_tensor(weights, dtype=acc)
    names = list(params)
    chunk = chunk_size or 16
    with _measuring(model):
        v = {p: torch.zeros(p.shape, dtype=acc) for p in params.values()}
        for sl in _pairs_chunks(N, chunk):
            with torch.enable_grad():
                lp = response_logps(model, ids[sl], am[sl], cm[sl])
                gs = torch.autograd.grad((lp * weights[sl].to(lp.dtype)).sum(), [params[n] for n in names],
                                         allow_unused=True)
            for n, g in zip(names, gs):
                if g is not None:
                    v[params[n]] += g.to(acc)
        out = []
        ghost = _Ghost(model, params)
        use_ghost = _Recorder(model, params)
        use_ghost.close()
        use_ghost = use_ghost.supported()
        vflat = torch.cat([v[params[n]].reshape(-1) for n in names]) if not use_ghost else None
        for sl in _pairs_chunks(N, chunk):
            if use_ghost:
                try:
                    _, fac = ghost.run(ids[sl], am[sl], cm[sl], check=not ghost.checked)
                    out.append(_ghost_directional(fac, v, sl.stop - sl.start, acc))
                    continue
                except _Unsupported:
                    use_ghost = False
                    vflat = torch.cat([v[params[n]].reshape(-1) for n in names])
                    out = []
                    return _directional_exact(model, params, ids, cm, vflat, acc, min(chunk, 4))
            for s2 in _pairs_chunks(sl.stop - sl.start, min(chunk, 4)):
                idx = torch.arange(sl.start + s2.start, sl.start + s2.stop)
                out.append(_exact_grads(model, params, ids[idx], cm[idx], acc) @ vflat)
    return torch.cat(out)


def _directional_exact(model, params, ids, cm, vflat, acc, chunk):
    out = []
    for sl in _pairs_chunks(ids.shape[0], chunk):
        out.append(_exact_grads(model, params, ids[sl], cm[sl], acc) @ vflat)
    return torch.cat(out)


def token_gram(model, pair, *, subset: Subset = None, method: str = "auto") -> TokenGram:
    """Per-token inner products <g_t(y_w), g_u(y_l)> of one pair (Figure 4b of the paper), [T_w, T_l].

    pair: a TRL-collated batch with B = 1 (2 rows) or a dict with `prompt_ids`, `chosen_ids`,
    `rejected_ids` lists. ghost: one forward of both rows and one vmapped backward over the T_w + T_l
    token log-probs (`is_grads_batched`), no per-token parameter-sized gradient; exact: the per-token
    gradients themselves (T x |theta| memory, small models only).
    """
    if "input_ids" not in pair:
        from .data import collate
        pair = collate([pair], pad_token_id=0)
    pair = _trim(pair)
    ids, am, cm = pair["input_ids"], pair["attention_mask"], pair["completion_mask"]
    if ids.shape[0] != 2:
        raise ValueError("token_gram takes one pair (a batch of 2 rows)")
    params = select_parameters(model, subset)
    acc = _acc_dtype(model)
    if method not in ("auto", "ghost", "exact"):
        raise ValueError(f"method must be 'auto', 'ghost' or 'exact', got {method!r}")
    with _measuring(model):
        rec = _Recorder(model, params)
        ok = rec.supported()
        if method == "ghost" and not ok:
            rec.close()
            raise ValueError(f"ghost method unsupported for this model: {rec.why()}")
        if method == "exact" or not ok:
            rec.close()
            return _token_gram_exact(model, params, ids, am, cm, acc)
        try:
            rec.n = 2
            with torch.enable_grad():
                _, tok, first = response_logps(model, ids, am, cm, per_token=True)
        finally:
            rec.close()
        mask = cm[:, first + 1:].bool()
        pos_w = mask[0].nonzero().squeeze(1)
        pos_l = mask[1].nonzero().squeeze(1)
        Tw, Tl = len(pos_w), len(pos_l)
        if Tw == 0 or Tl == 0:
            raise ValueError("token_gram: a response has no completion tokens")
        K = Tw + Tl
        # one-hot grad_outputs over the K token log-probs
        go = torch.zeros(K, *tok.shape, dtype=tok.dtype)
        go[torch.arange(Tw), 0, pos_w] = 1
        go[Tw + torch.arange(Tl), 1, pos_l] = 1
        outs = [u.out for u in rec.uses]
        need = [o.requires_grad for o in outs]
        grads = torch.autograd.grad(tok, [o for o, r in zip(outs, need) if r], grad_outputs=go,
                                    is_grads_batched=True, allow_unused=True)
        it = iter(grads)
        deltas = [next(it) if r else None for r in need]
        seq = torch.cat([torch.zeros(Tw, dtype=torch.long), torch.ones(Tl, dtype=torch.long)])
        ar = torch.arange(K)
        # Flatten (token, row) into K pseudo-responses: token k's signal lives in its own row.
        flat_uses = []
        flat_deltas = []
        for u, d in zip(rec.uses, deltas):
            if d is None:
                d = torch.zeros(K, *u.out.shape, dtype=u.out.dtype)
            nu = _Use(u.module, u.kind, inp=None if u.inp is None else u.inp[seq],
                      out=u.out, ids=None if u.ids is None else u.ids[seq],
                      u=None if u.u is None else u.u[seq])
            flat_uses.append(nu)
            flat_deltas.append(d[ar, seq])
        try:
            fac = _factors(flat_uses, flat_deltas, set(params.values()), acc)
            I = torch.arange(Tw).repeat_interleave(Tl)
            J = Tw + torch.arange(Tl).repeat(Tw)
            inner = _ghost_inner(fac, I, J, acc, chunk=16).reshape(Tw, Tl)
            nw = _ghost_inner(fac, torch.arange(Tw), torch.arange(Tw), acc)
            nl = _ghost_inner(fac, Tw + torch.arange(Tl), Tw + torch.arange(Tl), acc)
        except _Unsupported as e:
            if method == "ghost":
                raise ValueError(f"ghost method unsupported for this model: {e}") from None
            return _token_gram_exact(model, params, ids, am, cm, acc)
    return _token_result(inner, nw, nl)


def _token_result(inner, nw, nl):
    nw, nl = nw.clamp(min=0).sqrt(), nl.clamp(min=0).sqrt()
    tiny = torch.finfo(inner.dtype).tiny
    cos = inner / torch.clamp(nw[:, None] * nl[None, :], min=tiny)
    return TokenGram(inner, cos, nw, nl)


def _token_gram_exact(model, params, ids, am, cm, acc):
    names = list(params)
    plist = [params[n] for n in names]
    with torch.enable_grad():
        _, tok, first = response_logps(model, ids, am, cm, per_token=True)
        mask = cm[:, first + 1:].bool()
        gw, gl = [], []
        for row, store in ((0, gw), (1, gl)):
            for t in mask[row].nonzero().squeeze(1).tolist():
                g = torch.autograd.grad(tok[row, t], plist, retain_graph=True, allow_unused=True)
                store.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1).to(acc)
                                        for p, x in zip(plist, g)]))
    Gw, Gl = torch.stack(gw), torch.stack(gl)
    return _token_result(Gw @ Gl.T, (Gw * Gw).sum(1), (Gl * Gl).sum(1))
