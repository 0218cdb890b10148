"""A small synthetic language for pretraining the tiny transformer before SFT and preference optimisation.

Why: for its Figures 3 and 4 the paper fine-tunes a *pretrained* GPT-2 small (paper), for which a
shared suffix of a preference pair is fluent text it already predicts well (this project's reading). A
model trained from scratch sees the suffix only during SFT or preference optimisation, so the
suffix is improbable and the optimiser spends its steps raising it. Pretraining on this corpus gives
the tiny model the same starting point: high probability on the carrier phrases, before SFT.

Grammar (one sentence; the vocabulary is the sentiment task's, `sentiment.SentimentConfig`):

    sentence  = BOS clause SENT phrase
    clause    = prompt_len - 1 words, each of the clause's polarity with prob p_signal, else neutral
    SENT      = 'pos' / 'neg': agrees with the clause's polarity with prob p_label_agree
    phrase    = one carrier phrase; phrase 0 is the 'long' shared suffix, phrase 1 the 'short' one,
                phrases 2.. are other fixed phrases of the suffix vocabulary; phrase k is drawn
                with probability proportional to 1 / (k + 1); each of its tokens is replaced by a
                random suffix word with prob p_noise (so a phrase is likely, never certain)

As a training example: prompt = [BOS] (one token), response = the rest, right-padded to
prompt_len - 1 + 1 + long_len with mask 0 on the padding. Every token of the response is predicted
(a language model of the whole sentence), at the absolute positions the preference data use later.

>>> from entangle_sim import sentiment
>>> s = sentiment.SentimentConfig(mode="long", long_len=6)
>>> batch = sentences(s, CorpusConfig(), jax.random.key(0), 8)
>>> batch.chosen.shape, int(batch.prompt[0, 0]) == sentiment.BOS
((8, 14), True)
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from . import sentiment, train
from . import validate as _v
from .types import Array, PairBatch, Policy, PyTree


@dataclasses.dataclass(frozen=True)
class CorpusConfig:
    """The pretraining corpus (frozen, hashable). Defaults: derived in this project, chosen so that
    after pretraining the shared suffixes are predicted well (per-token log-prob close to log(1 -
    p_noise)) while the label word stays uncertain (p_label_agree = 0.5: the mapping from a prompt to
    its sentiment word is what SFT teaches, as in the paper's SFT on "{prompt} {label}")."""

    n_phrases: int = 6
    p_label_agree: float = 0.5
    p_noise: float = 0.05
    phrase_seed: int = 1

    def __post_init__(self):
        _v.integer("n_phrases", self.n_phrases, lo=2)
        _v.real("p_label_agree", self.p_label_agree, lo=0, hi=1)
        _v.real("p_noise", self.p_noise, lo=0, hi=1)


def phrases(scfg: sentiment.SentimentConfig, ccfg: CorpusConfig) -> tuple[Array, Array]:
    """(phrases [n_phrases, long_len] int32, lengths [n_phrases]): phrase 0 = the 'long' shared suffix,
    phrase 1 = the 'short' one (right-padded with PAD), then fixed random phrases of lengths in
    [short_len, long_len]."""
    L = scfg.long_len
    long = sentiment.suffix(dataclasses.replace(scfg, mode="long"))
    short = sentiment.suffix(dataclasses.replace(scfg, mode="short"))
    k_len, k_tok = jax.random.split(jax.random.key(ccfg.phrase_seed))
    n_extra = ccfg.n_phrases - 2
    lo, hi = min(scfg.short_len, L), L
    extra_len = jax.random.randint(k_len, (n_extra,), lo, hi + 1)
    extra = scfg.first_suffix + jax.random.randint(k_tok, (n_extra, L), 0, scfg.n_suffix_vocab)
    rows = jnp.concatenate([long[None, :L], jnp.pad(short[:L], (0, L - min(scfg.short_len, L)))[None], extra])
    lengths = jnp.concatenate([jnp.array([L, min(scfg.short_len, L)]), extra_len])
    rows = jnp.where(jnp.arange(L)[None, :] < lengths[:, None], rows, sentiment.PAD)
    return rows.astype(jnp.int32), lengths.astype(jnp.int32)


def sentences(scfg: sentiment.SentimentConfig, ccfg: CorpusConfig, key: Array, n: int) -> PairBatch:
    """n corpus sentences as a PairBatch for the `sft` loss (chosen = rejected = the sentence after
    BOS; prompt [n, 1] = BOS; response [n, prompt_len + long_len] with its mask). Deterministic in key."""
    k_prompt, k_agree, k_phrase, k_noise, k_tok = jax.random.split(key, 5)
    prompt, polarity = sentiment.prompts(scfg, k_prompt, n)
    agree = jax.random.bernoulli(k_agree, ccfg.p_label_agree, (n,))
    sent = jnp.where(agree == (polarity == 1), sentiment.POS, sentiment.NEG)
    rows, lengths = phrases(scfg, ccfg)
    logits = -jnp.log1p(jnp.arange(ccfg.n_phrases, dtype=jnp.float32))     # p_k proportional to 1/(k+1)
    k = jax.random.categorical(k_phrase, logits, shape=(n,))
    phrase, plen = rows[k], lengths[k]
    L = scfg.long_len
    noise = jax.random.bernoulli(k_noise, ccfg.p_noise, (n, L))
    random_word = scfg.first_suffix + jax.random.randint(k_tok, (n, L), 0, scfg.n_suffix_vocab)
    inside = jnp.arange(L)[None, :] < plen[:, None]
    phrase = jnp.where(inside & noise, random_word, phrase)
    response = jnp.concatenate([prompt[:, 1:], sent[:, None], phrase], axis=1).astype(jnp.int32)
    mask = jnp.concatenate([jnp.ones((n, scfg.prompt_len)), inside.astype(jnp.float32)], axis=1)
    bos = prompt[:, :1]
    return PairBatch(bos, response, response, mask, mask)


def pretrain(policy: Policy, params: PyTree, scfg: sentiment.SentimentConfig, ccfg: CorpusConfig, key: Array, *,
             steps: int, lr: float = 3e-3, batch: int = 64) -> tuple[PyTree, Array]:
    """`steps` Adam steps of the language model on fresh corpus sentences (the trainer's step with the
    `sft` loss: token-mean NLL of the batch), as one `lax.scan`; jit- and vmap-able (over key, params).

    Returns (params, losses [steps], each the batch loss before its step). steps=0 returns params.
    """
    if steps == 0:
        return params, jnp.zeros((0,))
    step = train.make_sft_step(policy, "adam", 1.0)   # the step applies the rate of its state (lr may be traced)

    state = train.make_optimizer("adam", lr).init(params)
    params, _, losses = train.run(step, params, state, jax.random.split(key, steps),
                                  lambda k: sentences(scfg, ccfg, k, batch))
    return params, losses
