"""Cost model of the geometry paths (geometry_cost) against XLA's own cost and memory analysis of the
compiled paths, and the auto path selection it drives."""
import jax
import numpy as np
import pytest

from entangle_sim import geometry as geo
from entangle_sim import geometry_cost as gc
from entangle_sim.policies import transformer as tr
from entangle_sim.types import PairBatch

# Stated accuracy of the model (derived from its approximations: elementwise FLOPs of LayerNorm,
# GELU and softmax are rough per-element constants, and XLA fuses/reuses buffers): FLOPs within 25%
# of XLA's count; peak bytes within a factor [1/4, 2] of XLA's temp allocation.
FLOP_RANGE = (0.8, 1.25)
BYTES_RANGE = (0.25, 2.0)


def batch_of(B, P, T, V, seed=1):
    k = jax.random.split(jax.random.key(seed), 3)
    ones = np.ones((B, T))
    return PairBatch(jax.random.randint(k[0], (B, P), 0, V), jax.random.randint(k[1], (B, T), 0, V),
                     jax.random.randint(k[2], (B, T), 0, V), ones, ones)


def compiled(path, cfg, policy, params, b):
    method, fn = {
        "seq_vmap": ("pair_vmap", policy.logps),
        "seq_layerwise": ("pair_layerwise", tr.grad_factors(cfg)),
        "token_factored": ("token_factored", tr.token_grad_factors(cfg)),
        "token_jacrev": ("token_jacrev", policy.token_logps),
    }[path]
    c = geo.gram_program(method, fn, params, b).compile()
    return c.cost_analysis()["flops"], c.memory_analysis().temp_size_in_bytes


@pytest.mark.parametrize("D,L,V,P,T", [(32, 2, 40, 4, 8), (48, 1, 300, 3, 6)])
def test_cost_model_matches_xla(D, L, V, P, T):
    cfg = tr.TransformerConfig(vocab=V, d_model=D, n_layers=L, n_heads=4, max_len=P + T)
    policy = tr.make(cfg)
    params = policy.init(jax.random.key(0))   # float64 under the test config: 8 bytes
    B = 2
    b = batch_of(B, P, T, V)
    model = gc.transformer_costs(cfg, P, T, dtype_bytes=8)
    for path in gc.PATHS:
        flops, temp = compiled(path, cfg, policy, params, b)
        r_f, r_b = flops / B / model[path].flops, temp / B / model[path].bytes
        assert FLOP_RANGE[0] <= r_f <= FLOP_RANGE[1], (path, r_f)
        assert BYTES_RANGE[0] <= r_b <= BYTES_RANGE[1], (path, r_b)


def test_layerwise_break_even():
    """The layer-wise identity pays when S << m n / (m + n): wide & short favours it, narrow & long not."""
    wide = gc.transformer_costs(tr.TransformerConfig(vocab=50, d_model=256, n_layers=1, max_len=20), 4, 8)
    narrow = gc.transformer_costs(tr.TransformerConfig(vocab=50, d_model=8, n_heads=2, n_layers=1, max_len=200), 100, 100)
    assert wide["seq_layerwise"].flops < wide["seq_vmap"].flops
    assert narrow["seq_layerwise"].flops > narrow["seq_vmap"].flops


@pytest.mark.parametrize("D,P,T,want", [(64, 4, 8, "layerwise"), (8, 40, 40, "vmap")])
def test_auto_selection_agrees_with_xla(D, P, T, want):
    cfg = tr.TransformerConfig(vocab=20, d_model=D, n_heads=2, n_layers=1, max_len=P + T)
    policy = tr.make(cfg)
    params = policy.init(jax.random.key(0))
    b = batch_of(2, P, T, 20)
    side = (b.prompt[0], b.chosen[0], b.chosen_mask[0])
    got = gc.choose_seq_method(tr.grad_factors(cfg), params, side)
    xla = {m: compiled(f"seq_{m}", cfg, policy, params, b)[0] for m in ("vmap", "layerwise")}
    assert got == want == min(xla, key=xla.get)
    # and the auto pair_gram returns the same numbers as the vmap path (1e-10: round-off only)
    auto = geo.pair_gram(policy.logps, params, b, factor_fn=tr.grad_factors(cfg))
    ref = geo.pair_gram(policy.logps, params, b, method="vmap")
    np.testing.assert_allclose(auto.G_wl, ref.G_wl, rtol=1e-10, atol=1e-10 * np.abs(ref.G_ww).max())
    # token level: the generic (shape-only) choice agrees with XLA's count too
    ex = jax.tree.map(lambda a: a[0], b)
    xla = {m: compiled(f"token_{m}", cfg, policy, params, b)[0] for m in ("jacrev", "factored")}
    assert gc.choose_token_method(tr.token_grad_factors(cfg), params, ex) == min(xla, key=xla.get)


def test_generic_shapes_from_factors():
    """Shape-only path (any factor function): its matmul count equals the transformer's exact list
    minus the attention / elementwise extra, which it cannot see."""
    cfg = tr.TransformerConfig(vocab=30, d_model=16, n_heads=2, n_layers=2, max_len=12)
    params = tr.init(cfg, jax.random.key(0))
    ex = jax.tree.map(lambda a: a[0], batch_of(1, 4, 5, 30))
    sw, _ = gc.shapes_from_factors(tr.token_grad_factors(cfg), params, ex)
    exact = gc.transformer_shapes(cfg, 4, 5)
    mm = lambda s: sum(u.S * u.m * u.n for u in s.uses if u.kind != "gather")   # noqa: E731
    assert mm(sw) == mm(exact) and sw.n_params == exact.n_params == cfg.n_params and sw.T == 5
    assert sw.n_small == exact.n_small


def test_pair_gram_method_errors():
    cfg = tr.TransformerConfig(vocab=20, d_model=8, n_heads=2, n_layers=1, max_len=12)
    policy = tr.make(cfg)
    params, b = policy.init(jax.random.key(0)), batch_of(2, 4, 4, 20)
    with pytest.raises(ValueError, match="factor_fn"):
        geo.pair_gram(policy.logps, params, b, method="layerwise")
    with pytest.raises(ValueError, match="method"):
        geo.pair_gram(policy.logps, params, b, method="loop")
