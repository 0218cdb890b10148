"""PyTorch / Hugging Face backend: gradient entanglement of your own causal LM, data and TRL run.

    from entangle_sim.torch import pair_gram, token_gram, load_preference_rows, tokenize_rows, collate
    rows = load_preference_rows("pairs.jsonl")                  # TRL format: prompt/chosen/rejected
    batch = collate(tokenize_rows(tok, rows), pad_token_id(tok))  # tokenised exactly as TRL's DPOTrainer
    g = pair_gram(model, batch)                                  # G_ww, G_wl, G_ll, cos, rho_w, rho_l, rho [B]
    t = token_gram(model, {k: v[[0, len(rows)]] for k, v in batch.items()})   # [T_w, T_l] token map
    G = response_gram(model, grpo_batch, groups=8)               # [n_groups, 8, 8] Gram within groups
    s = MeasurementSession(model, pad_token_id=pad)              # what diagnose-model and the callback use

`EntanglementCallback` logs the same quantities inside `trl.DPOTrainer`. Needs the `[torch]` extra.
"""
try:
    import torch as _torch  # noqa: F401
    import transformers as _transformers  # noqa: F401
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError('the PyTorch backend needs the extra: pip install "entangle_sim[torch]"') from e

from .data import collate, is_conversational, load_preference_rows, pad_token_id, tokenize_row, tokenize_rows
from .capture import param_group
from .geometry import (PairGram, TokenGram, directional, gram_stats, pair_gram, response_gram, response_logps,
                       select_parameters, token_gram)
from .measure import batch_prediction, measure_pairs
from .rules import Unsupported, register
from .session import MeasurementSession

__all__ = ["PairGram", "TokenGram", "pair_gram", "token_gram", "directional", "gram_stats", "response_logps",
           "select_parameters", "load_preference_rows", "tokenize_row", "tokenize_rows", "collate",
           "pad_token_id", "is_conversational", "measure_pairs", "batch_prediction", "EntanglementCallback",
           "response_gram", "param_group", "MeasurementSession", "Unsupported", "register"]


def __getattr__(name):
    if name == "EntanglementCallback":  # imports transformers' Trainer machinery: load on first use
        from .callback import EntanglementCallback
        return EntanglementCallback
    raise AttributeError(f"module 'entangle_sim.torch' has no attribute {name!r}")
