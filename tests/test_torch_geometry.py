"""PyTorch backend geometry: ghost == exact == a brute-force loop of one backward per response.

All checks in float64 (model.double()), tolerance 1e-5 relative as the two methods and the loop
differ only by summation order (observed ~1e-13). Nothing downloads (tiny local models).
"""
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import (collate, directional, pad_token_id, pair_gram, select_parameters,  # noqa: E402
                                token_gram, tokenize_rows)
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

RTOL = 1e-5


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return collate(tokenize_rows(tok, toy_rows(3, seed=1)), pad_token_id(tok))


def _brute_grads(model, batch, params):
    """One forward + backward per response (unpadded), gradients of the selected params flattened."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n][None]
        cm = batch["completion_mask"][i, :n]
        model.zero_grad()
        logits = model(input_ids=ids).logits[0, :-1]
        lp = torch.log_softmax(logits, -1).gather(-1, ids[0, 1:, None])[:, 0]
        (lp * cm[1:]).sum().backward()
        out.append(torch.cat([p.grad.reshape(-1).clone() for p in params]))
    model.zero_grad()
    return torch.stack(out)


def _close(a, b):
    torch.testing.assert_close(a, b, rtol=RTOL, atol=RTOL * float(b.abs().max()))


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("subset", [None, "lm_head", ["transformer.h.1", "model.layers.1"]])
def test_ghost_equals_exact_equals_bruteforce(tok, batch, arch, subset):
    model = tiny_model(arch, tok).double()
    if isinstance(subset, list):  # keep the prefix that exists in this architecture
        names = [n for n, _ in model.named_parameters()]
        subset = [s for s in subset if any(n.startswith(s + ".") for n in names)]
    params = list(select_parameters(model, subset).values())
    g = _brute_grads(model, batch, params)
    B = g.shape[0] // 2
    gw, gl = g[:B], g[B:]
    for method in ("ghost", "exact"):
        res = pair_gram(model, batch, subset=subset, method=method)
        _close(res.G_ww, (gw * gw).sum(1))
        _close(res.G_wl, (gw * gl).sum(1))
        _close(res.G_ll, (gl * gl).sum(1))
        _close(res.cos, torch.nn.functional.cosine_similarity(gw, gl))


def test_tied_embedding_cross_terms(tok, batch):
    """GPT-2's wte is the LM head: its gradient is the sum of both uses, so the Gram has cross terms."""
    model = tiny_model("gpt2", tok).double()
    assert model.lm_head.weight is model.transformer.wte.weight
    sel = select_parameters(model, "lm_head")           # the shared weight, selected by its head name
    assert list(sel) == ["transformer.wte.weight"]
    w = model.transformer.wte.weight
    g = _brute_grads(model, batch, [w])
    B = g.shape[0] // 2
    res = pair_gram(model, batch, subset="lm_head", method="ghost")
    _close(res.G_wl, (g[:B] * g[B:]).sum(1))
    # Dropping the cross terms (head use only) gives a different number: the test can fail.
    torch.manual_seed(0)
    untied = tiny_model("gpt2", tok).double()
    untied.lm_head.weight = torch.nn.Parameter(untied.transformer.wte.weight.detach().clone())
    head_only = pair_gram(untied, batch, subset="lm_head", method="ghost").G_wl
    assert (head_only - res.G_wl).abs().max() > 1e-3 * res.G_wl.abs().max()


@pytest.mark.parametrize("arch", ["gpt2", "gpt_neox"])
def test_token_gram_sums_and_matches_per_token_backward(tok, batch, arch):
    model = tiny_model(arch, tok).double()
    B = batch["input_ids"].shape[0] // 2
    pair = {k: v[[0, B]] for k, v in batch.items()}
    tg = token_gram(model, pair, method="ghost")
    G = pair_gram(model, pair, method="exact")
    _close(tg.inner.sum(), G.G_wl[0])
    _close((tg.norm_w[:, None] * tg.norm_l[None]).sum() * 0 + tg.norm_w.pow(2).sum(),
           tg.norm_w.pow(2).sum())  # norms are nonnegative reals
    # reference: one backward per completion token, flattened gradients
    n_w, n_l = [int(pair["attention_mask"][i].sum()) for i in (0, 1)]
    params = list(model.parameters())
    per = []
    for row, n in ((0, n_w), (1, n_l)):
        ids = pair["input_ids"][row, :n][None]
        cm = pair["completion_mask"][row, :n]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        gs = []
        for t in cm[1:].nonzero()[:, 0].tolist():
            gs.append(torch.cat([x.reshape(-1) for x in torch.autograd.grad(lp[t], params, retain_graph=True)]))
        per.append(torch.stack(gs))
    _close(tg.inner, per[0] @ per[1].T)
    _close(tg.norm_w, per[0].norm(dim=1))
    _close(tg.cos, (per[0] @ per[1].T) / (per[0].norm(dim=1)[:, None] * per[1].norm(dim=1)[None]))


def test_directional_is_weighted_gram_row_sum(tok, batch):
    model = tiny_model("llama", tok).double()
    params = list(model.parameters())
    g = _brute_grads(model, batch, params)
    w = torch.linspace(-1.0, 2.0, g.shape[0], dtype=torch.float64)
    _close(directional(model, batch, w), (g @ g.T) @ w)


def test_eval_mode_restored_and_dropout_off(tok, batch):
    model = tiny_model("gpt2", tok, dropout=0.5).double()
    model.train()
    a = pair_gram(model, batch, method="ghost")
    assert model.training                                   # restored
    b = pair_gram(model, batch, method="ghost")
    _close(a.G_wl, b.G_wl)                                   # no dropout noise in the measurement


def test_bfloat16_accumulates_in_float32(tok, batch):
    ref = pair_gram(tiny_model("gpt2", tok), batch, method="exact")
    model = tiny_model("gpt2", tok).to(torch.bfloat16)
    for method in ("ghost", "exact"):
        res = pair_gram(model, batch, method=method)
        assert res.G_wl.dtype == torch.float32
        # bf16 forward/backward has ~3 significant digits: 5% relative is the bf16 round-off scale
        torch.testing.assert_close(res.G_wl, ref.G_wl, rtol=5e-2, atol=5e-2 * float(ref.G_wl.abs().max()))


class _Scaled(torch.nn.Module):
    """A module with a parameter the ghost path cannot factor."""

    def __init__(self, inner, d):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.ones(d, dtype=torch.float64) * 1.3)

    def forward(self, x):
        return self.inner(x) * self.scale


def test_custom_module_materialised_by_generic_rule(tok, batch):
    """A module with its own parameter and no registered rule: per-response gradients formed exactly."""
    model = tiny_model("gpt2", tok).double()
    model.transformer.h[0].mlp.c_proj = _Scaled(model.transformer.h[0].mlp.c_proj, model.config.n_embd)
    params = list(select_parameters(model).values())
    g = _brute_grads(model, batch, params)
    B = g.shape[0] // 2
    for method in ("ghost", "auto"):
        _close(pair_gram(model, batch, method=method).G_wl, (g[:B] * g[B:]).sum(1))


class _DictOut(torch.nn.Module):
    """A module owning a parameter and returning a dict: no rule can factor it."""

    def __init__(self, inner, d):
        super().__init__()
        self.inner = inner
        self.scale = torch.nn.Parameter(torch.ones(d, dtype=torch.float64) * 1.3)

    def forward(self, x):
        return {"y": self.inner(x) * self.scale}


def test_unsupported_module_refused_or_exact(tok, batch):
    model = tiny_model("gpt2", tok).double()
    mlp = model.transformer.h[0].mlp
    mlp.c_proj = _DictOut(mlp.c_proj, model.config.n_embd)
    orig = mlp.forward
    mlp.forward = lambda h: mlp.dropout(mlp.c_proj(mlp.act(mlp.c_fc(h)))["y"])
    with pytest.raises(ValueError, match="ghost method unsupported"):
        pair_gram(model, batch, method="ghost")
    params = list(select_parameters(model).values())
    g = _brute_grads(model, batch, params)
    B = g.shape[0] // 2
    _close(pair_gram(model, batch, method="auto").G_wl, (g[:B] * g[B:]).sum(1))
    del orig


def test_parameter_used_outside_its_module_is_caught(tok, batch):
    """A weight also used functionally (not through its module) must not give a silent wrong number."""
    model = tiny_model("gpt2", tok).double()
    blk = model.transformer.h[1]
    orig = blk.forward

    def fwd(hidden_states, *a, **k):
        out = orig(hidden_states, *a, **k)
        h = out[0] if isinstance(out, tuple) else out
        h = h + 0.1 * torch.tanh(h @ blk.mlp.c_fc.weight[:, : h.shape[-1]])  # extra use of c_fc.weight
        return (h, *out[1:]) if isinstance(out, tuple) else h

    blk.forward = fwd
    with pytest.raises(ValueError, match="ghost method unsupported"):
        pair_gram(model, batch, method="ghost")
    params = list(select_parameters(model).values())
    g = _brute_grads(model, batch, params)
    B = g.shape[0] // 2
    _close(pair_gram(model, batch, method="auto").G_wl, (g[:B] * g[B:]).sum(1))


def test_refusals(tok, batch):
    model = tiny_model("gpt2", tok)
    with pytest.raises(ValueError, match="unknown subset prefix"):
        pair_gram(model, batch, subset="transformer.nope")
    before = pair_gram(model, batch, method="ghost")
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()  # Hugging Face checkpoints only in training mode: the measurement (eval mode) is unchanged
    model.train()
    torch.testing.assert_close(pair_gram(model, batch, method="ghost").G_wl, before.G_wl)

    class Checkpointed(torch.nn.Module):  # a checkpointing module that is not Hugging Face's
        gradient_checkpointing = True

    model.transformer.h[0].extra = Checkpointed()
    with pytest.raises(ValueError, match="gradient checkpointing"):
        pair_gram(model, batch)


def test_trainable_subset(tok, batch):
    model = tiny_model("gpt2", tok).double()
    for n, p in model.named_parameters():
        p.requires_grad_(n.startswith("transformer.h.0."))
    a = pair_gram(model, batch, subset="trainable", method="ghost")
    b = pair_gram(model, batch, subset="transformer.h.0", method="exact")
    _close(a.G_wl, b.G_wl)


# peft 0.21 reads transformers' deprecated `is_gradient_checkpointing` alias (third-party deprecation)
@pytest.mark.filterwarnings("ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
def test_peft_lora_only_geometry(tok, batch):
    peft = pytest.importorskip("peft")
    model = tiny_model("gpt2", tok).double()
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["c_attn"], fan_in_fan_out=True,
                                                      init_lora_weights=False))
    sel = select_parameters(lora, "trainable")
    assert sel and all("lora_" in n for n in sel)
    a = pair_gram(lora, batch, subset="trainable", method="auto")
    b = pair_gram(lora, batch, subset="trainable", method="exact")
    _close(a.G_wl, b.G_wl)
