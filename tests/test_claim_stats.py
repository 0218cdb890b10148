"""The paper's transformer claims as statistics: corpus and pretraining, the padded mode batches, the
Wilson interval, the attribution chain, the attribution identities on real runs, the CLI and the report."""
import dataclasses
import json
import math

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


def test_reduced_sweep_reports_fractions_with_intervals(tmp_path, capsys):
    """The tiny sweep of the CLI (the GPU preset's command at tiny scale): 5 seeds, a fraction and an
    interval per claim and setting, an attribution for every failing run, the figure written."""
    rc = main(["claims", "--preset", "gpu", "--scale", "tiny", "--settings", "paper,one_pair", "--seeds", "5",
               "--out", str(tmp_path), "--json", "--x64"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
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
    full = json.loads((tmp_path / "claims.json").read_text())
    assert len(full["settings"]["paper"]["runs"]) == 5
    assert (tmp_path / "transformer_claims.png").stat().st_size > 0 and (tmp_path / "claims.md").exists()


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
