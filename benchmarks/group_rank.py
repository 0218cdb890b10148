"""Effective rank of diag(|w|)^1/2 K diag(|w|)^1/2 on small random-init GPT-2 models (a measurement, not a
speed claim): `python benchmarks/group_rank.py` prints one line per (model, data set).

Models: `tiny_model("gpt2")` at width 32 and 64 (2 layers, random init); data: `toy_rollout_rows` with
independent completions and with completions sharing a 4-word stem (8 groups of G = 8, grpo weights).
"""
import numpy as np

from entangle_sim.torch.rollouts import diagnose_rollouts
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rollout_rows


def main():
    tok = tiny_tokenizer()
    for width in (32, 64):
        model = tiny_model("gpt2", tok, width=width, layers=2, seed=0)
        n = sum(p.numel() for p in model.parameters())
        for shared in (False, True):
            d = diagnose_rollouts(model, tok, toy_rollout_rows(8, 8, seed=0, shared_stem=shared), loss_type="grpo")
            gs = [g for g in d["groups"] if not g["zero_variance"]]
            r = np.array([g["effective_rank"] for g in gs])
            top = np.mean([g["eigenvalues"][0] / sum(g["eigenvalues"]) for g in gs])
            o = d["overall"]
            print(f"gpt2 width {width} ({n} params), {'shared stem' if shared else 'independent'}: effective rank "
                  f"mean {r.mean():.2f} (min {r.min():.2f}, max {r.max():.2f}) of G = 8; top eigenvalue share "
                  f"{top:.2f}; correct predicted to fall {o['n_correct_fall']}/{o['n_correct']}")


if __name__ == "__main__":
    main()
