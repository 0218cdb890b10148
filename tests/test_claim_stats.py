"""The paper's transformer claims as statistics: corpus and pretraining, the padded mode batches, the
Wilson interval, the attribution chain, the attribution identities on real runs, the CLI and the report."""
import contextlib
import dataclasses
import io
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from entangle_sim import claim_stats as cs
from entangle_sim import corpus, reproduce, sentiment
from entangle_sim.cli import main
from entangle_sim.diagnose import DiagnoseConfig
from entangle_sim.policies import transformer

TINY = dict(d_model=16, n_layers=1, n_heads=2, pretrain_steps=4, pretrain_batch=8, sft_steps=2, sft_batch=8,
            po_steps=3, po_batch=4, n_eval_pairs=3, long_len=5, short_len=2)


def test_corpus_sentences_follow_the_grammar():
    s = sentiment.SentimentConfig(mode="long", long_len=6, short_len=3)
    c = corpus.CorpusConfig(p_noise=0.0)
    b = corpus.sentences(s, c, jax.random.key(0), 400)
    rows, lengths = corpus.phrases(s, c)
    np.testing.assert_array_equal(rows[0], sentiment.suffix(s))                                   # phrase 0 = long suffix
    np.testing.assert_array_equal(rows[1, :3], sentiment.suffix(dataclasses.replace(s, mode="short")))
    resp = np.asarray(b.chosen)
    P = s.prompt_len
    assert set(np.unique(resp[:, P - 1])) <= {sentiment.POS, sentiment.NEG}                       # the SENT slot
    phrase = resp[:, P:]
    # without noise, every phrase is one of the fixed phrases (padding where the mask is 0)
    match = (phrase[:, None, :] == np.asarray(rows)[None]).all(-1)
    assert match.any(1).all()
    # phrase k is drawn with probability (1/(k+1)) / H_n: 400 draws, 4.5 binomial standard errors
    p0 = 1.0 / sum(1.0 / (k + 1) for k in range(c.n_phrases))
    f0 = match[:, 0].mean()
    assert abs(f0 - p0) < 4.5 * math.sqrt(p0 * (1 - p0) / 400)
    np.testing.assert_array_equal(np.asarray(b.chosen_mask)[:, P:].sum(1), np.asarray(lengths)[match.argmax(1)])


def test_pretraining_makes_the_shared_suffix_probable():
    """The point of the pretraining stage: before SFT the model predicts the carrier phrase that is
    the shared suffix. After pretraining the mean log-prob of suffix tokens 2.. (the phrase's first
    token carries the choice among phrases) is above log(0.5); from scratch it is about -log(V)."""
    cfg = DiagnoseConfig(d_model=32, n_layers=1, long_len=6)
    s = dataclasses.replace(cfg.sentiment, mode="long")
    policy = transformer.make(cfg.transformer)
    p0 = policy.init(jax.random.key(0))
    p1, losses = jax.jit(lambda p: corpus.pretrain(policy, p, s, cfg.corpus, jax.random.key(1), steps=250,
                                                   lr=3e-3, batch=32))(p0)
    assert float(losses[-1]) < float(losses[0]) - 1.0
    pairs = sentiment.preference_pairs(s, jax.random.key(2), 64)

    def suffix_logp(p):
        tok_w, _ = policy.token_logps(p, pairs)
        return float(jnp.mean(tok_w[:, 2:]))

    assert suffix_logp(p1) > math.log(0.5)
    assert suffix_logp(p0) < -2.0          # uniform over V = 32 words would be -3.47


@pytest.mark.parametrize("mode", sentiment.MODES)
def test_mode_batches_equal_the_padded_datasets(mode):
    c = sentiment.SentimentConfig(mode="long")
    pairs, sft = sentiment.mode_batches(c, jax.random.key(3), 6, sentiment.MODES.index(mode))
    want = dataclasses.replace(c, mode=mode, response_len=1 + c.long_len)
    for got, ref in zip(pairs, sentiment.preference_pairs(want, jax.random.key(3), 6)):
        np.testing.assert_array_equal(got, ref)
    for got, ref in zip(sft, sentiment.sft_data(want, jax.random.key(3), 6)):
        np.testing.assert_array_equal(got, ref)


@pytest.mark.parametrize("k,n", [(0, 5), (3, 5), (5, 5), (7, 8), (1, 20), (13, 40)])
def test_wilson_interval_solves_the_score_equation(k, n):
    """The Wilson endpoints are the two roots p of (k/n - p)^2 = z^2 p (1 - p) / n (checked by
    substitution, float64: 1e-12), and contain k/n."""
    z = 1.96
    lo, hi = cs.wilson(k, n, z)
    for p in (lo, hi):
        assert (k / n - p) ** 2 == pytest.approx(z * z * p * (1 - p) / n, abs=1e-12)
    assert lo <= k / n <= hi and (lo < hi)


def _run(**levels):
    base = {f"{lv}_{s}": 0.0 for lv in cs.LEVELS for s in "wl"}
    base.update(cos_reference=-0.5, cos_final=-0.5, tok_contrast_reference=-0.5, tok_contrast_final=-0.5,
                tok_shared_max_reference=0.95, tok_shared_max_final=0.95)
    return {"1t": {**base, **levels.get("1t", {})}, "short": {**base, **levels.get("short", {})},
            "long": {**base, **levels.get("long", {})}}


def test_attribution_names_the_first_level_that_breaks_the_claim():
    up = {f"{lv}_w": 1.0 for lv in cs.LEVELS}
    ev = cs.evaluate(_run(**{"1t": up}))
    assert ev["1t-chosen"] == {"holds": True, "failed_at": None, "term": None}
    for broken, term in (("one", "one-pair theory"), ("batch", "cross-pair terms"), ("lin", "Adam preconditioning"),
                         ("real", "second-order remainder"), ("eval", "held-out pairs")):
        i = cs.LEVELS.index(broken)
        run = {f"{lv}_w": (1.0 if j < i else -1.0) for j, lv in enumerate(cs.LEVELS)}
        e = cs.evaluate(_run(**{"1t": run}))["1t-chosen"]
        assert e == {"holds": False, "failed_at": broken, "term": term}
    # geometric claims: holds at the reference, broken by training
    e = cs.evaluate(_run(**{"1t": {"cos_final": 0.2}}))["1t-cos"]
    assert e["failed_at"] == "final" and e["term"] == "training moved the geometry"
    e = cs.evaluate(_run(**{"1t": {"cos_reference": 0.1, "cos_final": 0.2}}))["1t-cos"]
    assert e["term"] == "model geometry"
    # suffix-chosen needs short < 0 and long < short
    sfx = {"short": {f"{lv}_w": -1.0 for lv in cs.LEVELS}, "long": {f"{lv}_w": -2.0 for lv in cs.LEVELS}}
    assert cs.evaluate(_run(**sfx))["suffix-chosen"]["holds"]
    sfx["long"]["lin_w"] = -0.5                     # a level that breaks it, but the claim holds: no attribution
    assert cs.evaluate(_run(**sfx))["suffix-chosen"]["term"] is None
    sfx["long"].update(real_w=-0.5, eval_w=-0.5)    # now it fails, first at 'lin'
    assert cs.evaluate(_run(**sfx))["suffix-chosen"]["term"] == "Adam preconditioning"


def test_attribution_identities_on_real_runs():
    """On real tiny-transformer runs (float64): with one pair per batch the one-pair prediction IS the
    batch prediction (no cross-pair term), and under SGD the batch prediction IS the first order of the
    real update (no preconditioning). Both to 1e-9 relative (sums of float64 contractions of
    O(1) Gram entries). The remainder real - lin is second order: at a 4x smaller rate it shrinks
    about 16x (checked: at least 8x, so noise in the ratio cannot pass a first-order remainder)."""
    def runs(lr):
        cfg = dataclasses.replace(DiagnoseConfig(**TINY), optimizer="sgd", po_batch=1, po_lr=lr, po_steps=2)
        with jax.enable_x64(True):
            return cs.run_setting(cfg, 2)

    r1, r4 = runs(0.2), runs(0.05)
    rem = {}
    for tag, rs in (("1", r1), ("4", r4)):
        for r in rs:
            for m in cs.MODES:
                for s in "wl":
                    one, batch, lin = r[m][f"one_{s}"], r[m][f"batch_{s}"], r[m][f"lin_{s}"]
                    assert one == pytest.approx(batch, rel=1e-9, abs=1e-12)
                    assert batch == pytest.approx(lin, rel=1e-9, abs=1e-12)
                    rem.setdefault(tag, []).append(abs(r[m][f"real_{s}"] - lin))
    assert np.mean(rem["1"]) / np.mean(rem["4"]) > 8.0


@pytest.fixture(scope="module")
def tiny_cli(tmp_path_factory):
    """The tiny sweep of the CLI (the GPU preset's command at tiny scale), run once: (stdout JSON, out dir)."""
    out = tmp_path_factory.mktemp("claims")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["claims", "--preset", "gpu", "--scale", "tiny", "--settings", "paper,one_pair", "--seeds", "5",
                   "--out", str(out), "--json", "--x64"])
    assert rc == 0
    return json.loads(buf.getvalue()), out


def test_reduced_sweep_reports_fractions_with_intervals(tiny_cli):
    """5 seeds, a fraction and an interval per claim and setting, an attribution for every failing run,
    the figure written."""
    out, path = tiny_cli
    assert {r["claim"] for r in out["table"]} == set(cs.CLAIMS)
    for r in out["table"]:
        assert r["n"] == 5 and 0 <= r["k"] <= 5
        lo, hi = r["interval"]
        assert 0 <= lo <= r["fraction"] <= hi <= 1
        assert sum(r["attribution"].values()) == r["n"] - r["k"]      # every failure is attributed
        if r["setting"] == "one_pair":                                  # b = 1: no cross-pair term exists
            assert "cross-pair terms" not in r["attribution"]
    for lv in ("one", "batch", "lin"):
        assert 0 <= out["agreement"]["paper"][lv] <= 1
    # b = 1: the one-pair account is the batch account, so their sign agreements coincide
    assert out["agreement"]["one_pair"]["one"] == pytest.approx(out["agreement"]["one_pair"]["batch"], abs=1e-6)
    full = json.loads((path / "claims.json").read_text())
    assert len(full["settings"]["paper"]["runs"]) == 5
    assert (path / "transformer_claims.png").stat().st_size > 0 and (path / "claims.md").exists()


def test_composition_keeps_the_sweep_numbers(tiny_cli):
    """The claim sweep through `diagnose.compose` (and the token Gram measured only on the long-suffix set)
    gives the numbers of the sweep before that change: tests/data/claims_tiny_runs.json was written by
    the previous implementation (its own SFT/PO scans, token Gram on all three sets) for this very
    configuration (tiny preset, seed 0, 5 seeds, float64). Every claim verdict is the same and every
    number agrees to 1e-12 absolute + 1e-9 relative: the programs are recompiled (the measurement
    program lost its token-Gram branch, the PO scan gained outputs), which reorders float64
    reductions (measured: at most 3e-16 relative on quantities at identical parameters, 3e-11 relative
    on changes that are differences of two log-probs of size ~3, i.e. ~1e-15 absolute); a different
    key, batch or step would change them by more than 1e-6."""
    golden = json.loads((pathlib.Path(__file__).parent / "data" / "claims_tiny_runs.json").read_text())
    full = json.loads((tiny_cli[1] / "claims.json").read_text())
    n = 0
    for setting, runs in golden.items():
        new = full["settings"][setting]["runs"]
        assert len(new) == len(runs)
        for old_run, new_run in zip(runs, new):
            old_ev, new_ev = cs.evaluate(old_run), cs.evaluate(new_run)
            assert old_ev == new_ev
            for mode, vals in old_run.items():
                for k, v in vals.items():
                    if k.startswith("tok_") and mode != "long":
                        assert k not in new_run[mode]          # no longer measured: the claims never read it
                        continue
                    got = new_run[mode][k]
                    got = math.nan if got is None else got      # claims.json writes non-finite values as null
                    assert got == pytest.approx(v, rel=1e-9, abs=1e-12, nan_ok=True), (mode, k)
                    n += 1
    assert n > 100


@pytest.mark.parametrize("argv,needle", [(["--settings", "nope"], "unknown setting"),
                                         (["--seeds", "0"], "--seeds")])
def test_claims_cli_rejects_bad_input(capsys, argv, needle):
    assert main(["claims", "--scale", "tiny", *argv]) == 2
    err = capsys.readouterr().err
    assert needle in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_report_entries_are_statistical(tmp_path):
    """The report's transformer entries read the tiny preset's sweep: per setting, seeds holding and
    the interval, with the pass threshold on the Wilson lower bound of the paper-like setting."""
    from entangle_sim.report import claims as rc

    entries = rc.transformer_claims("tiny", tmp_path, 0)
    assert [e["id"] for e in entries] == list(rc.CLAIM_IDS)
    data = reproduce.figure_data("transformer_claims", "tiny", cache_dir=tmp_path)
    for e in entries:
        row = next(r for r in data["table"] if r["claim"] == rc.CLAIM_IDS[e["id"]] and r["setting"] == "paper")
        assert e["measured"]["paper"]["holds"] == f"{row['k']}/{row['n']}"
        assert e["pass"] is (row["interval"][0] > rc.ESTABLISHED)
        assert "Wilson" in e["threshold"] and "analogue" in e["statement"]


# ---------------------------------------------------------------------------------------------- scale

@pytest.fixture(scope="module")
def tiny_scale(tmp_path_factory):
    """The GPU scale command at tiny scale (`claims --preset scale-gpu --scale tiny`), run once, float64,
    2 seeds: the tiny preset's scale sweep, so the report entry below reuses its compiled programs."""
    out = tmp_path_factory.mktemp("scale")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(["claims", "--preset", "scale-gpu", "--scale", "tiny", "--seeds", "2", "--out", str(out), "--json",
                   "--x64"])
    assert rc == 0
    return json.loads(buf.getvalue()), out


def test_scale_command_smoke(tiny_scale):
    """The GPU command's smoke run: every claim x size x setting has k/n, its Wilson interval and an
    attribution for every failure; the rate of every SGD-control run is SGD_KAPPA / its reference Gbar;
    the Adam runs use the recipe's absolute rate; the figure and the table are written."""
    out, path = tiny_scale
    from entangle_sim import presets

    sizes = [n for n, _ in presets.SCALE_TINY_SIZES]
    assert list(out["sizes"]) == sizes
    assert out["sizes"][sizes[0]]["n_params"] < out["sizes"][sizes[1]]["n_params"]
    assert len(out["table"]) == len(cs.CLAIMS) * len(sizes) * 2
    for r in out["table"]:
        assert r["n"] == 2 and sum(r["attribution"].values()) == r["n"] - r["k"]
        assert 0 <= r["interval"][0] <= r["fraction"] <= r["interval"][1] <= 1
    full = json.loads((path / "claims_scale.json").read_text())
    for n in sizes:
        for run in full["sizes"][n]["settings"]["sgd_scaled"]["runs"]:
            for m in cs.MODES:    # one rate per seed, measured on the long-suffix set, for all three sets
                assert run[m]["po_lr"] * run[m]["gram_diag_ref"] == pytest.approx(cs.SGD_KAPPA, rel=1e-12)
        for run in full["sizes"][n]["settings"]["paper"]["runs"]:
            assert run["1t"]["po_lr"] == pytest.approx(full["sizes"][n]["config"]["po_lr"], rel=1e-12)
    assert set(out["turns"]) == set(cs.SINGLE_TOKEN)
    assert (path / "transformer_claims_scale.png").stat().st_size > 0
    assert "Where it turns" in (path / "claims_scale.md").read_text()


def test_scale_results_merge_into_one_figure(tiny_scale):
    """A second run's sizes (the GPU run) join the table and the figure (`--with`): sizes ordered by
    parameter count, the table recomputed over all of them."""
    import matplotlib.pyplot as plt

    from entangle_sim.plotting.claims import plot_claim_scale

    one = json.loads((tiny_scale[1] / "claims_scale.json").read_text())
    big = json.loads(json.dumps(one))
    big["sizes"] = {f"{n}-big": {**sz, "n_params": sz["n_params"] * 1000} for n, sz in one["sizes"].items()}
    merged = cs.merge_scale(big, one)
    assert list(merged["sizes"]) == [*one["sizes"], *big["sizes"]]
    assert len(merged["table"]) == 2 * len(one["table"])
    fig = plot_claim_scale(merged)
    assert len(fig.axes) >= 6 and fig.axes[0].get_xlabel() == "parameters"
    plt.close(fig)
    # the table of sizes read back from strict JSON (the Adam runs' NaN Gram is null there)
    from entangle_sim.cli.claims_cmd import scale_markdown

    assert any(fo["gram_diag_ref"] is None for sz in merged["sizes"].values() for fo in sz["first_order"].values())
    md = scale_markdown(merged)
    assert all(n in md for n in merged["sizes"])


def test_scale_report_entry(tiny_scale, monkeypatch):
    """The report entry reads the scale data (here the smoke run's claims_scale.json, instead of
    recomputing the tiny preset's sweep): every claim per setting and size, and pass = every
    SGD-control run first order."""
    from entangle_sim.report import claims as rc

    data = json.loads((tiny_scale[1] / "claims_scale.json").read_text())
    monkeypatch.setattr(reproduce, "figure_data", lambda name, *a, **k: data)
    [e] = rc.transformer_claims_scale("tiny", None, 0)
    fo = [sz["first_order"]["sgd_scaled"]["first_order"] for sz in data["sizes"].values()]
    assert e["id"] == "Q-scale" and e["pass"] is all(fo)
    assert set(e["measured"]["paper"]) == set(cs.CLAIMS)
    assert set(e["measured"]["paper"]["1t-cos"]) == set(data["sizes"])


def _scale_stub(fracs, atts, sups):
    """A scale result with one single-token claim over three sizes (the other two absent)."""
    sizes = {f"s{i}": {"n_params": 10 ** (i + 3), "support": {"paper": {"1t-chosen": s}}} for i, s in enumerate(sups)}
    table = []
    for i, (k, att) in enumerate(zip(fracs, atts)):
        table.append({"claim": "1t-chosen", "setting": "paper", "size": f"s{i}", "n_params": 10 ** (i + 3), "k": k,
                      "n": 5, "fraction": k / 5, "interval": list(cs.wilson(k, 5)), "attribution": att})
    return {"sizes": sizes, "table": table}


def test_turns_names_where_the_claim_and_the_accounts_turn():
    """Hand-made: 0/5 (all by Adam preconditioning), 3/5 (second order), 5/5. The Wilson lower bound of
    5/5 is 0.57 > 1/2, of 3/5 0.23: the claim holds from s2; the dominant term changes at s1 (Adam ->
    second order) and s2 (-> none); 'lin' support goes 0 -> 1 (gains), 'one' 1 -> 0.4 (loses)."""
    sup = [{"one": 1.0, "lin": 0.0}, {"one": 0.8, "lin": 0.6}, {"one": 0.4, "lin": 1.0}]
    t = cs.turns(_scale_stub([0, 3, 5], [{"Adam preconditioning": 5}, {"second-order remainder": 2}, {}], sup))
    t = t["1t-chosen"]
    assert t["holds_from"] == "s2"
    assert t["term_changes"] == [("s1", "Adam preconditioning", "second-order remainder"),
                                 ("s2", "second-order remainder", None)]
    assert t["gains"] == ["lin"] and t["losses"] == ["one"]
    # not monotone: holds at s0 only -> nowhere "from" a size on
    t2 = cs.turns(_scale_stub([5, 0, 0], [{}, {"held-out pairs": 5}, {"held-out pairs": 5}], sup))["1t-chosen"]
    assert t2["holds_from"] is None


@pytest.mark.slow
def test_per_gram_rate_is_the_rate_of_the_sgd_step():
    """`diagnose.compose` with po_lr_unit='per_gram': the rate is po_lr / Gbar with Gbar recomputed here
    from explicit per-response gradients (jax.grad, no geometry module) at the reference on the
    calibration pairs, and the first PO step is exactly params - rate x grad of the DPO batch loss
    (float64; 1e-10 relative: the same contractions in a different order)."""
    from entangle_sim import diagnose, losses

    cfg = dataclasses.replace(DiagnoseConfig(**TINY), optimizer="sgd", po_lr_unit="per_gram", po_lr=4.0, po_steps=1)
    with jax.enable_x64(True):
        policy = transformer.make(cfg.transformer)
        hp = losses.get("sigmoid").resolve()
        scfg = dataclasses.replace(cfg.sentiment, mode="long")
        k_gram, k_po = jax.random.key(5), jax.random.key(6)
        res = diagnose.compose(policy, cfg, hp, policy.init(jax.random.key(0)),
                               rates={"pretrain_lr": 3e-3, "sft_lr": 1e-3, "po_lr": 4.0},
                               pretrain_key=jax.random.key(1), gram_key=k_gram,
                               sft_keys=jax.random.split(jax.random.key(2), 2), po_keys=k_po[None],
                               sft_data=lambda k: corpus.sentences(scfg, cfg.corpus, k, 4),
                               po_data=lambda k: sentiment.preference_pairs(scfg, k, 4),
                               observe=lambda rec, *a: rec.loss.mean(), record=True)
        ref = res["ref"]
        flat = lambda t: jnp.concatenate([x.ravel() for x in jax.tree.leaves(t)])  # noqa: E731
        cal = sentiment.preference_pairs(scfg, k_gram, cfg.po_batch)
        grads = jax.jit(lambda p, one: [flat(jax.grad(lambda q, s=s: policy.logps(q, one)[s][0])(p)) for s in (0, 1)])
        sq = []
        for i in range(cal.size):
            for g in grads(ref, jax.tree.map(lambda a: a[i:i + 1], cal)):   # one compilation, B calls
                sq.append(float(g @ g))
        gbar = float(np.mean(sq))
        assert float(res["gram_diag"]) == pytest.approx(gbar, rel=1e-10)
        assert float(res["po_lr"]) == pytest.approx(4.0 / gbar, rel=1e-10)
        batch = sentiment.preference_pairs(scfg, k_po, 4)
        rw, rl = policy.logps(ref, batch)

        def loss(p):
            lw, ll = policy.logps(p, batch)
            return losses.get("sigmoid").batch(lw, ll, rw, rl, batch.chosen_len, batch.rejected_len, **hp)

        want = flat(ref) - (4.0 / gbar) * flat(jax.grad(loss)(ref))
        np.testing.assert_allclose(flat(res["params"]), want, rtol=1e-10, atol=1e-13)
