"""A user-defined loss, kept outside the package (loaded by tests and by `--losses-from`).

RPO-style DPO + NLL (Pang et al. 2024, "Iterative Reasoning Preference Optimization"):
    L = -log sigma(beta D) + alpha * (-l_w / n_w),   D = r_w - r_l.
Named `user_rpo` so that it cannot clash with a built-in.
"""
from entangle_sim import losses

BETA = losses.Hyper("beta", 0.1, "inverse temperature", lo=0.0, lo_open=True)
ALPHA = losses.Hyper("alpha", 1.0, "weight of the token-mean NLL on the chosen response", lo=0.0)


@losses.define("user_rpo", hyperparameters=[BETA, ALPHA], trl="DPOTrainer:sigmoid + rpo_alpha (per-pair form)",
               margin=lambda v, F, *, beta, alpha: beta * (v.r_w - v.r_l),
               nll=lambda v, F, *, beta, alpha: alpha * (-v.chosen_logps / v.chosen_len))
def user_rpo(v, F, *, beta, alpha):
    """RPO: -log sigma(beta D) + alpha * NLL(chosen)"""
    return -F.log_sigmoid(beta * (v.r_w - v.r_l)) + alpha * (-v.chosen_logps / v.chosen_len)
