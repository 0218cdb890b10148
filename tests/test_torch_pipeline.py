"""Regression tests of the PyTorch bridge pipeline, one per failure class, plus the general contractions.

All numbers in float64 against a brute force (one autograd backward per response, unpadded); tolerance
1e-6 relative (the methods differ by summation order only, observed <= 1e-12).
"""
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import (collate, directional, pad_token_id, pair_gram, select_parameters,  # noqa: E402
                                token_gram, tokenize_rows)
from entangle_sim.torch.capture import PROTECT, param_group  # noqa: E402
from entangle_sim.torch.geometry import response_gram  # noqa: E402
from entangle_sim.torch.tiny import tiny_family, tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

RTOL = 1e-6


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return collate(tokenize_rows(tok, toy_rows(2, seed=1)), pad_token_id(tok))


def brute(model, batch, params):
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n][None]
        cm = batch["completion_mask"][i, :n]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        gs = torch.autograd.grad((lp * cm[1:]).sum(), params, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(out)


def close(a, b):
    err = float((a - b).abs().max() / b.abs().max())
    assert err <= RTOL, f"relative error {err:.2g}"


def wl(g):
    B = g.shape[0] // 2
    return (g[:B] * g[B:]).sum(1)


def test_flattened_layout_opt(tok, batch):
    """OPT flattens hidden states to [N*S, d] inside its decoder layer: read as the 'flat' layout."""
    model = tiny_family("opt", tok, dtype=torch.float64)
    g = brute(model, batch, list(select_parameters(model).values()))
    close(pair_gram(model, batch, method="ghost").G_wl, wl(g))
    w = torch.tensor([1.0, -0.5, 2.0, 0.3], dtype=torch.float64)
    for method in ("exact", "ghost", "auto"):
        close(directional(model, batch, w, method=method), (g @ g.T) @ w)


class SeqFirst(torch.nn.Module):
    """Applies a linear layer sequence-first (h.transpose(0, 1)), as some custom blocks do."""

    def __init__(self, lin):
        super().__init__()
        self.lin = lin

    def forward(self, h):
        return self.lin(h.transpose(0, 1)).transpose(0, 1)


def _seq_first_model(tok):
    model = tiny_model("llama", tok, width=16).double()
    mlp = model.model.layers[0].mlp
    mlp.down_proj = SeqFirst(mlp.down_proj)
    return model


def test_sequence_first_with_T_equal_2B(tok):
    """T == 2B: a sequence-first [S, N, d] output has the shape of [N, S, d]; the per-response check
    catches the mix-up (the summed gradient alone does not), ghost raises, auto is right."""
    model = _seq_first_model(tok)
    g0 = torch.Generator().manual_seed(0)
    ids = torch.randint(7, len(tok), (4, 4), generator=g0)  # B = 2 pairs, N = 4 rows, S = 4 positions
    b = {"input_ids": ids, "attention_mask": torch.ones_like(ids),
         "completion_mask": torch.tensor([[0, 0, 1, 1]] * 4)}
    g = brute(model, b, list(select_parameters(model).values()))
    with pytest.raises(ValueError, match="ghost method unsupported.*response by response"):
        pair_gram(model, b, method="ghost")
    close(pair_gram(model, b, method="auto").G_wl, wl(g))
    # ... and with S != N the same layer is read as sequence-first and ghost is right
    b2 = {k: torch.cat([v, v[:, -2:]], 1) for k, v in b.items()}
    g2 = brute(model, b2, list(select_parameters(model).values()))
    close(pair_gram(model, b2, method="ghost").G_wl, wl(g2))


def _foreign_use_model(tok):
    model = tiny_model("gpt2", tok).double()
    blk = model.transformer.h[1]
    orig = blk.forward

    def fwd(hidden_states, *a, **k):
        out = orig(hidden_states, *a, **k)
        h = out[0] if isinstance(out, tuple) else out
        h = h + 0.1 * torch.tanh(h @ blk.mlp.c_fc.weight[:, : h.shape[-1]])  # a use outside its module
        return (h, *out[1:]) if isinstance(out, tuple) else h

    blk.forward = fwd
    return model


def test_foreign_weight_use_in_token_maps(tok, batch):
    model = _foreign_use_model(tok)
    pair = {k: v[[0, 2]] for k, v in batch.items()}
    with pytest.raises(ValueError, match="ghost method unsupported"):
        token_gram(model, pair, method="ghost")
    tg = token_gram(model, pair, method="auto")
    # reference: one backward per completion token
    params = list(model.parameters())
    per = []
    for row in (0, 1):
        n = int(pair["attention_mask"][row].sum())
        ids = pair["input_ids"][row, :n][None]
        cm = pair["completion_mask"][row, :n]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        per.append(torch.stack([torch.cat([x.reshape(-1) for x in torch.autograd.grad(lp[t], params, retain_graph=True)])
                                for t in cm[1:].nonzero()[:, 0].tolist()]))
    close(tg.inner, per[0] @ per[1].T)


def test_token_gram_ghost_many_families(tok, batch):
    """Token maps through the same capture and verification (flattened OPT, MoE, Gemma's scaled embedding)."""
    pair = {k: v[[1, 3]] for k, v in batch.items()}
    for fam in ("opt", "qwen2_moe", "gemma"):
        model = tiny_family(fam, tok, dtype=torch.float64)
        a = token_gram(model, pair, method="ghost")
        b = token_gram(model, pair, method="exact")
        close(a.inner, b.inner)
        close(a.norm_w, b.norm_w)


@pytest.mark.parametrize("family", ["bloom", "mixtral"])
def test_exact_falls_back_to_ordinary_backward(tok, batch, family, caplog):
    """BLOOM's GELU is a custom autograd.Function, Mixtral's eager expert loop is data-dependent control
    flow: torch.func cannot transform them; exact says so in one line and loops over responses."""
    model = tiny_family(family, tok, dtype=torch.float64)
    g = brute(model, batch, list(select_parameters(model).values()))
    with caplog.at_level(logging.WARNING, logger="entangle_sim.torch"):
        close(pair_gram(model, batch, method="exact").G_wl, wl(g))
    notes = [r.getMessage() for r in caplog.records if "torch.func cannot transform" in r.getMessage()]
    assert len(notes) == 1 and "\n" not in notes[0]
    close(pair_gram(model, batch, method="ghost").G_wl, wl(g))   # and ghost works too (rules for experts)


def test_moe_experts_and_router_rules(tok, batch):
    model = tiny_family("qwen2_moe", tok, dtype=torch.float64)
    for sub in ("model.layers.0.mlp.experts", "model.layers.0.mlp.gate"):
        g = brute(model, batch, list(select_parameters(model, sub).values()))
        close(pair_gram(model, batch, subset=sub, method="ghost").G_wl, wl(g))


def test_in_place_output_change_detected_falcon(tok, batch):
    """Falcon adds the attention output into the MLP output in place: detected, that output copied."""
    model = tiny_family("falcon", tok, dtype=torch.float64)
    g = brute(model, batch, list(select_parameters(model).values()))
    close(pair_gram(model, batch, method="ghost").G_wl, wl(g))
    assert any("dense_4h_to_h" in n for n in PROTECT[model])


def test_response_gram_groups_and_parameter_groups(tok, batch):
    model = tiny_family("qwen2", tok, dtype=torch.float64)
    params = select_parameters(model)
    g = brute(model, batch, list(params.values()))
    for method in ("ghost", "exact"):
        close(response_gram(model, batch, method=method), g @ g.T)
        per = response_gram(model, batch, groups=2, method=method)
        assert per.shape == (2, 2, 2)
        close(per[1], g[2:] @ g[2:].T)
    # the Gram split by parameter group: every group equals the brute force on its own parameters
    for method in ("ghost", "exact"):
        split = pair_gram(model, batch, method=method, by_group=True)
        close(sum(v.G_wl for v in split.values()), wl(g))
        assert {"embedding", "head", "norm", "layer0.attention", "layer0.mlp"} <= set(split)
        names = [n for n in params if param_group(n) == "layer0.mlp"]
        gm = brute(model, batch, [params[n] for n in names])
        close(split["layer0.mlp"].G_wl, wl(gm))


class Scaled(torch.nn.Module):
    """y = inner(x) * scale: a custom layer with its own parameter."""

    def __init__(self, inner, d):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.linspace(0.5, 1.5, d, dtype=torch.float64))

    def forward(self, x):
        return self.inner(x) * self.scale


def test_register_a_rule_for_a_new_module_type(tok, batch):
    """Supporting a new layer is one registered rule: g(scale) = sum_t delta_t * inner(x)_t."""
    from entangle_sim.torch import register
    from entangle_sim.torch.rules import RULES, Rule, normalise, rule_for

    class ScaledRule(Rule):
        name = "scaled"
        used = 0

        def capture(self, module, args, kwargs, out, tag, N):
            with torch.no_grad():
                return {"u": module.inner(args[0])}

        def entries(self, module, cap, delta, rows, sel, acc):
            ScaledRule.used += 1
            u = normalise(cap["u"], cap["tag"], cap["N"])[rows].to(acc)
            return [(module.scale, ("vec", (delta * u).sum(1)))] if module.scale in sel else []

    model = tiny_model("gpt2", tok).double()
    model.transformer.h[1].mlp.c_proj = Scaled(model.transformer.h[1].mlp.c_proj, model.config.n_embd)
    sub = "transformer.h.1.mlp.c_proj.scale"
    g = brute(model, batch, list(select_parameters(model, sub).values()))
    register(Scaled)(ScaledRule)
    try:
        assert isinstance(rule_for(model.transformer.h[1].mlp.c_proj), ScaledRule)
        close(pair_gram(model, batch, subset=sub, method="ghost").G_wl, wl(g))
        assert ScaledRule.used > 0
    finally:
        RULES.pop(Scaled)


# ----------------------------------------------------------------------------------------------
# staged token maps (one row at a time, block by block)
# ----------------------------------------------------------------------------------------------
def _pair_dict(tok, seed, lens=(4, 6, 3)):
    """A pair with its own lengths (prompt, chosen, rejected): T_w != T_l, the rejected row padded."""
    g = torch.Generator().manual_seed(seed)
    ids = lambda n: torch.randint(7, len(tok), (n,), generator=g).tolist()  # noqa: E731
    return {"prompt_ids": ids(lens[0]), "chosen_ids": ids(lens[1]), "rejected_ids": ids(lens[2])}


def brute_tokens(model, pair, params):
    """Per-token gradients of each response ([T, |params|]): one backward per completion token, unpadded."""
    per = []
    for side in ("chosen_ids", "rejected_ids"):
        ids = torch.tensor([pair["prompt_ids"] + pair[side]])
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        rows = []
        for t in range(len(pair["prompt_ids"]) - 1, lp.shape[0]):
            gs = torch.autograd.grad(lp[t], params, retain_graph=True, allow_unused=True)
            rows.append(torch.cat([(torch.zeros_like(p) if x is None else x).reshape(-1) for p, x in zip(params, gs)]))
        per.append(torch.stack(rows))
    return per


def took(caplog, path):
    return any(f"token_gram: {path}" == r.getMessage().removeprefix("entangle_sim ") for r in caplog.records)


def _lora(model):
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    return peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj", "down_proj"],
                                                      init_lora_weights=False))


STAGED_CASES = {   # name: (model builder, subset)
    "gpt2_tied": (lambda tok: tiny_model("gpt2", tok).double(), None),   # biases, LayerNorm params, tied head
    "llama_untied": (lambda tok: tiny_family("llama", tok, layers=2, dtype=torch.float64), None),
    "opt_flat": (lambda tok: tiny_family("opt", tok, layers=2, dtype=torch.float64), None),
    "llama_lora": (lambda tok: _lora(tiny_family("llama", tok, layers=2, dtype=torch.float64)), "trainable"),
    "gpt2_no_head": (lambda tok: tiny_model("gpt2", tok).double(), ["transformer.h.1", "transformer.wpe"]),
    "llama_head_only": (lambda tok: tiny_family("llama", tok, layers=2, dtype=torch.float64), ["lm_head"]),
}


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias (a third-party notice)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("case", list(STAGED_CASES))
def test_staged_token_map_equals_per_token_backward(tok, case, caplog):
    """The staged token map (ghost and auto) equals one backward per token, float64, at 1e-6 relative."""
    build, subset = STAGED_CASES[case]
    model = build(tok)
    pair = _pair_dict(tok, seed=3)
    pw, pl = brute_tokens(model, pair, list(select_parameters(model, subset).values()))
    for method in ("ghost", "auto"):
        caplog.clear()
        with caplog.at_level(logging.DEBUG, logger="entangle_sim.torch"):
            tg = token_gram(model, pair, subset=subset, method=method)
        assert took(caplog, "staged"), method
        assert tg.inner.shape == (6, 3)
        close(tg.inner, pw @ pl.T)
        close(tg.norm_w, pw.norm(dim=1))
        close(tg.norm_l, pl.norm(dim=1))


def _broken_stage_model(tok):
    """Block 1 adds the token embeddings (a module output of the bottom stage) to its output: a path
    that skips block 0, which the block-by-block backward does not follow."""
    model = tiny_model("gpt2", tok).double()
    store = {}
    model.transformer.wte.register_forward_hook(lambda m, a, o: store.__setitem__("e", o))
    blk = model.transformer.h[1]
    orig = blk.forward

    def fwd(hidden_states, *a, **k):
        out = orig(hidden_states, *a, **k)
        h = out[0] if isinstance(out, tuple) else out
        h = h + 0.5 * store["e"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    blk.forward = fwd
    return model


def test_broken_stage_structure_is_caught(tok, caplog):
    """Verification catches the skipped path: ghost raises, auto takes the one-shot map (which is right)."""
    model = _broken_stage_model(tok)
    pair = _pair_dict(tok, seed=4)
    with pytest.raises(ValueError, match="ghost method unsupported.*token by token"):
        token_gram(model, pair, method="ghost")
    with caplog.at_level(logging.DEBUG, logger="entangle_sim.torch"):
        tg = token_gram(model, pair, method="auto")
    assert took(caplog, "one-shot") and not took(caplog, "staged")
    pw, pl = brute_tokens(model, pair, list(model.parameters()))
    close(tg.inner, pw @ pl.T)


def _non_causal_model(tok):
    """Block 0 adds the mean over all positions to its output: a later token changes earlier log-probs."""
    model = tiny_model("gpt2", tok).double()
    blk = model.transformer.h[0]
    orig = blk.forward

    def fwd(hidden_states, *a, **k):
        out = orig(hidden_states, *a, **k)
        h = out[0] if isinstance(out, tuple) else out
        h = h + h.mean(1, keepdim=True)
        return (h, *out[1:]) if isinstance(out, tuple) else h

    blk.forward = fwd
    return model


def _length_dependent_model(tok):
    """Block 0 calls one more Linear on rows longer than 8 positions, added from position 8 on: causal
    (earlier log-probs do not change), but a cut row has another structure than the full row."""
    model = tiny_model("gpt2", tok).double()
    blk = model.transformer.h[0]
    d = model.config.n_embd
    torch.manual_seed(2)
    blk.extra = torch.nn.Linear(d, d).double()
    orig = blk.forward

    def fwd(hidden_states, *a, **k):
        out = orig(hidden_states, *a, **k)
        h = out[0] if isinstance(out, tuple) else out
        if h.shape[1] > 8:
            mask = (torch.arange(h.shape[1]) >= 8).to(h.dtype)[None, :, None]
            h = h + blk.extra(h) * mask
        return (h, *out[1:]) if isinstance(out, tuple) else h

    blk.forward = fwd
    return model


CUT_MODELS = {"non_causal": _non_causal_model, "length_dependent": _length_dependent_model}


@pytest.mark.parametrize("case,expected", [("gpt2_tied", [3, 2]), ("opt_flat", [3, 2]),
                                           ("non_causal", [1, 1]), ("length_dependent", [1, 2])])
def test_staged_token_map_causal_groups(tok, case, expected, monkeypatch):
    """Tokens in groups of 2, the first groups on the row cut after their last token (6 + 3 tokens:
    3 + 2 groups): the same map as one backward per token. A model that is not causal (its cut rows'
    log-probs differ) is not cut, nor a response whose cut rows call other modules than its full row (the
    verification runs on the full rows: a cut row must have their structure); both are right too."""
    from entangle_sim.torch import staged

    monkeypatch.setattr(staged, "TOKENS_PER_GROUP", 2)
    groups = []
    rows = staged.token_groups
    monkeypatch.setattr(staged, "token_groups", lambda *a: groups.append(len(rows(*a))) or rows(*a))
    model = CUT_MODELS[case](tok) if case in CUT_MODELS else STAGED_CASES[case][0](tok)
    pair = _pair_dict(tok, seed=5)
    pw, pl = brute_tokens(model, pair, list(model.parameters()))
    tg = token_gram(model, pair, method="ghost")
    assert groups == expected
    close(tg.inner, pw @ pl.T)
    close(tg.norm_w, pw.norm(dim=1))
    close(tg.norm_l, pl.norm(dim=1))


def _dense(e, K, shape):
    """[K, *shape] per-token gradients of a "rows" or "mat" entry, built term by term."""
    from entangle_sim.torch import staged

    _, L, R = staged.as_mat(e)
    if not L.is_floating_point():
        L = torch.nn.functional.one_hot(L, shape[0]).to(R.dtype)
    return torch.einsum("kta,ktb->kab", L, R)


@pytest.mark.parametrize("side", ["R", "L", "ids"])
def test_rows_entries_contract_like_dense_gradients(side):
    """The "rows" contraction (`cross`) and the rank-one verification product (`entry_directional`) equal
    the same sums over dense per-token gradients, float64 at 1e-6 relative (summation order only; observed ~1e-15):
    groups of several sizes and lengths, with a gap (a token in no group, g = 0) and two overlapping
    parts (their gradients add)."""
    from entangle_sim.torch import staged

    g = torch.Generator().manual_seed(0)
    rnd = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    a, b = 5, 4                                    # parameter [a, b]
    d_x, d_o = (b, a) if side == "R" else (a, b)   # shared factor X [T, d_x], per-token O [K_g, T_g, d_o]

    def entry(T, parts, K):
        X = torch.randint(0, a, (T,), generator=g) if side == "ids" else rnd(T, d_x)
        return ("rows", "R" if side == "R" else "L", X, tuple((k, rnd(n, t, d_o)) for k, n, t in parts), K)

    e1 = entry(7, [(0, 2, 4), (2, 3, 6), (5, 1, 7)], 7)    # token 6 in no part
    e2 = entry(6, [(0, 3, 3), (3, 2, 6), (3, 2, 5)], 5)    # two parts on tokens 3-4
    e1b = ("rows",) + e1[1:3] + (tuple((k, rnd(*O.shape)) for k, O in e1[3]), 7)
    G1, G2, G1b = (_dense(e, e[4], (a, b)) for e in (e1, e2, e1b))
    acc = torch.float64
    close(staged.cross(e1, e2, acc), torch.einsum("kab,lab->kl", G1, G2))
    close(staged.cross(e1, e1b, acc, diag=True), (G1 * G1b).sum((1, 2)))
    close(staged.cross(e2, e2, acc, diag=True), (G2 * G2).sum((1, 2)))
    # against a "mat" entry (a tied weight's head-like factors): the general path
    m = ("mat", rnd(5, 1, a), rnd(5, 1, b))
    close(staged.cross(e2, m, acc), torch.einsum("kab,lab->kl", G2, _dense(m, 5, (a, b))))
    u, w = rnd(a), rnd(b)
    close(staged.entry_directional(e1, (u, w)), torch.einsum("kab,a,b->k", G1, u, w))
    close(staged.entry_directional(e2, u[:, None] * w[None]), torch.einsum("kab,a,b->k", G2, u, w))
