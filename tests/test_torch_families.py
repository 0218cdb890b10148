"""Every decoder-only family that builds tiny from the installed transformers, against a brute force.

For each family (`entangle_sim.torch.tiny.FAMILIES`: 1 layer, width 16, float64, random init, eager
attention and eager expert loops) and 2 pairs of the toy data, the per-pair Gram (methods exact, ghost,
auto), the batch-level prediction (exact, ghost) and, with LoRA adapters on every linear layer, the
Gram of the trainable subset (ghost; auto on LoRA in test_torch_geometry), all equal the brute force: one ordinary autograd backward per response,
unpadded, gradients flattened; and the token map (auto, which must take the staged path) equals one
backward per completion token, also in token groups of 2 (the chosen response's first group on
its cut row). Tolerance 1e-6 relative to the largest entry: the methods differ from
the brute force only by summation order (observed <= 3e-11; GPT-J, CodeGen and GPT-Neo compute their
rotary / attention scaling tables in float32 inside the float64 model, Cohere and the MoE routers
compute in float32 too, and both sides go through the same float32 operations).
"""
import logging

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import (collate, directional, pad_token_id, pair_gram, select_parameters,  # noqa: E402
                                token_gram, tokenize_rows)
from entangle_sim.torch.tiny import FAMILIES, tiny_family, tiny_tokenizer, toy_rows  # noqa: E402

RTOL = 1e-6
# GPT-Neo casts query and key to float32 for its attention scores inside the float64 model, so the
# batched (padded) forward and the brute force's unpadded one differ by float32 round-off (~1e-7 in the
# activations); the small LoRA-only Gram entries show it at 1.5e-6 relative. 1e-5 for that family.
# The MoE families compute their router's softmax in float32 (`softmax(..., dtype=torch.float)`), so the
# routing weights of the batched forward and of the unpadded brute force differ by float32 round-off too
# (verification saw 1.4e-6 relative on Qwen3-MoE): 1e-5 for them as well.
RTOL_FLOAT32_INSIDE = {"gpt_neo": 1e-5, "mixtral": 1e-5, "qwen2_moe": 1e-5, "qwen3_moe": 1e-5, "olmoe": 1e-5}


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def batch(tok):
    return collate(tokenize_rows(tok, toy_rows(2, seed=1)), pad_token_id(tok))


def brute_grads(model, batch, params):
    """[2B, |params|]: one forward + backward per response on its unpadded tokens."""
    out = []
    for i in range(batch["input_ids"].shape[0]):
        n = int(batch["attention_mask"][i].sum())
        ids = batch["input_ids"][i, :n][None]
        cm = batch["completion_mask"][i, :n]
        lp = torch.log_softmax(model(input_ids=ids).logits[0, :-1], -1).gather(-1, ids[0, 1:, None])[:, 0]
        gs = torch.autograd.grad((lp * cm[1:]).sum(), params, allow_unused=True)
        out.append(torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for p, g in zip(params, gs)]))
    return torch.stack(out)


# one pair for the token maps: prompt 3 tokens, chosen 3, rejected 2 (the rejected row padded)
PAIR = {"prompt_ids": [9, 12, 15], "chosen_ids": [20, 8, 11], "rejected_ids": [14, 30]}


def brute_token_grads(model, pair, params):
    """Per-token gradients ([T, |params|] per response): one backward per completion token, unpadded."""
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


def close(a, b, what):
    err = float((a - b).abs().max() / b.abs().max())
    tol = RTOL_FLOAT32_INSIDE.get(what.split()[0], RTOL)
    assert err <= tol, f"{what}: relative error {err:.2g}"


def check_gram(model, batch, subset, methods, what):
    params = list(select_parameters(model, subset).values())
    g = brute_grads(model, batch, params)
    B = g.shape[0] // 2
    gw, gl = g[:B], g[B:]
    for method in methods:
        res = pair_gram(model, batch, subset=subset, method=method)
        close(res.G_ww, (gw * gw).sum(1), f"{what} {method} G_ww")
        close(res.G_wl, (gw * gl).sum(1), f"{what} {method} G_wl")
        close(res.G_ll, (gl * gl).sum(1), f"{what} {method} G_ll")
    return g


# peft: fan_in_fan_out notices for Conv1D families; peft 0.21 reads transformers' deprecated
# `is_gradient_checkpointing` alias (third-party notices)
@pytest.mark.filterwarnings("ignore::UserWarning", "ignore:`is_gradient_checkpointing` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", FAMILIES)
def test_family_all_methods(tok, batch, family, caplog, monkeypatch):
    model = tiny_family(family, tok, dtype=torch.float64)
    g = check_gram(model, batch, None, ("exact", "ghost", "auto"), family)
    w = torch.linspace(-1.0, 2.0, g.shape[0], dtype=torch.float64)
    for method in ("exact", "ghost"):  # the batch-level prediction honours the method
        close(directional(model, batch, w, method=method), (g @ g.T) @ w, f"{family} directional {method}")
    # the token map (auto): the staged path (one row at a time, block by block) on every family
    caplog.clear()
    with caplog.at_level(logging.DEBUG, logger="entangle_sim.torch"):
        tg = token_gram(model, PAIR, method="auto")
    assert any(r.getMessage() == "entangle_sim token_gram: staged" for r in caplog.records), family
    pw, pl = brute_token_grads(model, PAIR, list(select_parameters(model).values()))
    close(tg.inner, pw @ pl.T, f"{family} token map")
    close(tg.norm_w, pw.norm(dim=1), f"{family} token norms")
    # and in token groups of 2: the chosen response's first group on its cut row, merged with the last
    from entangle_sim.torch import staged

    monkeypatch.setattr(staged, "TOKENS_PER_GROUP", 2)
    groups, rows = [], staged.token_groups

    def counted(*a):
        out = rows(*a)
        groups.append(len(out))
        return out

    monkeypatch.setattr(staged, "token_groups", counted)
    tg = token_gram(model, PAIR, method="ghost")
    assert groups == [2, 1], (family, groups)
    close(tg.inner, pw @ pl.T, f"{family} token map in groups")
    close(tg.norm_w, pw.norm(dim=1), f"{family} token norms in groups")
    close(tg.norm_l, pl.norm(dim=1), f"{family} token norms in groups")
    monkeypatch.undo()
    peft = pytest.importorskip("peft")
    torch.manual_seed(1)
    from transformers.pytorch_utils import Conv1D

    targets = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                      if isinstance(m, (torch.nn.Linear, Conv1D)) and "lm_head" not in n and "embed_out" not in n})
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=targets, init_lora_weights=False))
    sel = select_parameters(lora, "trainable")
    assert sel and all("lora_" in n for n in sel)
    check_gram(lora, batch, "trainable", ("ghost",), f"{family} LoRA")
