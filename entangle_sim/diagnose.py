"""SFT -> preference optimisation on the synthetic sentiment task, with gradient-geometry logging
(docs/theory.md §5, §6.3: Figures 3, 4a, 4b on a CPU-sized transformer).

Pipeline (`run_diagnose`):
  0. Pretraining (default; `pretrain_steps=0` skips it, the from-scratch recipe): a language model
     of the synthetic corpus of `entangle_sim.corpus`, in which the shared suffixes are frequent
     carrier phrases, so that before SFT the model already predicts them well, as the paper's
     pretrained GPT-2 small does for fluent text.
  1. SFT of a tiny decoder (policies.transformer) on "prompt -> label word" (paper: SFT on
     "{prompt} {label}", no suffix; `sft_with_suffix=True` also teaches the suffix), optax adam.
  2. Preference optimisation with a registered loss (`losses.get(cfg.loss).batch`), reference =
     the SFT parameters, frozen. Fresh preference pairs each step (suffix mode '1t' / 'short' / 'long').
  3. Every `log_every` PO steps (and at step 0), on a fixed eval set of pairs: mean chosen / rejected
     log-probs, per-pair Gram via `geometry.pair_gram` aggregated with `geometry.aggregate`
     (cos mean, rho mean-of-ratios and ratio-of-means, each labelled); at the end a token-level
     cosine map via `geometry.token_gram` for eval pair 0.
  4. Regimes: `regimes.classify` of the changes of the eval-set mean log-probs over consecutive
     logged intervals, and per PO step of the training batch's mean log-probs across the update.

>>> res = run_diagnose(DiagnoseConfig(suffix="long"))  # doctest: +SKIP
>>> res["summary"]["final_cosine"], res["summary"]["regime_fractions"]  # doctest: +SKIP
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import corpus, geometry, losses, regimes, sentiment, train
from .policies import transformer

SUFFIXES = sentiment.MODES


@dataclasses.dataclass(frozen=True)
class DiagnoseConfig:
    """One diagnose setting (frozen, hashable). Defaults: a ~100k-parameter 2-layer decoder, vocab 32,
    pretrained on the synthetic corpus, then SFT on "prompt -> label word" and DPO with Adam; one
    setting runs in about a minute on 2 CPU cores.

    loss_params: ((name, value), ...) hyperparameters for the loss (defaults of the registry otherwise).
    pretrain_steps: language-model steps on `corpus.sentences` before SFT (0: from scratch).
    sft_with_suffix: SFT also on the shared suffix; None (default) means "only when not pretrained"
    (the from-scratch recipe needs it, see below; the paper's SFT has no suffix).
    optimizer: the preference-optimisation optimizer ('adam' as in the paper's setting, or 'sgd').
    """

    suffix: str = "long"
    loss: str = "sigmoid"
    loss_params: tuple = ()
    sft_steps: int = 200
    po_steps: int = 200
    sft_lr: float = 1e-3
    po_lr: float = 1e-4
    sft_batch: int = 64
    po_batch: int = 32
    log_every: int = 10
    n_eval_pairs: int = 64
    seed: int = 0
    optimizer: str = "adam"
    pretrain_steps: int = 300
    pretrain_lr: float = 3e-3
    pretrain_batch: int = 64
    corpus: corpus.CorpusConfig = corpus.CorpusConfig()
    # SFT also on the shared suffix. In the paper the suffix is fluent text that GPT-2 already
    # assigns a reasonable probability; without pretraining our suffix is random tokens, which only
    # become "fluent" if SFT shows them (else PO spends its steps raising the suffix: chosen rises).
    sft_with_suffix: bool | None = None
    # transformer
    d_model: int = 64
    n_layers: int = 2
    n_heads: int = 4
    # synthetic task (vocab = 4 + n_pos + n_neg + n_neutral + n_suffix_vocab = 32)
    prompt_len: int = 8
    short_len: int = 4
    long_len: int = 16
    n_pos_words: int = 4
    n_neg_words: int = 4
    n_neutral: int = 8
    n_suffix_vocab: int = 12

    def __post_init__(self):
        if self.suffix not in SUFFIXES:
            raise ValueError(f"suffix must be one of {SUFFIXES}, got {self.suffix!r}")
        for name in ("po_steps", "log_every", "n_eval_pairs", "sft_batch", "po_batch"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ValueError(f"DiagnoseConfig.{name} must be a positive int, got {v!r}")
        for name in ("sft_steps", "pretrain_steps"):
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 0:
                raise ValueError(f"DiagnoseConfig.{name} must be an int >= 0, got {v!r}")
        if not (self.sft_lr > 0 and self.po_lr > 0 and self.pretrain_lr > 0):
            raise ValueError("learning rates must be > 0")
        if self.optimizer not in train.OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(train.OPTIMIZERS)}")
        if self.pretrain_batch < 1:
            raise ValueError(f"DiagnoseConfig.pretrain_batch must be >= 1, got {self.pretrain_batch!r}")

    @property
    def sft_on_suffix(self) -> bool:
        """Whether SFT shows the suffix (sft_with_suffix, or by default: only without pretraining)."""
        return self.pretrain_steps == 0 if self.sft_with_suffix is None else bool(self.sft_with_suffix)

    @property
    def sentiment(self) -> sentiment.SentimentConfig:
        return sentiment.SentimentConfig(
            mode=self.suffix, prompt_len=self.prompt_len, short_len=self.short_len, long_len=self.long_len,
            n_pos_words=self.n_pos_words, n_neg_words=self.n_neg_words, n_neutral=self.n_neutral,
            n_suffix_vocab=self.n_suffix_vocab)

    @property
    def transformer(self) -> transformer.TransformerConfig:
        s = self.sentiment
        max_len = s.prompt_len + 1 + max(s.short_len, s.long_len)
        return transformer.TransformerConfig(vocab=s.vocab_size, d_model=self.d_model, n_layers=self.n_layers,
                                             n_heads=self.n_heads, max_len=max_len)

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["loss_params"] = {k: v for k, v in self.loss_params}
        d["sft_with_suffix"] = self.sft_on_suffix
        return d


def _sft_batch_fn(cfg: DiagnoseConfig):
    scfg = cfg.sentiment if cfg.sft_on_suffix else dataclasses.replace(cfg.sentiment, mode="1t")

    def fn(key):
        d = sentiment.sft_data(scfg, key, cfg.sft_batch)
        return d.prompt, d.response, d.response_mask
    return fn


def run_diagnose(cfg: DiagnoseConfig, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Run SFT + preference optimisation and the geometry diagnostics.

    progress: optional callback called with the number of steps just completed (e.g. `tqdm.update`);
    total steps = pretrain_steps + sft_steps + po_steps.

    Returns a dict with
      'config'        cfg.to_dict()
      'steps'         [K] PO steps at which the eval set was logged (0, log_every, ..., po_steps)
      'chosen_logp', 'rejected_logp'   [K] eval-set mean summed log-probs
      'geometry'      {aggregate key: [K]} from geometry.aggregate (cos_mean, rho_*_mean_of_ratios,
                      rho_*_ratio_of_means, cos_ratio_of_means, case1_fraction, norms, ...)
      'interval_regimes' [K-1] int codes of consecutive logged intervals
      'step_regimes'  [po_steps] int codes per PO step (training batch, before vs after the update)
      'token_cos', 'token_inner'  [T_w, T_l] token-level Gram of eval pair 0 at the final params
      'chosen_tokens', 'rejected_tokens'  [T] token ids of that pair
      'pretrain_loss' [pretrain_steps] corpus token-mean NLL; 'sft_loss' [sft_steps] SFT token-mean NLL;
      'po_loss' [po_steps]
      'params', 'ref_params', 'eval_batch', 'policy'   for independent checks (not JSON)
      'summary'       JSON-ready dict (see `summarize`)
    """
    spec = losses.get(cfg.loss)
    hp = spec.resolve(**dict(cfg.loss_params))
    tcfg = cfg.transformer
    scfg = cfg.sentiment
    policy = transformer.make(tcfg)

    k_init, k_sft, k_po, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    k_pre = jax.random.fold_in(k_init, 1)   # a fifth stream, leaving the four above as they were
    params = policy.init(k_init)

    # ---------------------------------------------------------------- pretraining: LM of the corpus (`sft` loss)
    params, pre_losses = jax.jit(lambda p, k: corpus.pretrain(
        policy, p, scfg, cfg.corpus, k, steps=cfg.pretrain_steps, lr=cfg.pretrain_lr, batch=cfg.pretrain_batch))(
        params, k_pre)
    if progress is not None and cfg.pretrain_steps:
        progress(cfg.pretrain_steps)

    # ---------------------------------------------------------------- SFT: the trainer with the `sft` loss
    sft_batch = _sft_batch_fn(cfg)
    sft_train_step = train.make_sft_step(policy, "adam", cfg.sft_lr)

    @jax.jit
    def sft_step(carry, key):
        p, st = carry
        p, st, loss = sft_train_step(p, st, train.sft_pairs(*sft_batch(key)), key)
        return (p, st), loss

    sft_losses = []
    state = train.make_optimizer("adam", cfg.sft_lr).init(params)
    for i in range(cfg.sft_steps):
        (params, state), loss = sft_step((params, state), jax.random.fold_in(k_sft, i))
        sft_losses.append(loss)
        if progress is not None:
            progress(1)
    ref_params = params

    # ---------------------------------------------------------------- preference optimisation (the trainer)
    po_cfg = train.TrainConfig(loss=cfg.loss, loss_params=cfg.loss_params, optimizer=cfg.optimizer, lr=cfg.po_lr,
                               steps=1, record=False)
    po_train_step = train.make_step(policy, po_cfg, hp)

    @jax.jit
    def po_step(p, st, key):
        batch = sentiment.preference_pairs(scfg, key, cfg.po_batch)
        ref_w, ref_l = policy.logps(ref_params, batch)
        p, st, (lw, ll, _) = po_train_step(p, st, batch, (ref_w, ref_l), key)
        loss = spec.batch(lw, ll, ref_w, ref_l, batch.chosen_len, batch.rejected_len, **hp)
        lw2, ll2 = policy.logps(p, batch)
        code = regimes.classify(lw2.mean() - lw.mean(), ll2.mean() - ll.mean())
        return p, st, loss, code

    eval_batch = sentiment.preference_pairs(scfg, k_eval, cfg.n_eval_pairs)
    eval_logps = jax.jit(policy.logps)

    log_steps, mean_w, mean_l, geo = [], [], [], []

    def log(step, p):
        lw, ll = eval_logps(p, eval_batch)
        log_steps.append(step)
        mean_w.append(float(lw.mean()))
        mean_l.append(float(ll.mean()))
        geo.append(geometry.aggregate(geometry.pair_gram(policy.logps, p, eval_batch)))

    po_losses, step_codes = [], []
    state = train.make_optimizer(cfg.optimizer, cfg.po_lr).init(params)
    log(0, params)
    for i in range(cfg.po_steps):
        params, state, loss, code = po_step(params, state, jax.random.fold_in(k_po, i))
        po_losses.append(loss)
        step_codes.append(code)
        if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.po_steps:
            log(i + 1, params)
        if progress is not None:
            progress(1)

    ex = jax.tree.map(lambda a: a[0], eval_batch)
    tg = geometry.token_gram(policy.token_logps, params, ex)

    mean_w, mean_l = np.asarray(mean_w), np.asarray(mean_l)
    res = {
        "config": cfg.to_dict(),
        "steps": np.asarray(log_steps),
        "chosen_logp": mean_w,
        "rejected_logp": mean_l,
        "geometry": {k: np.asarray([g[k] for g in geo]) for k in geo[0]},
        "interval_regimes": np.asarray(regimes.classify(np.diff(mean_w), np.diff(mean_l))),
        "step_regimes": np.asarray(jnp.stack(step_codes)) if step_codes else np.zeros(0, int),
        "token_cos": np.asarray(tg.cos), "token_inner": np.asarray(tg.inner),
        "chosen_tokens": np.asarray(ex.chosen), "rejected_tokens": np.asarray(ex.rejected),
        "pretrain_loss": np.asarray(pre_losses),
        "sft_loss": np.asarray(jnp.stack(sft_losses)) if sft_losses else np.zeros(0),
        "po_loss": np.asarray(jnp.stack(po_losses)),
        "params": params, "ref_params": ref_params, "eval_batch": eval_batch, "policy": policy,
    }
    res["summary"] = summarize(res)
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of a `run_diagnose` result."""
    g = res["geometry"]
    tc = res["token_cos"]
    return {
        "config": res["config"],
        "steps": [int(s) for s in res["steps"]],
        "final_cosine": float(g["cos_mean"][-1]),
        "initial_cosine": float(g["cos_mean"][0]),
        "cos_trajectory": [float(c) for c in g["cos_mean"]],
        "cos_ratio_of_means_trajectory": [float(c) for c in g["cos_ratio_of_means"]],
        "rho_mean_of_ratios_trajectory": [float(c) for c in g["rho_mean_of_ratios"]],
        "rho_ratio_of_means_trajectory": [float(c) for c in g["rho_ratio_of_means"]],
        "final_geometry": {k: float(v[-1]) for k, v in g.items()},
        "chosen_logp_trajectory": [float(v) for v in res["chosen_logp"]],
        "rejected_logp_trajectory": [float(v) for v in res["rejected_logp"]],
        "delta_chosen": float(res["chosen_logp"][-1] - res["chosen_logp"][0]),
        "delta_rejected": float(res["rejected_logp"][-1] - res["rejected_logp"][0]),
        "regime_fractions": regimes.fractions(res["interval_regimes"]),
        "step_regime_fractions": regimes.fractions(res["step_regimes"]),
        "token_cos_contrastive": float(tc[0, 0]),
        "token_cos_shared_diag_mean": float(np.mean(np.diag(tc)[1:])) if min(tc.shape) > 1 else None,
        "final_sft_loss": float(res["sft_loss"][-1]) if len(res["sft_loss"]) else None,
        "final_pretrain_loss": float(res["pretrain_loss"][-1]) if len(res.get("pretrain_loss", ())) else None,
    }
