"""Two deliberately broken loss builders (for tests of `losses.define` and `testing.check_loss`).

Both are written correctly over the backend; what is wrong is the mathematics or the numerics.
"""


def norm_reg_dpo(v, F, *, beta=0.1, lam=0.1):
    """DPO plus a trust-region penalty lam * ||(r_w, r_l)||_2: not differentiable at r_w = r_l = 0,
    the reference, where every run starts (the gradient there is 0/0)."""
    return -F.log_sigmoid(beta * (v.r_w - v.r_l)) + lam * (v.r_w ** 2 + v.r_l ** 2) ** 0.5


def naive_dpo(v, F, *, beta=0.1):
    """DPO written as -log(sigmoid(beta D)): fine at ordinary margins, but sigmoid underflows to 0
    at large negative margins, so the loss is inf there."""
    return -F.log(F.sigmoid(beta * (v.r_w - v.r_l)))
