"""Presets and fixed choices of the experiment layer (the bottom of presets -> experiments ->
plotting -> report -> CLI; this module imports nothing of the package).

Presets: 'tiny' (tests, seconds), 'quick' (< 5 min on 2 cores), 'full' (< 30 min on 2 cores), each
a frozen `Preset`. Builders read it like a mapping (`p["grid"]`, `p.get("r8_all")`), which keeps
the cache keys (a hash of the fields a figure reads) unchanged.

>>> preset("quick")["grid"]
81
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax

SEED = 0

# The six losses of the algorithm comparison: DPO (sigmoid), IPO, R-DPO, DPOP, SimPO, RRHF.
ALGORITHMS = ("sigmoid", "ipo", "rdpo", "dpop", "simpo", "rrhf")
ALGO_LABELS = {"sigmoid": "DPO", "ipo": "IPO", "rdpo": "R-DPO", "dpop": "DPOP", "simpo": "SimPO", "rrhf": "RRHF"}

# One stated pair state for the regime maps (r_w = -1 < 0 so DPOP's penalty is active; the RRHF
# ranking hinge is active because lbar_w = -2.1 < lbar_l = -1.6; n_w != n_l).
MAP_STATE = dict(chosen_logps=-21.0, rejected_logps=-24.0, ref_chosen_logps=-20.0, ref_rejected_logps=-22.0,
                 chosen_len=10.0, rejected_len=15.0, prompt_logps=0.0, prompt_len=0.0)


# The scale sweep (`entangle-sim claims --preset scale`): the paper-like recipe and the SGD control
# ('sgd_scaled': the rate in units of the reference Gram, first order at every size) at growing
# model sizes, 5 seeds each. Width 32 -> 256, depth 2 -> 4, vocabulary 32 -> 256 (the added words are
# neutral prompt words and suffix words; the sentiment words stay 4 + 4). Vocabulary = 12 + n_neutral
# + n_suffix_vocab. Pretraining: more steps for the larger vocabularies (every word of the corpus
# must be seen often enough) and a lower Adam rate for the wider models, chosen so that every size
# ends pretraining with the shared suffix predicted about equally well (the sweep records the final
# pretraining loss and the suffix tokens' log-prob per size).
SCALE_SIZES = (
    ("L2-d32-V32", dict()),
    ("L2-d64-V64", dict(d_model=64, n_neutral=24, n_suffix_vocab=28)),
    ("L4-d128-V128", dict(d_model=128, n_layers=4, n_neutral=56, n_suffix_vocab=60, pretrain_steps=300,
                          pretrain_lr=2e-3)),
    ("L4-d256-V256", dict(d_model=256, n_layers=4, n_neutral=120, n_suffix_vocab=124, pretrain_steps=400,
                          pretrain_lr=1e-3)),
)
# The CPU preset stops at L4-d128-V128: L4-d256-V256 alone would take ~30 CPU-minutes (PO with the
# recorded per-response Jacobians: ~2e13 FLOPs for 2 settings x 15 runs); it is part of the GPU run.
CLAIMS_SCALE = dict(seeds=5, settings=("paper", "sgd_scaled"), base=dict(pretrain_steps=200, po_steps=60),
                    sizes=SCALE_SIZES[:3], budget_gb=6.0)
# The GPT-2-small-like size for one GPU (`entangle-sim claims --preset scale-gpu`): L4-d256-V256 (3.3M
# parameters) and 12 layers x 768, 12 heads, vocabulary 1024 (86.6M parameters; GPT-2 small: 124M, of
# which 39M are its 50k-word embedding), the same recipe, settings and seeds; its claims_scale.json
# joins the CPU sizes in one figure (`--with`). One run per PO call at 86.6M: its recorded Jacobian is
# 32 x 86.6M x 4 B = 11 GB (about 3 copies while it is built). Work, 12 x 768 (6 N FLOPs per trained
# token, 2 N per forward token, N parameters): pretraining 400 x 128 sentences x 21 tokens x 6N x 5
# seeds = 2.8e15; SFT 2 x 30 x 64 x 21 x 6N x 15 runs = 6.3e14; PO 2 settings x 60 steps x 15 runs x
# ~13000 N (32 per-response backward passes, the batch gradient, 2 forward passes, the 32 x 32 Gram)
# = 2.0e15; about 5.5e15 FLOPs in all, 4 min at 25 TFLOP/s (fp32 at ~40% of an H200's 67 TFLOP/s),
# plus compilation: an estimate of 6 to 9 minutes on one H200 (not measured: no GPU was available).
CLAIMS_SCALE_GPU = dict(seeds=5, settings=("paper", "sgd_scaled"), base=dict(pretrain_steps=200, po_steps=60),
                        sizes=(SCALE_SIZES[3],
                               ("L12-d768-V1024", dict(d_model=768, n_layers=12, n_heads=12, n_neutral=504,
                                                       n_suffix_vocab=508, pretrain_steps=400, pretrain_batch=128,
                                                       pretrain_lr=3e-4))),
                        budget_gb=40.0)
# `--scale tiny` of either: two tiny sizes at the tiny preset's step counts (what the tests run).
SCALE_TINY_SIZES = (("L1-d16-V32", dict()), ("L1-d24-V40", dict(d_model=24, n_neutral=12, n_suffix_vocab=16)))
SCALE_TINY_BASE = dict(d_model=16, n_layers=1, n_heads=2, pretrain_steps=4, pretrain_batch=8, sft_steps=2, sft_batch=8,
                       po_steps=3, po_batch=4, n_eval_pairs=3, long_len=5, short_len=2)


@dataclasses.dataclass(frozen=True)
class Preset:
    """Sizes of every figure and report check of one preset (frozen; nested dicts are read-only by
    convention). diag: DiagnoseConfig overrides; mitig: run_comparison arguments; report: check sizes."""

    grid: int
    fig1_pairs: int
    fig1_steps: int
    algo_pairs: int
    algo_steps: int
    lr: float
    suffix_Ls: tuple
    suffix_pairs: int
    suffix_steps: int
    heat_L: int
    sft_steps: int
    diag: dict
    claims: dict
    claims_scale: dict
    mitig: dict
    report: dict

    # mapping view: what the builders and the cache keys read
    def __getitem__(self, key: str) -> Any:
        if key not in self:
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key) -> bool:
        return key in self.keys()

    def __iter__(self):
        return iter(self.keys())

    def keys(self) -> tuple[str, ...]:
        return tuple(f.name for f in dataclasses.fields(self))

    def get(self, key: str, default=None) -> Any:
        return self[key] if key in self else default


PRESETS: dict[str, Preset] = {
    "tiny": Preset(grid=24, fig1_pairs=4, fig1_steps=20, algo_pairs=4, algo_steps=20, lr=0.5,
                   suffix_Ls=(0, 2, 8), suffix_pairs=4, suffix_steps=10, heat_L=4, sft_steps=20,
                   diag=dict(pretrain_steps=3, pretrain_batch=8, sft_steps=2, po_steps=2, log_every=1, n_eval_pairs=4, d_model=16, n_layers=1,
                             n_heads=2, sft_batch=8, po_batch=4, long_len=6),
                   claims=dict(seeds=5, settings=("paper", "from_scratch", "one_pair"),
                               base=dict(d_model=16, n_layers=1, n_heads=2, pretrain_steps=4, pretrain_batch=8,
                                         sft_steps=2, sft_batch=8, po_steps=3, po_batch=4, n_eval_pairs=3,
                                         long_len=5, short_len=2)),
                   claims_scale=dict(seeds=2, settings=("paper", "sgd_scaled"), sizes=SCALE_TINY_SIZES[:1],
                                     base=SCALE_TINY_BASE, budget_gb=None),
                   mitig=dict(settings=("tabular", "lastlayer-short"), methods=("baseline", "normalized", "oracle_mask"),
                              steps=3, pairs=2, sft_steps=0),
                   report=dict(points=64, r15_draws=2000, r17_Ls=(0, 2, 8, 32), r4_pairs=64, r9_draws=32,
                               grams=2000, r19_pairs=200)),
    "quick": Preset(grid=81, fig1_pairs=16, fig1_steps=200, algo_pairs=16, algo_steps=200, lr=0.5,
                    suffix_Ls=(0, 1, 2, 4, 8, 16, 32), suffix_pairs=16, suffix_steps=60, heat_L=8, sft_steps=100,
                    diag=dict(sft_steps=100, po_steps=60, log_every=10, n_eval_pairs=16),
                    claims=dict(seeds=5, settings=("paper", "from_scratch", "sgd", "one_pair"),
                                base=dict(pretrain_steps=200, po_steps=60)),
                    # two small sizes at half the PO steps (about 4 CPU-minutes: estimated from the width-32
                    # size of the scale sweep, 170 CPU-seconds at 60 PO steps)
                    claims_scale=dict(seeds=5, settings=("paper", "sgd_scaled"),
                                      sizes=(("L2-d16-V32", dict(d_model=16)), SCALE_SIZES[0]),
                                      base=dict(pretrain_steps=200, po_steps=30), budget_gb=2.0),
                    mitig=dict(settings=("linear", "lastlayer-long"),
                               methods=("baseline", "normalized", "oracle_mask", "learned_mask"), steps=40, pairs=8,
                               sft_steps=0),
                    report=dict(points=1000, r15_draws=20000, r17_Ls=(0, 1, 2, 4, 8, 16, 32, 64), r4_pairs=256,
                                r9_draws=200, grams=20000, r19_pairs=1000)),
    "full": Preset(grid=201, fig1_pairs=32, fig1_steps=400, algo_pairs=32, algo_steps=400, lr=0.5,
                   suffix_Ls=(0, 1, 2, 4, 8, 16, 32, 64), suffix_pairs=32, suffix_steps=120, heat_L=12, sft_steps=100,
                   diag=dict(),  # DiagnoseConfig defaults
                   # every setting, 5 seeds, the quick sizes (~8 min on 2 cores); the larger CPU sweep,
                   # `claim_stats.run_sweep(claim_stats.SweepConfig(seeds=8))` (300 pretraining and 100 PO
                   # steps, 8 seeds), takes about 25 min
                   claims=dict(seeds=5, settings=("paper", "from_scratch", "sgd", "one_pair", "beta_0.5", "lr_x5",
                                                  "wide", "vocab", "long_24"),
                               base=dict(pretrain_steps=200, po_steps=60)),
                   # the two smallest sizes of the CLI's scale preset (`entangle-sim claims --preset scale`
                   # adds L4-d128-V128, which takes as long as the two)
                   claims_scale=dict(CLAIMS_SCALE, sizes=SCALE_SIZES[:2]),
                   mitig=dict(settings=("tabular", "linear", "lastlayer-1t", "lastlayer-short", "lastlayer-long",
                                        "transformer-long"),
                              methods=("baseline", "normalized", "normalized_batch", "oracle_mask", "learned_mask",
                                       "dpop", "nll"), steps=40, pairs=8, sft_steps=150),
                   report=dict(points=5000, r15_draws=20000, r8_all=True, r17_Ls=(0, 1, 2, 4, 8, 16, 32, 64),
                               r4_pairs=1024, r9_draws=500, grams=100000, r19_pairs=1000)),
}


def preset(name: str) -> Preset:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; valid: {', '.join(PRESETS)}")
    return PRESETS[name]


def enable_x64() -> None:
    """Float64 for every check and figure (first-order predictions are compared to ~1e-10)."""
    jax.config.update("jax_enable_x64", True)


# The claim sweep at a larger model size for one GPU (`entangle-sim claims --preset gpu`): a 6-layer,
# width-384 decoder (about 11M parameters), every setting, 8 seeds, 8 pairs per batch (the recorded
# per-response Jacobian of 24 vmapped runs at width 768 is then ~65 GB). `--scale tiny` swaps in the tiny
# preset's model and step counts (what the tests run on CPU).
CLAIMS_GPU = dict(seeds=8, settings=("paper", "from_scratch", "sgd", "one_pair", "beta_0.5", "lr_x5", "wide", "vocab",
                                     "long_24"),
                  base=dict(d_model=384, n_layers=6, n_heads=6, pretrain_steps=600, pretrain_batch=128, sft_steps=30,
                            po_steps=100, po_batch=8, n_eval_pairs=32))

