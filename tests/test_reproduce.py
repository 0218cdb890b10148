"""Figures (tiny preset, Agg), report structure, and a reproduce run with cache reuse."""
import json

import matplotlib
import numpy as np
import pytest

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from entangle_sim import figures, report, reproduce, results  # noqa: E402
from entangle_sim.plotting import simulation  # noqa: E402

# the transformer and mitigation runs are tested in test_diagnose.py / test_mitigations.py
CHEAP = [n for n, f in figures.FIGURES.items() if f.data not in ("transformer_logps", "mitigations")]


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("cache")


@pytest.mark.parametrize("name", CHEAP)
def test_every_figure_renders_on_tiny_preset(name, cache):
    fig, data = figures.render(name, "tiny", cache_dir=cache)
    assert isinstance(fig, matplotlib.figure.Figure)
    titles = [a.get_title() for a in fig.axes] + [fig._suptitle.get_text() if fig._suptitle else ""]
    assert any(t.strip() for t in titles)  # a title states the finding
    data_axes = [a for a in fig.axes if a.get_visible() and a.has_data() and a.get_label() != "<colorbar>"]
    if name != "condition_table":  # small multiples label y on the first column only
        assert all(a.get_xlabel() for a in data_axes), name
        assert any(a.get_ylabel() for a in data_axes), name
    plt.close(fig)


def _fake_diagnose():
    steps = np.arange(0, 4)
    run = lambda c: {"steps": steps, "chosen_logp": -1 - 0.1 * steps, "rejected_logp": -1 - 0.2 * steps,  # noqa: E731
                     "geometry": {"cos_mean": c + 0.01 * steps}, "token_cos": np.eye(3) * 2 - 1,
                     "chosen_tokens": np.arange(3), "rejected_tokens": np.arange(3) + 1}
    return {"suffixes": ["1t", "short", "long"], "runs": {"1t": run(-0.2), "short": run(0.4), "long": run(0.8)}}


@pytest.mark.parametrize("fn", ["plot_transformer_logps", "plot_transformer_cos", "plot_transformer_heatmap"])
def test_transformer_figures_render(fn):
    """The diagnose runs are tested in test_diagnose.py; here their figures render on diagnose-shaped data."""
    fig = getattr(simulation, fn)(_fake_diagnose())
    assert fig.axes and fig.axes[0].get_title()
    plt.close(fig)


def test_plot_accepts_given_axes():
    data = reproduce.load_or_run("table1_regions", "tiny")
    fig, ax = plt.subplots()
    assert figures.FIGURES["table1_regions"].plot(data, ax=ax) is fig
    plt.close(fig)


def test_cache_roundtrip_and_key(tmp_path):
    data = {"a": np.arange(3), "nested": {"b": np.ones((2, 2)), "s": "x", "l": [1, 2]}, "f": 1.5, "e": {}}
    results.save_data(tmp_path / "d.npz", data)
    back = results.load_data(tmp_path / "d.npz")
    np.testing.assert_array_equal(back["nested"]["b"], data["nested"]["b"])
    assert back["nested"]["s"] == "x" and back["f"] == 1.5 and back["nested"]["l"] == [1, 2] and back["e"] == {}
    assert reproduce.cache_key("fig1_toy", "tiny") != reproduce.cache_key("fig1_toy", "quick")


def test_report_structure_and_markdown(tmp_path, cache):
    p = reproduce.preset("tiny")["report"]
    entries = report.check_R5(p, 0) + report.check_R15(p, 0)
    for e in entries:
        assert set(e) == {"id", "statement", "check", "measured", "threshold", "pass", "note"}
        assert e["pass"] in (True, False, None)
        if e["pass"] is None:
            assert e["note"]  # not-available entries are explained
    assert all(e["pass"] for e in entries if e["id"] in ("R5", "R15"))
    rep = {"preset": "tiny", "seed": 0, "version": "x", "entries": entries,
           "summary": {"pass": 2, "fail": 0, "not_available": 0, "total": len(entries)},
           "conditions": reproduce.condition_rows()}
    js, md = report.write_report(rep, tmp_path)
    assert json.loads(js.read_text())["entries"][0]["id"] == "R5"
    text = md.read_text()
    assert "| R15 |" in text and "Table 2 analogue" in text and "| sigmoid |" in text


def test_reproduce_tiny_run_reuses_cache(tmp_path, monkeypatch):
    from entangle_sim.cli import reproduce_cmd

    out, cache = tmp_path / "out", tmp_path / "cache"
    only = ["table1_regions", "condition_table"]
    r1 = reproduce_cmd.reproduce(out, preset="tiny", cache=cache, only=only, report=False, progress=False,
                                 log=lambda *a: None)
    for n in only:
        assert (out / f"{n}.png").stat().st_size > 0 and (out / f"{n}.pdf").exists()
    assert (out / "conditions.md").read_text().count("== ") >= 30
    assert "| dpop |" in (out / "condition_table.md").read_text()
    cached = sorted(p.name for p in cache.iterdir())
    assert len(cached) == len(only)
    # second run: every figure's data comes from the cache (builders are not called)
    monkeypatch.setattr(reproduce, "enable_x64", lambda: (_ for _ in ()).throw(AssertionError("rebuilt")))
    r2 = reproduce_cmd.reproduce(out, preset="tiny", cache=cache, only=only, report=False, progress=False,
                                 log=lambda *a: None)
    assert r2["figures"] == r1["figures"] and sorted(p.name for p in cache.iterdir()) == cached


def test_reproduce_cli_rejects_unknown_figure(capsys):
    from entangle_sim.cli import main

    assert main(["reproduce", "--preset", "tiny", "--only", "nope", "--out", "/tmp/x"]) == 2
    assert "unknown figure" in capsys.readouterr().err


def test_mitigation_figure_renders():
    """The comparison runs are tested in test_mitigations.py; the figure renders on comparison-shaped rows."""
    rows = [{"setting": s, "method": m, "ideal_fraction": f, "pair_pred_ideal_fraction": 1.0 if m == "normalized" else f}
            for s in ("linear", "lastlayer-long") for m, f in (("baseline", 0.1), ("normalized", 0.4))]
    fig = simulation.plot_mitigation_comparison({"rows": rows})
    assert "normalized" in fig.axes[0].get_title()
    plt.close(fig)
