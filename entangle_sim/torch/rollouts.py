"""Group entanglement of GRPO rollouts on your own model: rows, tokenisation, measurement, prediction.

    rows = load_rollout_rows("groups.jsonl")        # prompt, completions (G), rewards (G)
    d = diagnose_rollouts(model, tok, rows, loss_type="grpo", eta=1e-6)
    d["rollouts"][0]["delta"], d["groups"][0]["effective_rank"], d["overall"]["frac_correct_fall"]

Per group (one prompt and its G completions, one micro-batch as TRL's GRPOTrainer would have it):
K [G, G] = <g_i, g_j> of the completions' summed log-prob gradients (`response_gram`: the same capture,
verification and fallback as every other measurement), TRL's rollout weights w (`group.predict`: the
advantages times each loss type's normaliser) and the first-order change delta = eta K w of every
completion's log-prob under one SGD step on that group's loss (derived in this project; docs/theory.md,
"Group entanglement").

Tokenisation (TRL 1.16 `GRPOTrainer._tokenize_prompts` and `_generate_and_score_completions`):
* the prompt: `tokenizer(text=prompt)` for a string; `apply_chat_template(prompt,
  add_generation_prompt=True)` for a message list (conversational);
* a completion is the generated token ids, appended to the prompt ids. Given as text they are
  re-tokenised: a string with `tokenizer(text=c, add_special_tokens=False)`, nothing added (TRL adds no
  EOS: the completion holds the EOS only if the model generated it, so write it in the text if it did);
  a message list as the tokens `apply_chat_template(prompt + completion)` adds after the generation
  prompt (the template's end-of-turn tokens included);
* completions are cut to `max_completion_length` tokens (TRL's generation limit).
The log-prob is at temperature 1 (TRL divides the logits by `temperature`; default 1.0).
"""
from __future__ import annotations

import math

import numpy as np
import torch

from .data import pad_token_id, read_rows, shared_prefix, token_ids
from .geometry import measuring, response_gram, response_logps

COLUMNS = ("prompt", "completions", "rewards")


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in x)


def load_rollout_rows(source, *, limit: int | None = None) -> list[dict]:
    """Rows (JSON list / JSONL path, or a list of dicts) with `prompt`, `completions` (G >= 2 strings or
    message lists) and `rewards` (G finite numbers), validated. Raises ValueError (one line)."""
    rows, where = read_rows(source)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where}: expected a list of objects with prompt, completions, rewards")
    if not rows:
        raise ValueError(f"{where}: no rows")
    rows = rows[:limit] if limit is not None else rows
    for i, r in enumerate(rows):
        missing = [k for k in COLUMNS if k not in r]
        if missing:
            raise ValueError(f"{where}: row {i} is missing column(s) {', '.join(missing)} "
                             "(GRPO rollout format: prompt, completions, rewards)")
        c, rw = r["completions"], r["rewards"]
        if not isinstance(c, list) or not isinstance(rw, list):
            raise ValueError(f"{where}: row {i}: completions and rewards must be lists (one entry per completion)")
        if len(c) != len(rw):
            raise ValueError(f"{where}: row {i}: {len(rw)} rewards for {len(c)} completions (one reward each)")
        if len(c) < 2:
            raise ValueError(f"{where}: row {i}: a group needs G >= 2 completions, got {len(c)}")
        if not all(isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x) for x in rw):
            raise ValueError(f"{where}: row {i}: rewards must be finite numbers, got {rw}")
        conv = _is_messages(r["prompt"])
        if not conv and not isinstance(r["prompt"], str):
            raise ValueError(f"{where}: row {i}: prompt must be a string or a list of messages")
        for j, x in enumerate(c):
            if not (_is_messages(x) if conv else isinstance(x, str)):
                raise ValueError(f"{where}: row {i}: completion {j} must be a "
                                 f"{'message list' if conv else 'string'} like the prompt")
    return rows


def tokenize_group(tokenizer, row: dict, *, max_completion_length: int | None = 512) -> dict:
    """{'prompt_ids': [P], 'completion_ids': [G lists]} as TRL 1.16's GRPOTrainer has them (module doc)."""
    if _is_messages(row["prompt"]):
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("conversational rows need a tokenizer with a chat template")
        kw = dict(row.get("chat_template_kwargs", {}))

        def tok(msgs, **extra):
            return token_ids(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **extra, **kw))

        prompt = tok(row["prompt"], add_generation_prompt=True)
        comps = []
        for c in row["completions"]:
            full = tok(row["prompt"] + c)
            comps.append(full[shared_prefix(prompt, full):])
    else:
        prompt = token_ids(tokenizer(text=row["prompt"]))
        comps = [token_ids(tokenizer(text=c, add_special_tokens=False)) for c in row["completions"]]
    if max_completion_length is not None:
        comps = [c[:max_completion_length] for c in comps]
    for j, c in enumerate(comps):
        if not c:
            raise ValueError(f"completion {j} tokenizes to zero tokens")
    return {"prompt_ids": prompt, "completion_ids": comps}


def collate_group(ex: dict, pad: int) -> dict[str, torch.Tensor]:
    """One group as a [G, S] right-padded batch (prompt + completion; completion_mask on the completion)."""
    P = list(ex["prompt_ids"])
    seqs = [P + list(c) for c in ex["completion_ids"]]
    S = max(len(s) for s in seqs)
    G = len(seqs)
    ids = torch.full((G, S), pad, dtype=torch.long)
    am = torch.zeros((G, S), dtype=torch.long)
    cm = torch.zeros((G, S), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, :len(s)] = torch.tensor(s)
        am[i, :len(s)] = 1
        cm[i, len(P):len(s)] = 1
    return {"input_ids": ids, "attention_mask": am, "completion_mask": cm}


def group_logps(model, batch) -> np.ndarray:
    """Summed completion log-probs [G] (float64 numpy), eval mode, outside autocast."""
    with measuring(model), torch.no_grad():
        return response_logps(model, batch["input_ids"], batch["attention_mask"],
                              batch["completion_mask"]).double().numpy()


def psd(K: torch.Tensor) -> np.ndarray:
    """The measured Gram as float64 numpy, symmetrised; for a float32 measurement, eigenvalues below 0 by
    no more than float32 rounding (1e-5 of the largest) are set to 0 (nearly parallel completions)."""
    dt = K.dtype
    K = K.double().numpy()
    K = 0.5 * (K + K.T)
    if dt != torch.float64:
        lam, V = np.linalg.eigh(K)
        if lam.min() < 0 and lam.min() >= -1e-5 * max(abs(lam).max(), 1e-300):
            K = (V * np.clip(lam, 0, None)) @ V.T
            K = 0.5 * (K + K.T)
    return K


def _weights_x64(fn):
    # TRL's weights are compared at 1e-6 in float64: compute them with JAX's float64 enabled (restored after)
    import jax

    old = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        return fn()
    finally:
        jax.config.update("jax_enable_x64", old)


def predict_group(loss_type: str, rewards, lens, K, eta: float, **params) -> dict:
    """`group.predict.predict` with float64 weights (see `_weights_x64`)."""
    from ..group.predict import predict

    return _weights_x64(lambda: predict(loss_type, rewards, lens, K, eta, **params))


def diagnose_rollouts(model, tokenizer, rows: list[dict], *, loss_type: str = "grpo", eta: float = 1.0,
                      params: dict | None = None, subset=None, method: str = "auto", progress=None) -> dict:
    """Measure every group's K and predict delta = eta K w (one SGD step on that group's loss).

    Returns {"rollouts": [per completion: group, index, reward, advantage, weight, length, logp, K_ii,
    delta, rises, regime], "groups": [per group: G, zero_variance, n_correct, n_correct_fall,
    frac_correct_fall, wKw, eigenvalues, effective_rank, gram], "overall": {...}, "dtype"}.
    `progress(1)` after each group.
    """
    from ..group import losses as gl

    gl.check_loss_type(loss_type)
    params = dict(params or {})
    p = gl.resolve(loss_type, **params)
    pad = pad_token_id(tokenizer)
    mcl = p.get("max_completion_length")
    rollouts, groups = [], []
    for gi, row in enumerate(rows):
        try:
            ex = tokenize_group(tokenizer, row, max_completion_length=mcl)
        except ValueError as e:
            raise ValueError(f"row {gi}: {e}") from None
        batch = collate_group(ex, pad)
        K = psd(response_gram(model, batch, subset=subset, method=method))
        lp = group_logps(model, batch)
        lens = [len(c) for c in ex["completion_ids"]]
        out = predict_group(loss_type, row["rewards"], lens, K, eta, **params)
        correct = [a > 0 for a in out["advantages"]]
        n_fall = sum(r == "correct_falls" for r in out["regimes"])
        groups.append({"group": gi, "G": len(lens), "zero_variance": bool(out["zero_variance"]),
                       "n_correct": int(sum(correct)), "n_correct_fall": int(n_fall),
                       "frac_correct_fall": (n_fall / sum(correct)) if any(correct) else None,
                       "wKw": out["wKw"], "eigenvalues": out["eigenvalues"],
                       "effective_rank": out["effective_rank"], "gram": K.tolist()})
        for i in range(len(lens)):
            rollouts.append({"group": gi, "index": i, "reward": float(row["rewards"][i]),
                             "advantage": out["advantages"][i], "weight": out["weights"][i], "length": lens[i],
                             "logp": float(lp[i]), "K_ii": float(K[i, i]), "delta": out["delta"][i],
                             "rises": out["rises"][i], "regime": out["regimes"][i]})
        if progress is not None:
            progress(1)
    return {"rollouts": rollouts, "groups": groups, "overall": overall(rollouts, groups),
            "params": {k: v for k, v in p.items()}}


def overall(rollouts: list[dict], groups: list[dict]) -> dict:
    """Totals over groups: fraction of correct rollouts predicted to fall, zero-variance groups, ranks."""
    n_correct = sum(g["n_correct"] for g in groups)
    n_fall = sum(g["n_correct_fall"] for g in groups)
    ranks = [g["effective_rank"] for g in groups if not g["zero_variance"]]
    regs: dict[str, int] = {}
    for r in rollouts:
        regs[r["regime"]] = regs.get(r["regime"], 0) + 1
    return {"n_groups": len(groups), "n_rollouts": len(rollouts), "n_correct": n_correct,
            "n_correct_fall": n_fall, "frac_correct_fall": (n_fall / n_correct) if n_correct else None,
            "n_zero_variance": sum(g["zero_variance"] for g in groups),
            "frac_zero_variance": sum(g["zero_variance"] for g in groups) / len(groups) if groups else None,
            "effective_rank_mean": float(np.mean(ranks)) if ranks else None,
            "effective_rank_median": float(np.median(ranks)) if ranks else None,
            "regime_counts": regs}
