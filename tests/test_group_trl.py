"""The group-loss registry against TRL 1.16's own `GRPOTrainer._compute_loss` (not a transcription).

TRL's method is called unbound on a stand-in `self` holding exactly the attributes it reads; the
model forward (`_get_per_token_logps_and_entropies`) returns a float64 leaf tensor, so torch
autograd gives TRL's per-token incentives -dL/dl_{i,t}. The contract is 1e-6 absolute; both sides
are float64 and the registry reproduces TRL's two float32 roundings (the SAPO temperatures, the
Bessel factor of the std), so the test holds them to 1e-12 (measured: <= 5e-16).
"""
from collections import defaultdict
from types import SimpleNamespace

import jax.numpy as jnp
import numpy as np
import pytest

torch = pytest.importorskip("torch")
trl = pytest.importorskip("trl")
from trl import GRPOTrainer  # noqa: E402
from trl.trainer.utils import nanstd  # noqa: E402

from entangle_sim.group import losses as gl  # noqa: E402

TOL = 1e-12   # tighter than the 1e-6 contract: see the module docstring


class _Acc:
    num_processes = 1

    @staticmethod
    def gather(x):
        return x

    gather_for_metrics = gather

    @staticmethod
    def reduce(x, reduction="sum"):
        return x


def _trl_self(loss_type, p, ptl):
    p = gl.resolve(loss_type, **p)
    args = SimpleNamespace(use_bias_correction_kl=p["use_bias_correction_kl"], delta=p["delta"],
                           sapo_temperature_pos=p["sapo_temperature_pos"],
                           sapo_temperature_neg=p["sapo_temperature_neg"], vespo_k_pos=p["vespo_k_pos"],
                           vespo_lambda_pos=p["vespo_lambda_pos"], vespo_k_neg=p["vespo_k_neg"],
                           vespo_lambda_neg=p["vespo_lambda_neg"], steps_per_generation=p["steps_per_generation"])
    acc = _Acc()
    acc.num_processes = p["num_processes"]
    return SimpleNamespace(
        _get_per_token_logps_and_entropies=lambda *a, **k: (ptl, torch.zeros_like(ptl), None),
        top_entropy_quantile=1.0, off_policy_mask_threshold=None,
        importance_sampling_level=p["importance_sampling_level"], beta=p["beta"], args=args,
        loss_type=loss_type, epsilon_low=p["epsilon"], epsilon_high=p["epsilon_high"], use_vllm=False,
        vllm_importance_sampling_correction=False, model=SimpleNamespace(training=p["train"]),
        current_gradient_accumulation_steps=p["gradient_accumulation_steps"], accelerator=acc,
        max_completion_length=p["max_completion_length"], _entropy_bonus_enabled=False,
        aux_loss_enabled=False, _metrics=defaultdict(lambda: defaultdict(list)),
        get_gamma_weights=GRPOTrainer.get_gamma_weights, get_off_policy_mask=GRPOTrainer.get_off_policy_mask)


def _case(seed, B=5, T=6, on_policy=True, beta=0.0):
    rng = np.random.default_rng(seed)
    lens = rng.integers(1, T + 1, B)
    lens[0] = T
    mask = gl.length_mask(lens, T)
    lp = -rng.uniform(0.1, 2.0, (B, T)) * mask
    # off-policy: log-ratios up to +-0.5 so that clipping at epsilon=0.2 is active on some tokens
    old = lp if on_policy else lp - rng.uniform(-0.5, 0.5, (B, T)) * mask
    ref = lp - rng.uniform(-0.3, 0.3, (B, T)) * mask if beta else None
    adv = rng.normal(size=B)
    return lp, mask, old, ref, adv


def _trl(loss_type, p, lp, mask, old, ref, adv, num_items):
    ptl = torch.tensor(lp, dtype=torch.float64, requires_grad=True)
    inputs = {"prompt_ids": torch.zeros((lp.shape[0], 1), dtype=torch.long),
              "prompt_mask": torch.ones((lp.shape[0], 1), dtype=torch.long),
              "completion_ids": torch.zeros(lp.shape, dtype=torch.long),
              "completion_mask": torch.tensor(mask, dtype=torch.float64),
              "advantages": torch.tensor(adv, dtype=torch.float64),
              "old_per_token_logps": torch.tensor(old, dtype=torch.float64),
              "num_items_in_batch": torch.tensor(float(num_items), dtype=torch.float64)}
    if ref is not None:
        inputs["ref_per_token_logps"] = torch.tensor(ref, dtype=torch.float64)
    loss = GRPOTrainer._compute_loss(_trl_self(loss_type, p, ptl), None, inputs)
    (g,) = torch.autograd.grad(loss, ptl)
    return float(loss.detach()), -(g.numpy() * mask)


PARAM_SETS = [
    {},
    {"epsilon": 0.1, "epsilon_high": 0.28, "max_completion_length": 9, "gradient_accumulation_steps": 2,
     "steps_per_generation": 4, "num_items_in_batch": 57.0},
    {"beta": 0.04, "use_bias_correction_kl": True, "delta": 1.3, "sapo_temperature_neg": 2.0},
    {"beta": 0.1, "use_bias_correction_kl": False, "num_processes": 2, "train": False, "epsilon_high": 1.5},
]


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
def test_loss_and_incentives_equal_trl(loss_type):
    errs = []
    for k, p in enumerate(PARAM_SETS):
        for on_policy in (True, False):
            lp, mask, old, ref, adv = _case(10 * k + on_policy, on_policy=on_policy, beta=p.get("beta", 0.0))
            n_items = p.get("num_items_in_batch", mask.sum())
            trl_loss, trl_w = _trl(loss_type, p, lp, mask, old, ref, adv, n_items)
            jp = {**p, "num_items_in_batch": n_items}
            ours = float(gl.group_loss(loss_type, jnp.asarray(lp), mask, adv, jnp.asarray(old),
                                       None if ref is None else jnp.asarray(ref), **jp))
            w = np.asarray(gl.token_incentives(loss_type, jnp.asarray(lp), mask, adv, jnp.asarray(old),
                                               None if ref is None else jnp.asarray(ref), **jp))
            assert abs(ours - trl_loss) < TOL, (p, on_policy, ours, trl_loss)
            assert np.abs(w - trl_w).max() < TOL, (p, on_policy)
            errs.append(max(abs(ours - trl_loss), np.abs(w - trl_w).max()))
            # the off-policy cases must actually exercise the ratio: incentives differ from ratio 1's
            # (except cispo with epsilon_high < min ratio ~0.6: TRL clamps every ratio to epsilon_high then)
            if not on_policy and not (loss_type == "cispo" and gl.resolve(**p)["epsilon_high"] < 0.6):
                _, w1 = _trl(loss_type, p, lp, mask, lp, ref, adv, n_items)
                assert np.abs(trl_w - w1).max() > 1e-2 * np.abs(w1).max()


@pytest.mark.parametrize("loss_type", gl.LOSS_TYPES)
def test_rollout_weights_equal_trl_at_ratio_one(loss_type):
    """Per-rollout weights (the closed forms of docs/theory.md) equal TRL's token incentives at ratio 1."""
    lp, mask, old, _, adv = _case(3, B=4, T=7)
    lens = mask.sum(1)
    p = {"max_completion_length": 11, "epsilon_high": 0.5}
    _, trl_w = _trl(loss_type, p, lp, mask, old, None, adv, mask.sum())
    w = gl.rollout_weights(loss_type, adv, lens.astype(int), **p)
    assert np.abs(trl_w - w[:, None] * mask).max() < TOL
    # the closed forms, stated independently of the registry
    B, N = len(lens), lens.sum()
    expected = {"grpo": adv / (B * lens), "sapo": adv / (B * lens), "bnpo": adv / N, "dr_grpo": adv / (B * 11),
                "dapo": adv / N, "vespo": adv / N, "cispo": 0.5 * adv / N, "luspo": adv / B}[loss_type]
    assert np.abs(w - expected).max() < 1e-12


@pytest.mark.parametrize("scale", gl.SCALE_REWARDS)
def test_advantages_match_trl_formula(scale):
    """Advantages with TRL's own `nanstd` (unbiased) and its +1e-4; two groups of 4, one zero-variance."""
    r = np.array([1.0, 0.0, 0.5, 1.0, 0.3, 0.3, 0.3, 0.3])
    A, zero = gl.advantages(r, 4, scale)
    t = torch.tensor(r, dtype=torch.float64)
    mean = t.view(-1, 4).mean(1).repeat_interleave(4)
    std = (nanstd(t.view(-1, 4), dim=1).repeat_interleave(4) if scale != "batch" else nanstd(t).expand_as(t))
    ref = t - mean if scale == "none" else (t - mean) / (std + 1e-4)
    assert np.abs(A - ref.numpy()).max() < 1e-12
    assert zero.tolist() == torch.isclose(std, torch.zeros_like(std)).tolist()
    assert np.all(A[4:] == 0.0)   # the zero-variance group has no advantage
