"""Compiled trainer: any registered loss x any policy x any optax optimizer, one `lax.scan` per run,
`vmap` over runs, sharded over devices when several are present.

At every step and for every pair it records what the theory predicted and what happened:

    chosen_logps, rejected_logps, margin, loss            state before the step      [S, B]
    G_ww, G_wl, G_ll                                       per-pair Gram (R3)         [S, B]
    d_w, d_l                                               incentives, symbolic engine [S, B]
    regime_pred                                            one-pair SGD regime (R4/R9) [S, B] int
    pred_chosen, pred_rejected  one-pair SGD prediction eta/b (d_w G_ww - d_l G_wl), ...  [S, B]
    batch_chosen, batch_rejected  first order of a plain SGD step on the whole batch at the same
                                rate, -lr J grad L (the 2B x 2B Gram: one-pair terms + cross-pair terms)
    lin_chosen, lin_rejected    first order of the actual update: J dtheta (any optimizer, batch)
    real_chosen, real_rejected  realised change l(theta_{t+1}) - l(theta_t)

`pred_*` is the per-pair theory of docs/theory.md §3-4 (the symbolic engine at that state); `lin_*` is the
exact first-order change of the real update, which includes cross-pair terms and the optimizer's
preconditioning; the gap between them is what `entangle_sim.mitigations` studies. The reference model is the initial
policy (r = 0 at step 0), as in DPO.

`make_step` is the only training step of the package: SFT is a run with the `sft` loss, and every
mitigation is a `StepPlugin` of it (token weights on the token log-probs, extra loss terms, an
update transformation such as per-pair normalisation, extra trained state, its own records).

Example:
    >>> import jax
    >>> from entangle_sim import train, data
    >>> gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 8, K=6, target_cos=0.9, norm_ratio=2.0)
    >>> cfg = train.TrainConfig(loss="sigmoid", optimizer="sgd", lr=0.05, steps=50)
    >>> traj = train.train(gp.policy(), gp.params, gp.batch, cfg, jax.random.PRNGKey(1))
    >>> fractions = train.summarize(traj)["regime_fractions"]
    >>> fractions["both_down"] > 0.5   # R7: rejected norm dominates
    True
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.flatten_util import ravel_pytree

from . import geometry, losses, regimes
from . import validate as _v
from .step import StepContext, StepPlugin  # noqa: F401 - the hooks of make_step (re-exported)
from .types import Array, PairBatch, PairState, Policy, PyTree

OPTIMIZERS = ("sgd", "momentum", "adam", "adamw")


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """A training run. Frozen and hashable (a static jit argument).

    loss_params: tuple of (name, value) hyperparameters for the loss (defaults otherwise).
    batch_size: pairs per step; 0 means the full batch. record: per-pair Gram and predictions
    every step (one Jacobian per step); False keeps only log-probs and losses (fast sweeps).
    """

    loss: str = "sigmoid"
    loss_params: tuple = ()
    optimizer: str = "sgd"
    lr: float = 0.1
    steps: int = 100
    batch_size: int = 0
    momentum: float = 0.9
    weight_decay: float = 1e-2
    record: bool = True

    def __post_init__(self):
        # the loss's one validation (`LossSpec.bind`): unknown loss -> ValueError with a suggestion;
        # bad or unknown hyperparameters -> ValueError; kept as `resolved`
        object.__setattr__(self, "_resolved", losses.get(self.loss).bind(**dict(self.loss_params)))
        if self.optimizer not in OPTIMIZERS:
            raise ValueError(f"unknown optimizer {self.optimizer!r}; valid: {', '.join(OPTIMIZERS)}")
        _v.integer("steps", self.steps, lo=1)
        _v.real("lr", self.lr, lo=0, lo_open=True)
        _v.integer("batch_size (0 = full batch)", self.batch_size, lo=0)
        _v.real("momentum", self.momentum, lo=0, hi=1)
        _v.real("weight_decay", self.weight_decay, lo=0)

    @property
    def resolved(self) -> losses.ResolvedLoss:
        """The loss with its hyperparameters, resolved once (`losses.get(loss).bind(**loss_params)`)."""
        return self._resolved

    @property
    def hp(self) -> dict[str, Any]:
        return self.resolved.hp


class Trajectory(NamedTuple):
    """Per-step, per-pair records ([S, B]; a leading [R] axis for vmapped runs). See module doc."""

    chosen_logps: Array
    rejected_logps: Array
    margin: Array
    loss: Array
    G_ww: Array
    G_wl: Array
    G_ll: Array
    d_w: Array
    d_l: Array
    regime_pred: Array
    pred_chosen: Array
    pred_rejected: Array
    lin_chosen: Array
    lin_rejected: Array
    real_chosen: Array
    real_rejected: Array
    # Added later than the fields above; the default keeps records cached before it loadable.
    batch_chosen: Array | None = None
    batch_rejected: Array | None = None


def make_optimizer(name: str, lr, *, momentum: float = 0.9, weight_decay: float = 1e-2):
    """optax optimizer with an injectable (traceable, vmappable) learning rate."""
    if name == "sgd":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr)
    if name == "momentum":
        return optax.inject_hyperparams(optax.sgd)(learning_rate=lr, momentum=momentum)
    if name == "adam":
        return optax.inject_hyperparams(optax.adam)(learning_rate=lr)
    if name == "adamw":
        return optax.inject_hyperparams(optax.adamw)(learning_rate=lr, weight_decay=weight_decay)
    raise ValueError(f"unknown optimizer {name!r}; valid: {', '.join(OPTIMIZERS)}")


def _same(v, fixed) -> bool:
    if isinstance(v, str) or isinstance(fixed, str):
        return v == fixed
    try:
        return float(v) == float(fixed)
    except (TypeError, jax.errors.ConcretizationTypeError):
        raise ValueError("a traced value for a hyperparameter that selects the formula; "
                         "configure it in the TrainConfig") from None


def with_hp(loss: losses.ResolvedLoss, hp: dict | None) -> losses.ResolvedLoss:
    """`loss` with the numeric hyperparameters of `hp` (may be traced, e.g. a vmapped beta); the
    formula-selecting ones in `hp` must equal the loss's own (ValueError otherwise)."""
    if not hp:
        return loss
    fixed = dict(loss.fixed)
    for k, v in hp.items():
        if k in fixed and not _same(v, fixed[k]):
            raise ValueError(f"hyperparameter {k}={v!r} selects the formula and differs from the configured "
                             f"{k}={fixed[k]!r}; configure it in the TrainConfig")
    return loss.replace(**{k: v for k, v in hp.items() if k not in fixed})


def learning_rate(opt_state) -> Array:
    """The learning rate an optimizer state from `make_optimizer` will apply (optax
    `inject_hyperparams` keeps it in the state, so a schedule sets it there)."""
    return opt_state.hyperparams["learning_rate"]


def make_step(policy: Policy, cfg: TrainConfig, hp=None, plugin: StepPlugin | None = None):
    """step(params, opt_state, batch, ref_logps, key) -> (params, opt_state, record): one optimizer step.

    batch: PairBatch [B]; ref_logps: (ref_chosen [B], ref_rejected [B]) of the reference policy.
    The learning rate is the one in `opt_state` (`make_optimizer(name, lr).init(params)`; set
    `opt_state.hyperparams["learning_rate"]` to schedule it): the step takes none of its own, so
    the rate the records use for the one-pair prediction is always the rate of the real update.
    hp: loss hyperparameters (numeric ones may be traced, e.g. a vmapped beta); default: the
    configuration's resolved loss `cfg.resolved` (see `with_hp`).
    record=False configs return (logps_w, logps_l, per-pair loss) instead of a Trajectory row.
    plugin: `StepPlugin` hooks (token weights, extra loss terms, an update transformation, extra
    state, own records): the mitigations of `entangle_sim.mitigations` are such plug-ins.
    """
    loss = with_hp(cfg.resolved, hp)
    plug = plugin or StepPlugin()
    stateful = plug.init is not None
    # The update reads its rate from opt_state (inject_hyperparams), so the value given here is unused.
    opt = make_optimizer(cfg.optimizer, cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)

    def setup(batch, key):
        B = batch.size
        b = B if cfg.batch_size == 0 or cfg.batch_size >= B else cfg.batch_size
        full = b == B
        idx = jnp.arange(B) if full else jax.random.choice(key, B, (b,), replace=False)
        return B, b, full, idx

    def logps_fn(batch, weights):
        """p -> (l_w, l_l): summed log-probs, or the token-weighted ones of a plug-in."""
        if weights is None:
            return lambda p: policy.logps(p, batch)
        m_w, m_l = weights

        def weighted(p):
            tw, tl = policy.token_logps(p, batch)
            return (m_w * tw).sum(-1), (m_l * tl).sum(-1)
        return weighted

    def reference(ref_logps, weights):
        if weights is None:
            return ref_logps
        return (weights[0] * ref_logps[0]).sum(-1), (weights[1] * ref_logps[1]).sum(-1)

    def pair_state(lw, ll, ref, batch):
        zeros = jnp.zeros_like(lw)   # the trainer scores no prompt tokens
        return PairState(lw, ll, ref[0], ref[1], batch.chosen_len, batch.rejected_len, zeros, zeros)

    def pair_losses(lw, ll, ref, batch):
        L = loss.loss(pair_state(lw, ll, ref, batch))
        return L if plug.extra_loss is None else L + plug.extra_loss(lw, ll, batch)

    def weights_at(state, params, batch):
        return None if plug.token_weights is None else plug.token_weights(state, params, batch)

    def objective(params, state, batch, ref_logps, idx, full, w, weight_params):
        """The minimised scalar and, on the full batch, (l_w, l_l) at params."""
        if plugin is None:   # the loss's own batch reduction over the step's minibatch
            sub = batch if full else batch.take(idx)  # full batch: no gather
            lw, ll = policy.logps(params, sub)
            rw, rl = ref_logps if full else (ref_logps[0][idx], ref_logps[1][idx])
            return loss.batch(pair_state(lw, ll, (rw, rl), sub)), (lw, ll)
        weights = weights_at(state, weight_params, batch)
        if plug.sequence_loss is not None:   # a loss on sequences (group losses): no per-pair terms
            tw, tl = policy.token_logps(params, batch)
            return plug.sequence_loss(tw, tl, batch, ref_logps, weights), (tw.sum(-1), tl.sum(-1))
        lw, ll = logps_fn(batch, weights)(params)
        L = (w * pair_losses(lw, ll, reference(ref_logps, weights), batch)).sum()
        if plug.penalty is not None:
            L = L + (w * plug.penalty(*weights)).sum()
        return L, (lw, ll)

    def step(params, opt_state, batch, ref_logps, key):
        B, b, full, idx = setup(batch, key)
        inner, state = opt_state if stateful else (opt_state, None)
        w = jnp.zeros((B,), jnp.result_type(float)).at[idx].set(1.0 / b)
        weights = weights_at(state, params, batch)
        weights = None if weights is None else jax.lax.stop_gradient(weights)
        ref = reference(ref_logps, weights)
        ctx = StepContext(loss=loss, policy=policy, params=params, batch=batch, state=state, weights=weights,
                          logps=logps_fn(batch, weights), ref=ref, loss_of=lambda x, y: pair_losses(x, y, ref, batch),
                          w=w, b=b, lr=learning_rate(inner), opt_state=inner)
        if plug.coefficients is not None:
            ctx.lw, ctx.ll = ctx.logps(params)
            a, bb = ctx.coefficients = jax.lax.stop_gradient(plug.coefficients(ctx))

            def surrogate(p):
                x, y = ctx.logps(p)
                return -(a * x - bb * y).sum()
            grads, state_grads = jax.grad(surrogate)(params), None
        else:
            argnums = (0, 1) if stateful else 0
            (_, (lw, ll)), g = jax.value_and_grad(objective, argnums=argnums, has_aux=True)(
                params, state, batch, ref_logps, idx, full, w, params)
            grads, state_grads = g if stateful else (g, None)
            ctx.lw, ctx.ll = (lw, ll) if (full or plugin is not None) else ctx.logps(params)
        ctx.per_pair = None if plug.sequence_loss is not None else pair_losses(ctx.lw, ctx.ll, ref, batch)
        updates, new_inner = opt.update(grads, inner, params)
        new_params = optax.apply_updates(params, updates)
        new_state = state
        if stateful and state_grads is not None:
            new_state = jax.tree.map(lambda x, g: x - plug.state_lr * g, state, state_grads)
        ctx.after_update(grads=grads, updates=updates, new_params=new_params, new_opt_state=new_inner,
                         new_state=new_state)
        rec = (plug.record or (trajectory_record if cfg.record else lean_record))(ctx)
        return new_params, ((new_inner, new_state) if stateful else new_inner), rec

    def lean_record(ctx):
        # Only log-probs and losses: one forward + backward per step (realised changes are
        # recovered after the scan from consecutive states).
        return ctx.lw, ctx.ll, ctx.per_pair

    def trajectory_record(ctx):
        B = ctx.batch.size
        lw, ll = ctx.lw, ctx.ll
        lw1, ll1 = ctx.logps(ctx.new_params)
        J = ctx.jacobian   # [2B, P]: per-response gradients
        gram = geometry.jacobian_pair_gram(J)
        d_w, d_l = ctx.loss.incentives(ctx.pair_state())
        eta = ctx.lr / ctx.b  # the batch mean gives each pair weight 1/b
        pred_w = eta * (d_w * gram.G_ww - d_l * gram.G_wl)
        pred_l = eta * (d_w * gram.G_wl - d_l * gram.G_ll)
        lin = J @ ravel_pytree(ctx.updates)[0]
        # The SGD step on the same batch at the same rate, to first order: J (-lr grad L) =
        # sum over all 2B responses of the Gram (one-pair plus cross-pair terms). Equal to `lin`
        # for plain SGD; the gap to `lin` is the optimizer's preconditioning (Adam, momentum).
        sgd = -ctx.lr * (J @ ravel_pytree(ctx.grads)[0])
        return Trajectory(chosen_logps=lw, rejected_logps=ll, margin=lw - ll, loss=ctx.per_pair,
                          real_chosen=lw1 - lw, real_rejected=ll1 - ll, G_ww=gram.G_ww, G_wl=gram.G_wl,
                          G_ll=gram.G_ll, d_w=d_w, d_l=d_l, regime_pred=regimes.classify(pred_w, pred_l),
                          pred_chosen=pred_w, pred_rejected=pred_l, lin_chosen=lin[:B], lin_rejected=lin[B:],
                          batch_chosen=sgd[:B], batch_rejected=sgd[B:])

    return step


class RunStep(NamedTuple):
    """What `run`'s `observe` sees after step i (inside the trace: every field may be a tracer)."""
    i: Array               # step index (int32 scalar)
    key: Array             # the step's PRNG key
    batch: PairBatch       # the batch it trained on
    reference: Any         # the reference log-probs it used (None: reference-free)
    params_before: PyTree
    params_after: PyTree
    record: Any            # the step's own record (a Trajectory row, (l_w, l_l, loss), ...)


def run(step, params: PyTree, opt_state, keys: Array, batches, *, reference=None, reduce=None, observe=None,
        on_step=None):
    """The one run loop: `step` applied once per key as one `lax.scan` (jit or vmap it outside). Every
    training run goes through it: `train`, SFT, pretraining, mitigations, the pretrain -> SFT -> PO pipeline.

    step: a `make_step` step, step(params, opt_state, batch, ref_logps, key) -> (params, opt_state,
        record), or with reference=None a reference-free one, step(params, opt_state, batch, key)
        (e.g. `make_sft_step`).
    keys: [S] PRNG keys, one per step (e.g. `jax.random.split(key, S)`).
    batches: a PairBatch (the same every step) or a function key -> PairBatch (a fresh batch per step).
    reference: None (reference-free step); (ref_chosen [B], ref_rejected [B]) for a fixed batch; or a
        function batch -> (ref_chosen, ref_rejected), e.g. the reference policy's log-probs
        `lambda b: jax.lax.stop_gradient(policy.logps(ref_params, b))`.
    reduce: (record, batch) -> what is stacked per step (default: the record itself); or instead
    observe: RunStep -> what is stacked, when it needs more (parameters before and after, step index).
    on_step: host callback on_step(i) after step i (progress bars), via `jax.debug.callback`.
    Returns (final params, final opt_state, stacked [S, ...] rows).

        >>> import jax
        >>> from entangle_sim import data, train
        >>> gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=6, target_cos=0.5, norm_ratio=1.0)
        >>> cfg = train.TrainConfig(loss="sigmoid", lr=0.1, steps=3, record=False)
        >>> pol = gp.policy()
        >>> step = train.make_step(pol, cfg)
        >>> ref = pol.logps(gp.params, gp.batch)
        >>> _, _, (lw, ll, loss) = train.run(step, gp.params, train.make_optimizer("sgd", 0.1).init(gp.params),
        ...                                  jax.random.split(jax.random.PRNGKey(1), 3), gp.batch, reference=ref)
        >>> lw.shape
        (3, 4)
    """
    if reduce is not None and observe is not None:
        raise ValueError("run: give reduce or observe, not both")

    def body(carry, xs):
        p, s = carry
        i, k = xs
        batch = batches(k) if callable(batches) else batches
        if reference is None:
            ref = None
            p1, s, rec = step(p, s, batch, k)
        else:
            ref = reference(batch) if callable(reference) else reference
            p1, s, rec = step(p, s, batch, ref, k)
        if observe is not None:
            y = observe(RunStep(i, k, batch, ref, p, p1, rec))
        else:
            y = rec if reduce is None else reduce(rec, batch)
        if on_step is not None:
            jax.debug.callback(on_step, i)
        return (p1, s), y

    n = keys.shape[0]
    (p, s), recs = jax.lax.scan(body, (params, opt_state), (jnp.arange(n), keys))
    return p, s, recs


def run_steps(step, params: PyTree, opt_state, batch: PairBatch, ref_logps, key: Array, steps: int):
    """`steps` applications of `step` on a fixed batch (`run` with keys `jax.random.split(key, steps)`);
    returns (final params, final opt_state, records stacked over steps)."""
    return run(step, params, opt_state, jax.random.split(key, steps), batch, reference=ref_logps)


def train(policy: Policy, params: PyTree, batch: PairBatch, cfg: TrainConfig, key: Array, *, lr=None,
          hp=None) -> Trajectory:
    """One run as a single `lax.scan` (jit it, or let `sweep` vmap it). Returns [S, B] records.

    lr: the learning rate of this run (default cfg.lr; may be traced, e.g. vmapped by `sweep`).
    """
    lr = cfg.lr if lr is None else lr
    ref = jax.lax.stop_gradient(policy.logps(params, batch))
    step = make_step(policy, cfg, hp)
    opt_state = make_optimizer(cfg.optimizer, lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay).init(params)
    p_final, _, traj = run_steps(step, params, opt_state, batch, ref, key, cfg.steps)
    if cfg.record:
        return traj
    lw, ll, per_pair = traj
    lw_f, ll_f = policy.logps(p_final, batch)
    real_w = jnp.concatenate([lw[1:], lw_f[None]]) - lw
    real_l = jnp.concatenate([ll[1:], ll_f[None]]) - ll
    zeros = jnp.zeros_like(lw)
    return Trajectory(chosen_logps=lw, rejected_logps=ll, margin=lw - ll, loss=per_pair, G_ww=zeros, G_wl=zeros,
                      G_ll=zeros, d_w=zeros, d_l=zeros, regime_pred=jnp.full(lw.shape, regimes.STATIONARY),
                      pred_chosen=zeros, pred_rejected=zeros, lin_chosen=zeros, lin_rejected=zeros,
                      real_chosen=real_w, real_rejected=real_l, batch_chosen=zeros, batch_rejected=zeros)


def sft_pairs(prompt: Array, response: Array, mask: Array) -> PairBatch:
    """SFT examples as a PairBatch (chosen = rejected = the response) for a run with the `sft` loss,
    which reads only the chosen side: -sum l_w / sum n_w, TRL's token-mean NLL of the batch."""
    return PairBatch(prompt, response, response, mask, mask)


def make_sft_step(policy: Policy, optimizer: str, lr: float):
    """step(params, opt_state, batch, key) -> (params, opt_state, batch sft loss before the step):
    the trainer's step with the registry's `sft` loss (no reference model)."""
    cfg = TrainConfig(loss="sft", optimizer=optimizer, lr=lr, steps=1, record=False)
    inner = make_step(policy, cfg)

    def step(params, opt_state, batch, key):
        zeros = jnp.zeros(batch.size, jnp.result_type(float))   # `sft` reads no reference
        params, opt_state, (lw, ll, _) = inner(params, opt_state, batch, (zeros, zeros), key)
        state = PairState(lw, ll, zeros, zeros, batch.chosen_len, batch.rejected_len, zeros, zeros)
        return params, opt_state, cfg.resolved.batch(state)

    return step


def pretrain_sft(policy: Policy, params: PyTree, batch: PairBatch, *, steps: int = 100, lr: float = 0.05,
                 optimizer: str = "adam") -> PyTree:
    """Supervised warm start on the chosen responses (TRL `sft` loss), as one compiled scan.

    Preference optimisation in practice starts from an SFT model in which the chosen responses
    are already likely; the reference model is then this SFT policy (theory §6.3).
    """
    cfg = TrainConfig(loss="sft", optimizer=optimizer, lr=lr, steps=steps, record=False)
    step = make_step(policy, cfg)
    opt_state = make_optimizer(optimizer, lr).init(params)
    ref = jax.lax.stop_gradient(policy.logps(params, batch))
    run = jax.jit(lambda p, s: run_steps(step, p, s, batch, ref, jax.random.PRNGKey(0), steps)[0])
    return run(params, opt_state)


def sweep(policy: Policy, batch: PairBatch, cfg: TrainConfig, key: Array, runs: int, *, params0=None,
          lrs=None, hps: dict | None = None, init_noise: float = 0.0) -> Trajectory:
    """`runs` runs vmapped in one compiled program; [R, S, B] records.

    params0: shared initial parameters (default: `policy.init` of each run's key); init_noise adds
    N(0, init_noise^2) to them per run. lrs: [R] learning rates; hps: loss hyperparameters as [R]
    arrays (e.g. {'beta': betas}). With several devices the run axis is sharded over them
    (jax.sharding), which needs runs % device_count == 0.
    """
    if runs < 1:
        raise ValueError(f"runs must be >= 1, got {runs}")
    keys = jax.random.split(key, runs)
    lrs = jnp.full((runs,), cfg.lr) if lrs is None else jnp.asarray(lrs)
    hps = {k: jnp.asarray(v) for k, v in (hps or {}).items()}
    for k in hps:
        cfg.resolved.spec.hyper(k)   # an unknown name raises with a suggestion
        if k in dict(cfg.resolved.fixed):
            raise ValueError(f"hyperparameter {k!r} selects the formula and cannot be swept; "
                             "run one sweep per value")
    fn = sweep_fn(policy, cfg, params0 is None)
    n_dev = jax.device_count()
    if n_dev > 1 and runs % n_dev == 0:
        from jax.sharding import Mesh, NamedSharding, PartitionSpec

        mesh = Mesh(np.array(jax.devices()), ("runs",))
        shard = NamedSharding(mesh, PartitionSpec("runs"))
        keys, lrs = jax.device_put(keys, shard), jax.device_put(lrs, shard)
        hps = {k: jax.device_put(v, shard) for k, v in hps.items()}
    return fn(keys, lrs, hps, batch, params0, jnp.asarray(init_noise))


@functools.lru_cache(maxsize=64)
def sweep_fn(policy: Policy, cfg: TrainConfig, own_init: bool):
    """The compiled, vmapped sweep for (policy, config): built once, reused across calls."""
    base_hp = dict(cfg.resolved.numeric)

    def one(k, lr, hp_vals, batch, params0, init_noise):
        k_init, k_noise, k_train = jax.random.split(k, 3)
        if own_init:
            p = policy.init(k_init)
        else:
            leaves, tree = jax.tree.flatten(params0)
            ks = jax.random.split(k_noise, len(leaves))
            p = jax.tree.unflatten(tree, [x + init_noise * jax.random.normal(kk, x.shape, x.dtype)
                                          for x, kk in zip(leaves, ks)])
        return train(policy, p, batch, cfg, k_train, lr=lr, hp={**base_hp, **hp_vals})

    return jax.jit(jax.vmap(one, in_axes=(0, 0, 0, None, None, None)))


def summarize(traj: Trajectory, *, noise: float | None = None) -> dict[str, Any]:
    """Agreement and regime statistics of a trajectory ([S, B] or [R, S, B]) as plain floats: the one
    run-summary schema (`regimes.RUN_SUMMARY`, with lin_* as the prediction) plus the keys below.

    sign_agreement: fraction of (pair, step) changes whose realised sign equals the sign of the
    first-order prediction of the actual update (lin_*), over changes with |prediction| > noise.
    sign_agreement_one_pair: the same for the per-pair symbolic prediction (pred_*).
    noise default: 100 x machine epsilon x (1 + |l|), the rounding of a log-prob difference.
    """
    t = jax.tree.map(np.asarray, traj)
    out = regimes.run_summary(t.chosen_logps, t.rejected_logps, t.real_chosen, t.real_rejected,
                              pred=(t.lin_chosen, t.lin_rejected), loss=t.loss, noise=noise)
    out["sign_agreement_one_pair"], out["sign_agreement_one_pair_n"] = regimes.sign_agreement(
        t.pred_chosen, t.pred_rejected, t.real_chosen, t.real_rejected, t.chosen_logps, t.rejected_logps, noise)
    out["predicted_regime_fractions"] = regimes.fractions(t.regime_pred)
    err = np.abs(np.concatenate([(t.real_chosen - t.lin_chosen).ravel(), (t.real_rejected - t.lin_rejected).ravel()]))
    out["first_order_max_abs_error"] = float(err.max()) if err.size else 0.0
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = t.G_wl / np.sqrt(t.G_ww * t.G_ll)
    out["mean_cos_first_step"] = float(np.nanmean(cos[..., 0, :]))
    out["mean_cos_last_step"] = float(np.nanmean(cos[..., -1, :]))
    return out
