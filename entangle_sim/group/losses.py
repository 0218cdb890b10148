"""Group losses: TRL 1.16 `GRPOTrainer._compute_loss` for every `loss_type`, in JAX.

    loss = group_loss(loss_type, per_token_logps [B, T], mask [B, T], advantages [B], old [B, T], ref [B, T], **p)

B sequences (one micro-batch: the G rollouts of a prompt, or several prompts' groups), per-token
log-probs of the policy `l_{i,t}`, of the old (sampling) policy and of the reference. The value and
its gradient equal TRL's for every loss type (`grpo`, `bnpo`, `dr_grpo`, `dapo`, `cispo`, `sapo`,
`luspo`, `vespo`), including the ratio `exp(l - l_old)` and its clipping, the KL term with `beta`
(`use_bias_correction_kl`), and each aggregation's normaliser (`max_completion_length`,
`num_items_in_batch`, gradient accumulation, processes). Checked against TRL's own function in
`tests/test_group_trl.py`.

Advantages (`advantages`): TRL's `scale_rewards` options: `r - mean_G(r)` divided by the group's
unbiased std + 1e-4 ("group"), the batch's ("batch") or not at all ("none").

Incentives (`token_incentives`, `rollout_weights`): `w_{i,t} = -dL/dl_{i,t}` by `jax.grad` of the
loss, so `grad_theta L = -sum_{i,t} w_{i,t} g_{i,t}`; at the on-policy step (ratio 1) they are the
same for every token of a rollout, `w_i` (docs/theory.md, "Group entanglement": derived in this project).

Example:
    >>> import numpy as np
    >>> adv, zero_std = advantages(np.array([1.0, 0.0, 0.0, 1.0]), 4)
    >>> w = rollout_weights("dr_grpo", adv, np.array([2, 3, 4, 5]), max_completion_length=8)
    >>> bool(np.allclose(w, adv / (4 * 8)))
    True
"""
from __future__ import annotations

import difflib
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

LOSS_TYPES = ("grpo", "bnpo", "dr_grpo", "dapo", "cispo", "sapo", "luspo", "vespo")
SCALE_REWARDS = ("group", "batch", "none")

#: TRL 1.16 `GRPOConfig` names and defaults of every hyperparameter the loss reads (`epsilon_high`
#: None means `epsilon`; `importance_sampling_level` None means TRL's recommended level of the
#: loss type: "sequence" for luspo, "token" otherwise; `num_items_in_batch` None means the tokens
#: of this micro-batch, i.e. the normaliser of dapo/cispo/vespo is the micro-batch's token count).
PARAMS: dict[str, Any] = {
    "scale_rewards": "group",
    "beta": 0.0,
    "epsilon": 0.2,
    "epsilon_high": None,
    "delta": None,
    "importance_sampling_level": None,
    "use_bias_correction_kl": True,
    "max_completion_length": 512,
    "num_items_in_batch": None,
    "num_processes": 1,
    "gradient_accumulation_steps": 1,
    "steps_per_generation": None,
    "sapo_temperature_pos": 1.0,
    "sapo_temperature_neg": 1.05,
    "vespo_k_pos": 2.0,
    "vespo_lambda_pos": 3.0,
    "vespo_k_neg": 3.0,
    "vespo_lambda_neg": 2.0,
    "train": True,
}
_STRINGS = {"scale_rewards": SCALE_REWARDS, "importance_sampling_level": ("token", "sequence")}
_BOOLS = ("use_bias_correction_kl", "train")
_INTS = ("max_completion_length", "num_processes", "gradient_accumulation_steps", "steps_per_generation")


def check_loss_type(loss_type: str) -> str:
    """The loss type, or ValueError naming the valid ones (with a close match if any)."""
    if loss_type not in LOSS_TYPES:
        close = difflib.get_close_matches(str(loss_type), LOSS_TYPES, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ValueError(f"unknown group loss type {loss_type!r}{hint}; valid: {', '.join(LOSS_TYPES)}")
    return loss_type


def resolve(loss_type: str | None = None, **params) -> dict[str, Any]:
    """TRL's defaults updated by `params` (TRL's names), checked; None-defaults resolved.

    Unknown name -> ValueError; bad value -> ValueError / TypeError.
    """
    out = dict(PARAMS)
    for k, v in params.items():
        if k not in PARAMS:
            close = difflib.get_close_matches(k, PARAMS, n=1)
            raise ValueError(f"unknown group-loss parameter {k!r}" + (f" (did you mean {close[0]!r}?)" if close else "")
                             + f"; valid: {', '.join(PARAMS)}")
        if v is None:
            continue
        if k in _STRINGS:
            if v not in _STRINGS[k]:
                raise ValueError(f"{k} must be one of {', '.join(_STRINGS[k])}, got {v!r}")
        elif k in _BOOLS:
            if isinstance(v, str):
                if v.lower() not in ("true", "false", "1", "0"):
                    raise ValueError(f"{k} must be true or false, got {v!r}")
                v = v.lower() in ("true", "1")
            v = bool(v)
        elif k in _INTS:
            fv = float(v)
            if not math.isfinite(fv) or fv != int(fv) or fv < 1:
                raise ValueError(f"{k} must be a positive integer, got {v!r}")
            v = int(fv)
        else:
            fv = float(v)
            if not math.isfinite(fv):
                raise ValueError(f"{k} must be finite, got {v!r}")
            if k == "num_items_in_batch" and fv <= 0:
                raise ValueError(f"num_items_in_batch must be positive, got {v!r}")
            if k in ("epsilon", "beta") and fv < 0:
                raise ValueError(f"{k} must be >= 0, got {v!r}")
            v = fv
        out[k] = v
    if out["epsilon_high"] is None:
        out["epsilon_high"] = out["epsilon"]
    if out["steps_per_generation"] is None:
        out["steps_per_generation"] = out["gradient_accumulation_steps"]
    if out["importance_sampling_level"] is None and loss_type is not None:
        out["importance_sampling_level"] = "sequence" if loss_type == "luspo" else "token"
    return out


def advantages(rewards, num_generations: int, scale_rewards: str = "group"):
    """TRL's advantages of a flat reward vector [N] (N = groups x num_generations), and the
    per-sequence zero-std flags TRL logs (`frac_reward_zero_std`).

    A = r - mean_group(r), divided by std + 1e-4 unless scale_rewards == "none"; std is TRL's unbiased
    (n - 1) std of the group ("group", "none") or of the whole batch ("batch").
    Returns (A [N], zero_std bool [N]).
    """
    r = np.asarray(rewards, dtype=np.float64)
    if scale_rewards not in SCALE_REWARDS:
        raise ValueError(f"scale_rewards must be one of {', '.join(SCALE_REWARDS)}, got {scale_rewards!r}")
    G = int(num_generations)
    if r.ndim != 1 or G < 2 or r.size % G:
        raise ValueError(f"rewards must be a flat vector of whole groups of num_generations >= 2, got "
                         f"{r.size} rewards and num_generations={num_generations}")
    grouped = r.reshape(-1, G)
    mean = np.repeat(grouped.mean(1), G)
    if scale_rewards == "batch":
        std = np.full_like(r, _trl_std(r))
    else:
        std = np.repeat([_trl_std(g) for g in grouped], G)
    A = r - mean
    if scale_rewards != "none":
        A = A / (std + 1e-4)
    zero_std = np.isclose(std, 0.0, rtol=1e-5, atol=1e-8)   # torch.isclose's defaults, as TRL logs it
    return A, zero_std


def _trl_std(x: np.ndarray) -> float:
    """TRL's `nanstd`: sqrt(mean((x - mean)^2) * n/(n-1)), where n/(n-1) is an integer-tensor division,
    i.e. a float32 number (relative difference ~1e-8 to the exact unbiased std, kept to match TRL)."""
    n = x.size
    return float(np.sqrt(np.mean((x - x.mean()) ** 2) * np.float64(np.float32(n / (n - 1)))))


def _gamma_weights(adv, log_ratio, mask, p):
    """VESPO's detached sequence weight phi(w) = exp(lam + k log w - lam w), w = exp(sum_t log-ratio)."""
    lower = math.log(1e-8)
    seq = jnp.sum(jnp.clip(log_ratio, -20.0, 20.0) * mask, axis=-1, keepdims=True)
    log_w = jnp.clip(seq, lower, 20.0)
    pos = adv >= 0
    k = jnp.where(pos, p["vespo_k_pos"], p["vespo_k_neg"])
    lam = jnp.maximum(jnp.where(pos, p["vespo_lambda_pos"], p["vespo_lambda_neg"]), 1e-4)
    phi = jnp.exp(lam + k * log_w - lam * jnp.exp(log_w))
    return jax.lax.stop_gradient(jnp.nan_to_num(phi, nan=0.0, posinf=0.0, neginf=0.0))


def group_loss(loss_type: str, per_token_logps, mask, advantages, old_per_token_logps=None,
               ref_per_token_logps=None, *, token_weights=None, **params):
    """TRL 1.16 `GRPOTrainer._compute_loss` of one micro-batch (scalar; differentiable in per_token_logps).

    per_token_logps, mask, old_per_token_logps, ref_per_token_logps: [B, T]; advantages: [B].
    old default: per_token_logps detached (TRL's on-policy shortcut); ref needed when beta != 0.
    token_weights [B, T] (optional, constant): multiply the per-token policy loss before the KL term,
    as TRL's entropy mask does; a mitigation's hook. params: TRL's names (see `PARAMS`).
    """
    check_loss_type(loss_type)
    p = resolve(loss_type, **params)
    lp = per_token_logps
    mask = jnp.asarray(mask, lp.dtype)
    adv = jnp.asarray(advantages, lp.dtype)[:, None]
    old = jax.lax.stop_gradient(lp) if old_per_token_logps is None else old_per_token_logps
    log_ratio = lp - old
    if p["importance_sampling_level"] == "token":
        log_iw = log_ratio
    else:
        log_iw = ((log_ratio * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0))[:, None]
    coef_1 = jnp.exp(log_iw)
    if p["beta"] != 0.0:
        if ref_per_token_logps is None:
            raise ValueError("beta != 0 needs ref_per_token_logps")
        d = ref_per_token_logps - lp
        kl = jnp.exp(d) - d - 1
        if p["use_bias_correction_kl"]:
            kl = kl * coef_1
    eps_lo, eps_hi = p["epsilon"], p["epsilon_high"]
    if loss_type == "cispo":
        per_token = -jax.lax.stop_gradient(jnp.minimum(coef_1, eps_hi)) * adv * lp
    elif loss_type in ("grpo", "bnpo", "dr_grpo", "dapo", "luspo"):
        coef_2 = jnp.clip(coef_1, 1 - eps_lo, 1 + eps_hi)
        if p["delta"] is not None:
            coef_1 = jnp.minimum(coef_1, p["delta"])
        per_token = -jnp.minimum(coef_1 * adv, coef_2 * adv)
    elif loss_type == "sapo":
        # TRL builds the temperatures with torch.where on two Python floats: a float32 tensor; the same
        # rounding here keeps the loss equal to TRL's to ~1e-16 instead of ~1e-8
        f32 = lambda v: float(np.float32(v))  # noqa: E731
        tau = jnp.where(adv > 0, f32(p["sapo_temperature_pos"]), f32(p["sapo_temperature_neg"]))
        per_token = -jax.nn.sigmoid(tau * (coef_1 - 1)) * 4 / tau * adv
    else:   # vespo
        per_token = -_gamma_weights(adv, log_ratio, mask, p) * adv * lp
    if token_weights is not None:
        per_token = per_token * token_weights
    if p["beta"] != 0.0:
        per_token = per_token + p["beta"] * kl
    ga = p["gradient_accumulation_steps"] if p["train"] else 1.0
    B = lp.shape[0]
    if loss_type in ("grpo", "sapo"):
        return ((per_token * mask).sum(-1) / jnp.maximum(mask.sum(-1), 1.0)).mean() / ga
    if loss_type == "bnpo":
        return (per_token * mask).sum() / jnp.maximum(mask.sum(), 1.0) / ga
    if loss_type == "dr_grpo":
        return (per_token * mask).sum() / (B * p["max_completion_length"]) / ga
    if loss_type == "luspo":
        return (per_token * mask).sum(-1).mean() / ga
    # dapo, cispo, vespo: num_items_in_batch spans the generation batch; rescaled to one window
    n_items = p["num_items_in_batch"]
    if n_items is None:   # default: this micro-batch's tokens are the whole window
        n_items = mask.sum() * p["num_processes"] * (p["steps_per_generation"] / ga if p["train"] else 1.0)
    norm = jnp.maximum(n_items, 1.0) / p["num_processes"]
    if p["train"]:
        norm = norm * p["gradient_accumulation_steps"] / p["steps_per_generation"]
    return (per_token * mask).sum() / norm


def token_incentives(loss_type: str, per_token_logps, mask, advantages, old_per_token_logps=None,
                     ref_per_token_logps=None, *, token_weights=None, **params):
    """w_{i,t} = -dL/dl_{i,t} [B, T] (0 on padding), by jax.grad of `group_loss`.

    Without old_per_token_logps the ratio is 1 (the on-policy step)."""
    old = jax.lax.stop_gradient(per_token_logps) if old_per_token_logps is None else old_per_token_logps
    g = jax.grad(lambda x: group_loss(loss_type, x, mask, advantages, old, ref_per_token_logps,
                                      token_weights=token_weights, **params))(per_token_logps)
    return -g * mask


def length_mask(lens, T: int | None = None) -> np.ndarray:
    """[B, T] float mask with lens[i] leading ones (right padding), T default max(lens)."""
    lens = np.asarray(lens, dtype=int)
    T = int(lens.max()) if T is None else T
    return (np.arange(T)[None, :] < lens[:, None]).astype(np.float64)


def rollout_weights(loss_type: str, advantages, lens, **params) -> np.ndarray:
    """Per-rollout weights w_i at the on-policy step (ratio 1, policy = reference): the incentive
    every token of rollout i receives, so grad L = -sum_i w_i g_i. [B] float64.

    E.g. grpo: A_i / (B n_i); bnpo: A_i / sum n; dr_grpo: A_i / (B L_max); dapo, vespo: A_i / N;
    cispo: min(1, epsilon_high) A_i / N; luspo: A_i / B (docs/theory.md, group entanglement).
    """
    check_loss_type(loss_type)
    lens = np.asarray(lens)
    A = np.asarray(advantages, dtype=np.float64)
    dt = jnp.result_type(float)   # float64 under jax_enable_x64 (the CLI and tests enable it)
    mask = jnp.asarray(length_mask(lens), dtype=dt)
    x = jnp.zeros(mask.shape, dt) - 0.5 * mask   # any log-probs: weights do not depend on them at ratio 1
    w_tok = _incentives_jit(loss_type, tuple(sorted(params.items())), x, mask, jnp.asarray(A, dt))
    return np.asarray(w_tok.sum(-1) / lens)


@functools.partial(jax.jit, static_argnums=(0, 1))
def _incentives_jit(loss_type, params, x, mask, A):
    # compiled once per (loss type, hyperparameters, shape): op-by-op dispatch is ~20x slower here
    return token_incentives(loss_type, x, mask, A, None, x, **dict(params))
