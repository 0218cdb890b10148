"""Synthetic sentiment task mirroring docs/theory.md §6.3 / §11 item 3: "prompt -> [pos | neg] + shared suffix(L)".

Vocabulary (ids):  0 PAD, 1 BOS, 2 'pos', 3 'neg' (the two response sentiment words), then
n_pos_words positive and n_neg_words negative prompt words, n_neutral neutral prompt words, and
n_suffix_vocab suffix words.
Prompt [P]: BOS followed by P - 1 words; each is a word of the latent label's polarity with
probability p_signal (at least one is forced), otherwise neutral.
Response: the label word alone ('1t') or followed by the suffix ('short' / 'long', lengths
short_len / long_len). The suffix is one fixed token sequence (drawn from suffix_seed), identical
in chosen and rejected and across the dataset; responses are right-padded to response_len if given.

>>> cfg = SentimentConfig(mode="short")
>>> pairs = preference_pairs(cfg, jax.random.key(0), 128)      # PairBatch
>>> pairs.chosen.shape[0]
128
"""
from __future__ import annotations

import dataclasses
from typing import NamedTuple

import jax
import jax.numpy as jnp

from .types import Array, PairBatch

PAD, BOS, POS, NEG = 0, 1, 2, 3
MODES = ("1t", "short", "long")


@dataclasses.dataclass(frozen=True)
class SentimentConfig:
    """Synthetic sentiment data (frozen, hashable). vocab_size feeds TransformerConfig.vocab."""

    mode: str = "long"
    prompt_len: int = 8
    short_len: int = 4
    long_len: int = 16
    n_pos_words: int = 8
    n_neg_words: int = 8
    n_neutral: int = 16
    n_suffix_vocab: int = 16
    p_signal: float = 0.5
    suffix_seed: int = 0
    response_len: int | None = None

    def __post_init__(self):
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        for name in ("prompt_len", "short_len", "long_len", "n_pos_words", "n_neg_words", "n_neutral",
                     "n_suffix_vocab"):
            v = getattr(self, name)
            if not isinstance(v, int) or v < 1:
                raise ValueError(f"SentimentConfig.{name} must be a positive int, got {v!r}")
        if self.prompt_len < 2:
            raise ValueError("prompt_len must be >= 2 (BOS + at least one word)")
        if not 0.0 <= self.p_signal <= 1.0:
            raise ValueError(f"p_signal must be in [0, 1], got {self.p_signal}")
        if self.response_len is not None and self.response_len < 1 + self.suffix_len:
            raise ValueError(f"response_len={self.response_len} < 1 + suffix_len={1 + self.suffix_len}")

    @property
    def suffix_len(self) -> int:
        return {"1t": 0, "short": self.short_len, "long": self.long_len}[self.mode]

    @property
    def T(self) -> int:
        """Response length in tokens (after padding)."""
        return self.response_len if self.response_len is not None else 1 + self.suffix_len

    @property
    def first_pos(self) -> int:
        return 4

    @property
    def first_neg(self) -> int:
        return 4 + self.n_pos_words

    @property
    def first_neutral(self) -> int:
        return self.first_neg + self.n_neg_words

    @property
    def first_suffix(self) -> int:
        return self.first_neutral + self.n_neutral

    @property
    def vocab_size(self) -> int:
        return self.first_suffix + self.n_suffix_vocab


class SFTData(NamedTuple):
    """SFT examples "prompt + correct label word [+ suffix]".

    prompt [N, P], response [N, T], response_mask [N, T], label [N] (1 = positive, 0 = negative).
    """

    prompt: Array
    response: Array
    response_mask: Array
    label: Array


def suffix(cfg: SentimentConfig) -> Array:
    """The shared suffix tokens [suffix_len] (fixed by suffix_seed, independent of the data key)."""
    return cfg.first_suffix + jax.random.randint(jax.random.key(cfg.suffix_seed), (cfg.suffix_len,), 0,
                                                 cfg.n_suffix_vocab)


def prompts(cfg: SentimentConfig, key: Array, n: int) -> tuple[Array, Array]:
    """(prompt [n, P] int32, label [n] int32 with 1 = positive) with a latent sentiment per prompt."""
    k_lab, k_sig, k_force, k_pol, k_neu = jax.random.split(key, 5)
    W = cfg.prompt_len - 1
    label = jax.random.bernoulli(k_lab, 0.5, (n,)).astype(jnp.int32)
    signal = jax.random.bernoulli(k_sig, cfg.p_signal, (n, W))
    # force at least one sentiment-bearing word so the label is always recoverable from the prompt
    signal = signal | (jnp.arange(W)[None, :] == jax.random.randint(k_force, (n, 1), 0, W))
    n_pol = jnp.where(label[:, None] == 1, cfg.n_pos_words, cfg.n_neg_words)
    pol_word = jnp.where(label[:, None] == 1, cfg.first_pos, cfg.first_neg) + \
        jax.random.randint(k_pol, (n, W), 0, 1 << 30) % n_pol
    neutral = cfg.first_neutral + jax.random.randint(k_neu, (n, W), 0, cfg.n_neutral)
    words = jnp.where(signal, pol_word, neutral)
    return jnp.concatenate([jnp.full((n, 1), BOS), words], axis=1).astype(jnp.int32), label


def _responses(cfg: SentimentConfig, first: Array) -> tuple[Array, Array]:
    n = first.shape[0]
    resp = jnp.concatenate([first[:, None], jnp.broadcast_to(suffix(cfg), (n, cfg.suffix_len))], axis=1)
    pad = cfg.T - resp.shape[1]
    mask = jnp.concatenate([jnp.ones((n, resp.shape[1])), jnp.zeros((n, pad))], axis=1)
    resp = jnp.concatenate([resp, jnp.full((n, pad), PAD)], axis=1).astype(jnp.int32)
    return resp, mask


def sft_data(cfg: SentimentConfig, key: Array, n: int) -> SFTData:
    """n SFT examples: prompt -> correct label word (+ suffix). Deterministic in key."""
    prompt, label = prompts(cfg, key, n)
    resp, mask = _responses(cfg, jnp.where(label == 1, POS, NEG))
    return SFTData(prompt, resp, mask, label)


def preference_pairs(cfg: SentimentConfig, key: Array, n: int) -> PairBatch:
    """n preference pairs: chosen = correct word + suffix, rejected = opposite word + the same suffix.

    Chosen and rejected differ only in their first token (the contrastive token of R15-R17).
    """
    prompt, label = prompts(cfg, key, n)
    chosen, mask = _responses(cfg, jnp.where(label == 1, POS, NEG))
    rejected, _ = _responses(cfg, jnp.where(label == 1, NEG, POS))
    return PairBatch(prompt, chosen, rejected, mask, mask)


def mode_batches(cfg: SentimentConfig, key: Array, n: int, mode: Array) -> tuple[PairBatch, SFTData]:
    """Preference pairs and SFT examples for a *traced* mode index (0 '1t', 1 'short', 2 'long'), so one
    compiled program serves the three datasets (vmap over the index). Responses are right-padded
    to 1 + long_len; padding has mask 0, and (causal model, right padding) changes no log-prob.
    For a given mode the pairs equal `preference_pairs(replace(cfg, mode=MODES[mode],
    response_len=1 + long_len), key, n)` and the SFT examples `sft_data(...)` with the same key."""
    T = 1 + cfg.long_len
    rows = []
    for m in MODES:
        sfx = suffix(dataclasses.replace(cfg, mode=m))
        rows.append(jnp.pad(sfx, (0, cfg.long_len - sfx.shape[0])))
    sfx = jnp.stack(rows)[mode]                                        # [long_len]
    length = jnp.array([1, 1 + cfg.short_len, 1 + cfg.long_len])[mode]
    mask = jnp.broadcast_to((jnp.arange(T) < length).astype(jnp.float32), (n, T))
    prompt, label = prompts(cfg, key, n)

    def resp(first):
        r = jnp.concatenate([first[:, None], jnp.broadcast_to(sfx, (n, cfg.long_len))], axis=1)
        return jnp.where(mask > 0, r, PAD).astype(jnp.int32)

    good, bad = resp(jnp.where(label == 1, POS, NEG)), resp(jnp.where(label == 1, NEG, POS))
    return PairBatch(prompt, good, bad, mask, mask), SFTData(prompt, good, mask, label)
