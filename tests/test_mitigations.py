"""entangle_sim.mitigations: R19 trainer, R20 masks, preconditioned and batch Grams (float64)."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from entangle_sim import data, geometry, mitigations as M, regimes


@pytest.fixture(scope="module")
def toy():
    # R7 'both down' initial condition: nearly parallel gradients, rejected norm 2x the chosen one
    gp = data.geometry_pairs(jax.random.PRNGKey(0), "linear", 4, K=5, target_cos=0.9, norm_ratio=2.0, d=4)
    return gp.policy(), gp.params, gp.batch


def test_normalized_per_pair_guarantee_and_baseline_failure(toy):
    """R19 in simulation: each pair trained alone (no cross-pair terms), lr = 0.05, 5 steps. The one-pair
    prediction AND the realised change are ideal on every (step, pair) for 'normalized', while DPO is
    in 'both down' on every one (R7). Also: the recorded batch prediction eta J J~^T c equals the first
    order of the actual SGD update J.dtheta (1e-12: same products, different association)."""
    pol, params, batch = toy
    out = {}
    for m in ("baseline", "normalized"):
        cfg = M.MitigationConfig(method=m, lr=0.05, steps=5)
        rec = jax.tree.map(np.asarray, M.train_per_pair(pol, params, batch, cfg, jax.random.PRNGKey(1)))
        np.testing.assert_allclose(rec.batch_pred_chosen, rec.lin_chosen, rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(rec.batch_pred_rejected, rec.lin_rejected, rtol=1e-12, atol=1e-15)
        out[m] = regimes.classify(rec.real_chosen, rec.real_rejected)
        if m == "normalized":
            assert np.all(regimes.classify(rec.pair_pred_chosen, rec.pair_pred_rejected) == regimes.CHOSEN_UP_REJECTED_DOWN)
    assert np.all(out["normalized"] == regimes.CHOSEN_UP_REJECTED_DOWN)
    assert np.all(out["baseline"] == regimes.BOTH_DOWN)


def test_surrogate_gradient_is_the_normalized_formula(toy):
    """The surrogate's jax.grad equals -sum_i w_i s_i (g_w/|g_w| - g_l/|g_l|) with s = sigma(-beta z) (DPO),
    per-pair gradients from vmap(grad): first SGD update = lr * that direction (1e-12)."""
    pol, params, batch = toy
    cfg = M.MitigationConfig(method="normalized", lr=0.1, steps=1)
    init, step = M.make_mitigation_step(pol, params, batch, cfg)
    (th1, *_), _ = jax.jit(step)(init(), jax.random.PRNGKey(0))
    per_ex = jax.jit(jax.vmap(lambda ex: jax.jacrev(lambda p: jnp.stack(
        [u[0] for u in pol.logps(p, jax.tree.map(lambda a: a[None], ex))]))(params)))   # [B, 2, P], one compile
    G = per_ex(batch)
    gw, gl = G[:, 0], G[:, 1]
    s = jax.nn.sigmoid(-0.0) * jnp.ones(4)   # z = 0 at the reference
    direction = ((s / jnp.linalg.norm(gw, axis=1))[:, None] * gw - (s / jnp.linalg.norm(gl, axis=1))[:, None] * gl).mean(0)
    np.testing.assert_allclose(th1 - params, 0.1 * direction, rtol=1e-12, atol=1e-15)


def test_adam_preconditioner_matches_first_adam_step(toy):
    """At Adam's first step mu_hat = g, so the update is -lr P g with P = adam_preconditioner(state) (1e-12)."""
    pol, params, batch = toy
    g = jax.jit(jax.grad(lambda p: -jax.nn.log_sigmoid(0.1 * (lambda u: u[0] - u[1])(pol.logps(p, batch))).mean()))(params + 0.3)
    opt = optax.inject_hyperparams(optax.adam)(learning_rate=0.01)
    upd, st = opt.update(g, opt.init(params), params)
    np.testing.assert_allclose(upd, -0.01 * M.adam_preconditioner(st) * g, rtol=1e-12)


def test_preconditioned_gram_matches_batch_gram_and_pair_gram(toy):
    """P = 1 reproduces geometry.pair_gram; a random diagonal P gives the own-pair 2x2 blocks of
    J P J^T from batch_gram (1e-12)."""
    pol, params, batch = toy
    theta = params + 0.2
    ones = jnp.ones_like(theta)
    pgram = jax.jit(M.preconditioned_gram, static_argnums=0)   # one compilation, reused for both P
    pg, ref = pgram(pol.logps, theta, batch, ones), jax.jit(geometry.pair_gram, static_argnums=0)(pol.logps, theta, batch)
    np.testing.assert_allclose([pg.G_ww, pg.G_wl, pg.G_ll], [ref.G_ww, ref.G_wl, ref.G_ll], rtol=1e-12)
    P = jnp.array([0.5, 2.0, 1.0, 3.0])
    pg = pgram(pol.logps, theta, batch, P)
    G = jax.jit(M.batch_gram, static_argnums=0)(pol.logps, theta, batch, P)
    i = jnp.arange(4)
    np.testing.assert_allclose([pg.G_ww, pg.G_wl, pg.G_ll], [G[i, i], G[i, i + 4], G[i + 4, i + 4]], rtol=1e-12)


def test_tabular_has_no_cross_pair_terms():
    """Tabular pairs live on their own prompt rows, so G's cross-pair blocks are exactly 0 and the batch
    prediction equals the one-pair prediction (flip rate exactly 0)."""
    gp = data.geometry_pairs(jax.random.PRNGKey(2), "softmax", 4, K=5, target_cos=-0.3, norm_ratio=1.5)
    G = jax.jit(M.batch_gram, static_argnums=0)(gp.policy().logps, gp.params, gp.batch)
    dL = jnp.array([-0.5] * 4 + [0.5] * 4)
    np.testing.assert_array_equal(M.batch_first_order(G, dL, 0.1), M.one_pair_first_order(G, dL, 0.1))


def test_oracle_masks_shared_suffix():
    """Only the first (contrastive) token is kept for the shared-suffix task; padding is 0."""
    batch = data.shared_suffix(jax.random.PRNGKey(0), 3, K=6, L=3, pad=1)
    m_w, m_l = M.oracle_masks(batch)
    np.testing.assert_array_equal(m_w, np.array([[1, 0, 0, 0, 0]] * 3))
    np.testing.assert_array_equal(m_l, m_w)


@pytest.fixture(scope="module")
def suffix_setting():
    """lastlayer-short (3 pairs) with its hidden-state features, shared by the R20 tests."""
    return M.build_setting("lastlayer-short", jax.random.PRNGKey(0), pairs=3, with_features=True)


def test_oracle_mask_gradient_is_masked_token_sum(suffix_setting):
    """R20: the oracle-mask DPO step on a lastlayer suffix task moves theta by
    lr * beta * s * mean_i (g_1(y_w,i) - g_1(y_l,i)) (first token only), s = 1/2 at the reference (1e-12)."""
    pol, params, batch, _ = suffix_setting
    cfg = M.MitigationConfig(method="oracle_mask", lr=0.3, steps=1, record=False)
    init, step = M.make_mitigation_step(pol, params, batch, cfg)
    (th1, *_), _ = jax.jit(step)(init(), jax.random.PRNGKey(0))
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    first = lambda f: (lambda tw, tl: (tw[:, 0] - tl[:, 0]).mean())(*pol.token_logps(unravel(f), batch))
    np.testing.assert_allclose(th1 - flat, 0.3 * 0.1 * 0.5 * jax.jit(jax.grad(first))(flat), rtol=1e-12, atol=1e-15)


@pytest.mark.parametrize("method", ["learned_mask", "feature_mask"])
def test_learned_masks_start_at_init_and_stay_in_unit_interval(suffix_setting, method):
    """Both learned R20 masks (free logits; m_t = sigmoid(v . h_t + c) from the token's hidden state)
    start at sigmoid(mask_init) on real tokens (0 on padding), stay in [0, 1], and the l1 penalty
    moves them (the feature mask through v and c). Summaries: mask stats vs the oracle are reported."""
    pol, params, batch, feats = suffix_setting
    rec = M.train_mitigation(pol, params, batch, M.MitigationConfig(method=method, lr=0.3, steps=3, mask_l1=0.1,
                                                                     mask_lr=1.0), jax.random.PRNGKey(0), feats)
    np.testing.assert_allclose(rec.mask_w[0], jax.nn.sigmoid(2.0) * batch.chosen_mask, rtol=1e-12)
    np.testing.assert_allclose(rec.mask_l[0], jax.nn.sigmoid(2.0) * batch.rejected_mask, rtol=1e-12)
    m = np.asarray(rec.mask_w)
    assert np.all((m >= 0) & (m <= 1)) and np.all(m[-1][np.asarray(batch.chosen_mask) > 0] < jax.nn.sigmoid(2.0))
    s = M.summarize(rec, batch)
    assert 0 <= s["ideal_fraction"] <= 1 and np.isnan(s["sgd_vs_precond_flip"]) and not s["diverged"]
    assert 0 < s["mask_off_oracle"] < 1 and 0 < s["mask_on_oracle"] < 1
    if method == "feature_mask":
        with pytest.raises(ValueError, match="features"):
            M.make_mitigation_step(pol, params, batch, M.MitigationConfig(method=method))


def test_calibrated_lr_and_divergence_flag(toy):
    """calibrate_lr: the baseline's first SGD step at that lr changes the log-probs by `target` on average
    (mean |lin_*| of the recorded first step = 0.05, 1e-12: first order of the real update). summarize
    flags a non-finite run as diverged."""
    pol, params, batch = toy
    lr = M.calibrate_lr(pol, params, batch, target=0.05)
    rec = M.train_mitigation(pol, params, batch, M.MitigationConfig(method="baseline", lr=lr, steps=2),
                             jax.random.PRNGKey(0))
    first = np.abs(np.concatenate([np.asarray(rec.lin_chosen[0]), np.asarray(rec.lin_rejected[0])]))
    np.testing.assert_allclose(first.mean(), 0.05, rtol=1e-12)
    s = M.summarize(rec)
    assert not s["diverged"] and 0 < s["max_step_change"] < 1
    bad = rec._replace(real_chosen=np.asarray(rec.real_chosen).copy())
    bad.real_chosen[-1, 0] = np.nan
    assert M.summarize(bad)["diverged"]


def test_config_validation():
    with pytest.raises(ValueError, match="unknown mitigation"):
        M.MitigationConfig(method="nope")
    with pytest.raises(ValueError):
        M.MitigationConfig(weight="half")
    assert M.MitigationConfig(method="dpop").effective_loss == "dpop"
    with pytest.raises(TypeError, match="unexpected"):
        M.MitigationConfig(lrate=0.1)


def test_config_holds_the_train_config():
    """MitigationConfig holds a TrainConfig: its fields are keywords and properties, validated by
    TrainConfig; 'dpop' swaps in the DPOP loss (beta kept) for the trainer."""
    from entangle_sim.train import TrainConfig
    tc = TrainConfig(loss="sigmoid", loss_params=(("beta", 0.2),), optimizer="momentum", lr=0.05, steps=7, momentum=0.5)
    cfg = M.MitigationConfig.from_train_config(tc, "dpop", dpop_lambda=5.0)
    assert cfg.train == tc and (cfg.lr, cfg.steps, cfg.momentum, cfg.loss) == (0.05, 7, 0.5, "sigmoid")
    assert cfg.effective_train.loss == "dpop"
    assert dict(cfg.effective_train.loss_params) == {"beta": 0.2, "dpop_lambda": 5.0}
    assert M.MitigationConfig(method="nll", lr=0.05, steps=7, loss_params=(("beta", 0.2),), optimizer="momentum",
                              momentum=0.5).train == tc
    with pytest.raises(ValueError, match="lr"):
        M.MitigationConfig(lr=0.0)


def test_cli_writes_table_json_and_figure(capsys, tmp_path):
    """`entangle-sim mitigate` (registered) prints the rows (--json), and --out DIR writes the markdown
    table, strict JSON rows and the comparison figure."""
    import json
    from entangle_sim.cli import main
    out = tmp_path / "res"
    rc = main(["mitigate", "--settings", "tabular", "--methods", "baseline", "--steps", "2", "--pairs", "2",
               "--json", "--out", str(out)])
    assert rc == 0
    rows = json.loads(capsys.readouterr().out)
    assert rows[0]["setting"] == "tabular" and rows[0]["ideal_fraction"] == 1.0   # R15: tabular is always Case 1
    assert rows[0]["lr_rule"].startswith("auto") and rows[0]["diverged"] is False
    assert rows[0]["sgd_vs_precond_flip"] is None                                  # NaN -> null (no Adam)
    assert json.loads((out / "mitigations.json").read_text(), parse_constant=lambda c: 1 / 0) == rows
    md = (out / "mitigations.md").read_text().splitlines()
    assert md[0].startswith("| setting | method |") and md[2].startswith("| tabular | baseline |")
    assert (out / "mitigations.png").stat().st_size > 0


def test_cli_param_is_the_loss_hyperparameter(capsys):
    """`mitigate --param beta=0.3` reaches the loss: DPO's first-step gradient at the reference is
    beta sigma(0) (g_w - g_l), so the calibrated lr (target / first-step scale) is 1/3 of the
    beta = 0.1 one (1e-12 relative)."""
    import json
    from entangle_sim.cli import main
    lrs = []
    for extra in ([], ["--param", "beta=0.3"]):
        assert main(["mitigate", "--settings", "tabular", "--methods", "baseline", "--steps", "1", "--pairs", "2",
                     "--json", *extra]) == 0
        lrs.append(json.loads(capsys.readouterr().out)[0]["lr"])
    np.testing.assert_allclose(lrs[1], lrs[0] / 3, rtol=1e-12)


@pytest.mark.parametrize("argv, msg", [(["--steps", "0"], "--steps"), (["--lr", "-1"], "--lr"),
                                       (["--loss", "nope"], "unknown loss"), (["--mask-l1", "-0.5"], "--mask-l1"),
                                       (["--settings", "moon"], "invalid choice"),
                                       (["--param", "nope=1"], "no hyperparameter 'nope'"),
                                       (["--param", "beta=-1"], "out of range"),
                                       (["--feature-lr", "0"], "--feature-lr")])
def test_cli_bad_input_one_line_exit_2(capsys, tmp_path, argv, msg):
    from entangle_sim.cli import main
    assert main(["mitigate", *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("entangle-sim: error:") and msg in err


def _one_step(pol, params, batch, cfg, key, feats=None):
    init, step = M.make_mitigation_step(pol, params, batch, cfg, feats)
    state0 = init()
    state1, rec = jax.jit(step)(state0, key)
    return state0, state1, rec


def test_plugin_steps_match_brute_force_formulas(toy):
    """Each loss-changing plug-in, one SGD step from the reference on the linear toy, against an
    independent jax.grad of the formula written out here (1e-12 relative: same gradient, different
    association): 'nll' = DPO + alpha token-mean NLL; 'dpop' = the DPOP formula
    -log sigma(beta (r_w - r_l - lambda max(0, -r_w))); 'normalized_batch' on a minibatch of 2
    (the pairs `jax.random.choice` draws from the step key) = s_bar (u_w/|u_w| - u_l/|u_l|),
    u = sum_i w_i s_i g_i, s = sigma(0) at the reference, per-pair gradients by vmap(grad)."""
    pol, params, batch = toy
    lp = lambda p: pol.logps(p, batch)
    ref = lp(params)
    nw = batch.chosen_len
    key = jax.random.PRNGKey(3)

    def sgd_target(loss):
        return params - 0.1 * jax.grad(loss)(params)

    beta, alpha, lam = 0.1, 0.7, 5.0

    def nll(p):
        lw, ll = lp(p)
        z = beta * ((lw - ref[0]) - (ll - ref[1]))
        return (-jax.nn.log_sigmoid(z) + alpha * (-lw / nw)).mean()

    def dpop(p):
        lw, ll = lp(p)
        rw, rl = lw - ref[0], ll - ref[1]
        return (-jax.nn.log_sigmoid(beta * (rw - rl - lam * jnp.maximum(0.0, -rw)))).mean()

    for method, loss, kw in (("nll", nll, {"nll_alpha": alpha}), ("dpop", dpop, {"dpop_lambda": lam})):
        (_, _, _), (th1, _, _), _ = _one_step(pol, params, batch, M.MitigationConfig(method=method, lr=0.1, steps=1, **kw), key)
        np.testing.assert_allclose(th1, sgd_target(loss), rtol=1e-12, atol=1e-15)

    cfg = M.MitigationConfig(method="normalized_batch", lr=0.1, steps=1, batch_size=2)
    (_, _, _), (th1, _, _), rec = _one_step(pol, params, batch, cfg, key)
    idx = jax.random.choice(key, 4, (2,), replace=False)
    w = jnp.zeros(4).at[idx].set(0.5)
    G = jax.vmap(lambda ex: jax.jacrev(lambda p: jnp.stack([u[0] for u in pol.logps(p, jax.tree.map(lambda a: a[None], ex))]))(params))(batch)
    s = w * jax.nn.sigmoid(0.0)
    u_w, u_l = G[:, 0].T @ s, G[:, 1].T @ s
    direction = s.sum() * (u_w / jnp.linalg.norm(u_w) - u_l / jnp.linalg.norm(u_l))
    np.testing.assert_allclose(th1 - params, 0.1 * direction, rtol=1e-12, atol=1e-15)
    # the records: only the drawn pairs carry a one-pair prediction; the batch one is the SGD step
    pp = np.asarray(rec.pair_pred_chosen)
    assert np.all(pp[np.setdiff1d(np.arange(4), np.asarray(idx))] == 0) and np.all(pp[np.asarray(idx)] != 0)
    np.testing.assert_allclose(rec.batch_pred_chosen, rec.lin_chosen, rtol=1e-12, atol=1e-15)


def test_learned_mask_step_matches_brute_force(suffix_setting):
    """'learned_mask', one SGD step: theta moves by -lr grad_theta and the mask logits u by
    -mask_lr grad_u of mean_i DPO(l~_w, l~_l) + l1 mean_i sum_t m_t, with l~ = sum_t m_t l_t for
    the policy AND the reference, m = sigmoid(u) * padding mask; written out here with jax.grad
    (1e-12 relative)."""
    pol, params, batch, _ = suffix_setting
    cfg = M.MitigationConfig(method="learned_mask", lr=0.3, steps=1, mask_l1=0.1, mask_lr=2.0, record=False)
    (th0, u0, _), (th1, u1, _), _ = _one_step(pol, params, batch, cfg, jax.random.PRNGKey(0))
    from jax.flatten_util import ravel_pytree
    flat, unravel = ravel_pytree(params)
    ref_w, ref_l = pol.token_logps(params, batch)

    def objective(f, u):
        m_w = jax.nn.sigmoid(u[0]) * batch.chosen_mask
        m_l = jax.nn.sigmoid(u[1]) * batch.rejected_mask
        tw, tl = pol.token_logps(unravel(f), batch)
        z = 0.1 * (((m_w * tw).sum(-1) - (m_w * ref_w).sum(-1)) - ((m_l * tl).sum(-1) - (m_l * ref_l).sum(-1)))
        return (-jax.nn.log_sigmoid(z)).mean() + 0.1 * (m_w.sum(-1) + m_l.sum(-1)).mean()

    g_f, g_u = jax.jit(jax.grad(objective, argnums=(0, 1)))(flat, u0)
    np.testing.assert_allclose(th1, flat - 0.3 * g_f, rtol=1e-12, atol=1e-15)
    for a, b, g in zip(u1, u0, g_u):
        np.testing.assert_allclose(a, b - 2.0 * g, rtol=1e-12, atol=1e-15)
