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
PO_LR_UNITS = ("absolute", "per_gram")


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
    po_lr_unit: 'absolute' (po_lr is the rate) or 'per_gram' (the rate is po_lr / mean Gram diagonal
    of the reference model; see `reference_gram_diag`).
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
    # 'absolute': po_lr is the PO rate. 'per_gram': the rate is po_lr / Gbar, Gbar = the reference
    # model's mean Gram diagonal (|grad l_w|^2 + |grad l_l|^2) / 2 on a batch of long-suffix pairs, so
    # that lr x Gram, the size of the first-order step, is the same at every model size (SGD control).
    po_lr_unit: str = "absolute"
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
        if self.po_lr_unit not in PO_LR_UNITS:
            raise ValueError(f"po_lr_unit must be one of {PO_LR_UNITS}, got {self.po_lr_unit!r}")
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


def reference_gram_diag(policy, params, cfg: DiagnoseConfig, key) -> jax.Array:
    """Gbar = mean over cfg.po_batch long-suffix pairs of (|grad l_w|^2 + |grad l_l|^2) / 2 at params:
    the scale of the Gram entries that multiply the rate in a first-order step (the 'per_gram' unit)."""
    pairs = sentiment.preference_pairs(dataclasses.replace(cfg.sentiment, mode="long"), key, cfg.po_batch)
    g = geometry.pair_gram(policy.logps, params, pairs)
    return 0.5 * (g.G_ww + g.G_ll).mean()


def compose(policy, cfg: DiagnoseConfig, hp: dict, params, *, rates: dict, sft_keys, po_keys,
            sft_data: Callable, po_data: Callable, observe: Callable, record: bool = False, pretrain_key=None,
            gram_key=None, log: Callable | None = None, on_step: Callable | None = None) -> dict[str, Any]:
    """The pipeline pretrain -> SFT -> preference optimisation as one traceable function (jit- and
    vmap-able): what `run_diagnose` and the claim sweep (`claim_stats`) both run.

    params: initial parameters; pretraining (`corpus.pretrain`, cfg.pretrain_steps Adam steps) runs
    when pretrain_key is given, else params are taken as pretrained. rates: {'pretrain_lr', 'sft_lr',
    'po_lr'} (may be traced; the PO rate in cfg.po_lr_unit). sft_keys [S], po_keys [N]: one key per
    step. sft_data(key) -> PairBatch for the `sft` loss; po_data(key) -> preference PairBatch.
    observe(rec, batch, ref_logps, p_before, p_after) -> pytree: per PO step outputs, rec being the
    record of `train.make_step` (a Trajectory row when record=True, else (l_w, l_l, per-pair loss)).
    gram_key: where Gbar (`reference_gram_diag`) is measured at the reference (needed for 'per_gram').
    log(params) -> pytree: evaluated at the reference and after every PO step i with (i + 1) %
    cfg.log_every == 0 or i + 1 == N (a `lax.cond`: only those steps pay for it when not vmapped).
    on_step(i): host callback after PO step i (progress bars), via `jax.debug.callback`.

    Returns {'params', 'ref', 'pretrain_loss' [cfg.pretrain_steps or 0], 'sft_loss' [S], 'po' (stacked
    observe outputs [N, ...]), 'po_lr' (the rate used), 'gram_diag' (Gbar or nan), 'log0', 'logs' [N, ...]}.
    """
    out: dict[str, Any] = {}
    if pretrain_key is not None:
        params, out["pretrain_loss"] = corpus.pretrain(policy, params, cfg.sentiment, cfg.corpus, pretrain_key,
                                                       steps=cfg.pretrain_steps, lr=rates["pretrain_lr"],
                                                       batch=cfg.pretrain_batch)
    # SFT: the trainer's step with the `sft` loss; the rate is read from the optimizer state (may be traced)
    sft = train.make_sft_step(policy, "adam", 1.0)
    state = train.make_optimizer("adam", rates["sft_lr"]).init(params)
    if len(sft_keys):
        params, _, out["sft_loss"] = train.run(sft, params, state, sft_keys, sft_data)
    else:
        out["sft_loss"] = jnp.zeros((0,))
    ref = params
    out["ref"] = ref
    gbar = reference_gram_diag(policy, ref, cfg, gram_key) if gram_key is not None else jnp.nan
    if cfg.po_lr_unit == "per_gram" and gram_key is None:
        raise ValueError("po_lr_unit='per_gram' needs gram_key (where the reference Gram is measured)")
    lr = rates["po_lr"] / gbar if cfg.po_lr_unit == "per_gram" else rates["po_lr"]
    out["po_lr"], out["gram_diag"] = lr, gbar
    po = train.make_step(policy, train.TrainConfig(loss=cfg.loss, optimizer=cfg.optimizer, steps=1, record=record),
                         hp)
    n = len(po_keys)
    if log is not None:
        out["log0"] = log(ref)
        blank = jax.tree.map(jnp.zeros_like, out["log0"])

    def obs(c: train.RunStep):
        y = {"obs": observe(c.record, c.batch, c.reference, c.params_before, c.params_after)}
        if log is not None:
            y["log"] = jax.lax.cond(((c.i + 1) % cfg.log_every == 0) | (c.i + 1 == n), log, lambda _: blank,
                                    c.params_after)
        return y

    state = train.make_optimizer(cfg.optimizer, lr).init(params)
    params, _, ys = train.run(po, params, state, po_keys, po_data,
                              reference=lambda b: jax.lax.stop_gradient(policy.logps(ref, b)), observe=obs,
                              on_step=on_step)
    out["params"], out["po"] = params, ys["obs"]
    if log is not None:
        out["logs"] = ys["log"]
    return out


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
    scfg = cfg.sentiment
    policy = transformer.make(cfg.transformer)

    k_init, k_sft, k_po, k_eval = jax.random.split(jax.random.key(cfg.seed), 4)
    k_pre = jax.random.fold_in(k_init, 1)   # a fifth stream, leaving the four above as they were
    k_gram = jax.random.fold_in(k_init, 2)  # a sixth: where the 'per_gram' rate unit measures the Gram
    sft_batch = _sft_batch_fn(cfg)
    eval_batch = sentiment.preference_pairs(scfg, k_eval, cfg.n_eval_pairs)

    def observe(rec, batch, ref_logps, p0, p1):
        lw, ll, _ = rec
        loss = spec.batch(lw, ll, *ref_logps, batch.chosen_len, batch.rejected_len, **hp)
        lw2, ll2 = policy.logps(p1, batch)
        return loss, regimes.classify(lw2.mean() - lw.mean(), ll2.mean() - ll.mean())

    def log(p):
        lw, ll = policy.logps(p, eval_batch)
        return lw.mean(), ll.mean(), geometry.pair_gram(policy.logps, p, eval_batch)

    total = cfg.pretrain_steps + cfg.sft_steps + cfg.po_steps
    done = [0]

    def on_step(i):   # progress: pretraining and SFT are reported with the first PO step
        n = 1 + (cfg.pretrain_steps + cfg.sft_steps if int(i) == 0 else 0)
        done[0] += n
        progress(n)

    @jax.jit
    def pipeline(params):
        return compose(policy, cfg, hp, params, rates={"pretrain_lr": cfg.pretrain_lr, "sft_lr": cfg.sft_lr,
                                                       "po_lr": cfg.po_lr},
                       pretrain_key=k_pre, gram_key=k_gram if cfg.po_lr_unit == "per_gram" else None,
                       sft_keys=jax.vmap(lambda i: jax.random.fold_in(k_sft, i))(jnp.arange(cfg.sft_steps)),
                       po_keys=jax.vmap(lambda i: jax.random.fold_in(k_po, i))(jnp.arange(cfg.po_steps)),
                       sft_data=lambda k: train.sft_pairs(*sft_batch(k)),
                       po_data=lambda k: sentiment.preference_pairs(scfg, k, cfg.po_batch),
                       observe=observe, log=log, on_step=on_step if progress is not None else None)

    r = jax.block_until_ready(pipeline(policy.init(k_init)))
    if progress is not None and done[0] < total:   # (no PO step reported, e.g. on_step not reached)
        progress(total - done[0])
    params, ref_params = r["params"], r["ref"]
    pre_losses, sft_losses = r["pretrain_loss"], r["sft_loss"]
    po_losses, step_codes = r["po"]
    logged = [i for i in range(cfg.po_steps) if (i + 1) % cfg.log_every == 0 or i + 1 == cfg.po_steps]
    log_steps = [0] + [i + 1 for i in logged]
    w0, l0, g0 = r["log0"]
    ws, ls, gs = r["logs"]
    mean_w = [float(w0)] + [float(ws[i]) for i in logged]
    mean_l = [float(l0)] + [float(ls[i]) for i in logged]
    geo = [geometry.aggregate(g0)] + [geometry.aggregate(jax.tree.map(lambda a, i=i: a[i], gs)) for i in logged]

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
        "step_regimes": np.asarray(step_codes),
        "token_cos": np.asarray(tg.cos), "token_inner": np.asarray(tg.inner),
        "chosen_tokens": np.asarray(ex.chosen), "rejected_tokens": np.asarray(ex.rejected),
        "pretrain_loss": np.asarray(pre_losses),
        "sft_loss": np.asarray(sft_losses),
        "po_loss": np.asarray(po_losses),
        "params": params, "ref_params": ref_params, "eval_batch": eval_batch, "policy": policy,
    }
    res["summary"] = summarize(res)
    return res


def summarize(res: dict[str, Any]) -> dict[str, Any]:
    """JSON-ready summary of a `run_diagnose` result: the one run-summary schema (`regimes.RUN_SUMMARY`;
    changes = the eval-set mean log-probs between consecutive logged steps, no first-order prediction,
    final_loss = the last PO step's training-batch loss) plus the keys below (delta_chosen/_rejected
    are the CLI's names of mean_delta_chosen/_rejected)."""
    g = res["geometry"]
    tc = res["token_cos"]
    w, l, po_loss = np.asarray(res["chosen_logp"]), np.asarray(res["rejected_logp"]), np.asarray(res["po_loss"])
    core = regimes.run_summary(w[:-1, None], l[:-1, None], np.diff(w)[:, None], np.diff(l)[:, None],
                               final=(w[-1:], l[-1:]), loss=po_loss.reshape(len(po_loss), -1) if po_loss.size else None)
    return {
        **core,
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
        "delta_chosen": core["mean_delta_chosen"],
        "delta_rejected": core["mean_delta_rejected"],
        "step_regime_fractions": regimes.fractions(res["step_regimes"]),
        "token_cos_contrastive": float(tc[0, 0]),
        "token_cos_shared_diag_mean": float(np.mean(np.diag(tc)[1:])) if min(tc.shape) > 1 else None,
        "final_sft_loss": float(res["sft_loss"][-1]) if len(res["sft_loss"]) else None,
        "final_pretrain_loss": float(res["pretrain_loss"][-1]) if len(res.get("pretrain_loss", ())) else None,
    }
