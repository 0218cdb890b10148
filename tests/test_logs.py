"""analyze-log: parsing each format, regimes vs hand-computed signs, the corrected condition
(docs/theory.md §7.3 bug 1), error paths (one line, exit 2), --out files, figure rendering."""
import csv
import json
import os
from pathlib import Path

import matplotlib
import numpy as np
import pytest

from entangle_sim import logs
from entangle_sim.cli import main

DATA = Path(__file__).parent / "data"
TRL = DATA / "trainer_state.json"
CSV = DATA / "grad_official.csv"
JSONL = DATA / "grad_official.jsonl"
PAIRS = DATA / "pairs.jsonl"


def _regime(dc, dr):
    """Independent statement of the regime table (regimes.py docstring) for tol = 0."""
    if dc == 0 and dr == 0:
        return "stationary"
    if dc >= 0 and dr <= 0:
        return "chosen_up_rejected_down"
    if dc >= 0:
        return "both_up"
    if dr <= 0:
        return "both_down"
    return "chosen_down_rejected_up"


def _trl_entries(prefix):
    hist = json.loads(TRL.read_text())["log_history"]
    return [(e["step"], e[f"{prefix}logps/chosen"], e[f"{prefix}logps/rejected"])
            for e in hist if f"{prefix}logps/chosen" in e]


def _run(capsys, *argv):
    rc = main(["analyze-log", *map(str, argv)])
    out, err = capsys.readouterr()
    return rc, out, err


# ---------------------------------------------------------------- parsing and regimes


def test_detects_every_fixture_format():
    assert logs.detect_format(TRL) == "trl"
    assert logs.detect_format(CSV) == "official-csv"
    assert logs.detect_format(JSONL) == "official-jsonl"
    assert logs.detect_format(PAIRS) == "pairs-jsonl"


@pytest.mark.parametrize("split,prefix", [("eval", "eval_"), ("train", "")])
def test_trl_intervals_match_hand_computed_signs(split, prefix):
    entries = _trl_entries(prefix)
    s = logs.summarize(logs.load_log(TRL, split=split))
    assert (s["format"], s["split"]) == ("trl", split)
    assert s["series"]["step"] == [e[0] for e in entries]
    expected = [_regime(c1 - c0, r1 - r0)
                for (_, c0, r0), (_, c1, r1) in zip(entries, entries[1:])]
    assert [iv["regime"] for iv in s["intervals"]] == expected
    assert s["n_intervals"] == len(entries) - 1
    for name in ("chosen_up_rejected_down", "both_up", "both_down", "chosen_down_rejected_up",
                 "stationary"):
        assert s["regime_fractions"][name] == pytest.approx(expected.count(name) / len(expected))
    rose = [(a[0], b[0]) for a, b in zip(entries, entries[1:]) if b[2] > a[2]]
    fell = [(a[0], b[0]) for a, b in zip(entries, entries[1:]) if b[1] < a[1]]
    assert [(a, b) for a, b, _ in s["rejected_rose_intervals"]] == rose
    assert [(a, b) for a, b, _ in s["chosen_fell_intervals"]] == fell
    assert s["finding"].startswith(f"rejected log-prob rose in {len(rose)} of {len(expected)}")
    net_c, net_r = entries[-1][1] - entries[0][1], entries[-1][2] - entries[0][2]
    assert s["net_change"]["chosen"] == pytest.approx(net_c, abs=1e-6)
    assert s["net_change"]["rejected"] == pytest.approx(net_r, abs=1e-6)
    assert s["net_change"]["margin"] == pytest.approx(net_c - net_r, abs=1e-6)


def test_trl_eval_fixture_literal_expectations():
    # Read off the fixture by hand: eval steps 20..100.
    s = logs.summarize(logs.load_log(TRL))
    assert s["split"] == "eval"  # auto: 5 eval entries with log-probs
    assert [iv["regime"] for iv in s["intervals"]] == [
        "both_down", "both_up", "both_down", "chosen_up_rejected_down"]
    assert s["rejected_rose_intervals"] == [[40, 60, pytest.approx(0.35)]]


def test_tolerance_turns_small_moves_stationary():
    # 40 -> 60 moves chosen by +0.45 and rejected by +0.35: both within tol 0.5.
    s = logs.summarize(logs.load_log(TRL), tol=0.5)
    assert s["intervals"][1]["regime"] == "stationary"
    assert s["rejected_rose_intervals"] == []
    with pytest.raises(ValueError):
        logs.summarize(logs.load_log(TRL), tol=-1.0)


def test_auto_split_falls_back_to_train_and_accepts_unprefixed_eval_keys(tmp_path):
    state = json.loads(TRL.read_text())
    hist = [e for e in state["log_history"] if "eval_loss" not in e or e["step"] == 20]
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps({**state, "log_history": hist}))
    assert logs.load_log(p).split == "train"  # one eval entry is not an interval

    # eval entries that log unprefixed logps/* (custom callbacks) still count as eval
    hist = []
    for e in state["log_history"]:
        if "eval_loss" in e:
            e = {k.replace("eval_logps", "logps"): v for k, v in e.items()}
        hist.append(e)
    p.write_text(json.dumps({**state, "log_history": hist}))
    series = logs.load_log(p)
    assert series.split == "eval"
    assert list(series.chosen) == [c for _, c, _ in _trl_entries("eval_")]


def test_trl_nan_missing_and_repeated_entries_are_skipped_with_notes(tmp_path):
    state = json.loads(TRL.read_text())
    hist = state["log_history"]
    evals = [e for e in hist if "eval_loss" in e]
    evals[1]["eval_logps/rejected"] = float("nan")     # fp16 overflow
    del evals[2]["eval_logps/chosen"]                    # missing key
    hist.append({**evals[3], "eval_logps/chosen": -60.0})  # resumed run re-logs step 80
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps(state))                      # json writes NaN as a bare NaN token
    series = logs.load_log(p)
    assert list(series.step) == [20, 80, 100]
    assert series.chosen[1] == -60.0                     # the later record wins
    notes = " | ".join(series.notes)
    assert "NaN" in notes and "missing eval_logps/chosen" in notes and "repeated steps 80" in notes


def test_official_csv_and_jsonl_parse_identically_sorted_by_step():
    a, b = logs.load_log(CSV), logs.load_log(JSONL)
    with open(CSV) as f:
        rows = list(csv.DictReader(f))
    steps = sorted(float(r["Step"]) for r in rows)
    assert list(a.step) == steps and list(b.step) == steps
    for field in ("inner", "cos", "norm_w", "norm_l", "logged_condition"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert any("sorted" in n for n in a.notes)  # grad_plot.py appends in completion order


def test_corrected_condition_flags_the_logged_bug():
    """Regression (docs/theory.md §7.3 bug 1): with |g_l| < |g_w| and only G_wl/G_ll > 1 the logged
    mean(G_wl/G_ww) says Case 1; rho = max(rho_w, rho_l) must say it fails."""
    with open(CSV) as f:
        rows = sorted(csv.DictReader(f), key=lambda r: float(r["Step"]))
    expect = {}
    for r in rows:
        ip, w, l = float(r["InnerProduct"]), float(r["Grad_W_Norm"]), float(r["Grad_L_Norm"])
        expect[int(r["Step"])] = (max(ip / w**2, ip / l**2) <= 1, float(r["Grad_Condition"]) <= 1)
    bug_row = next(r for r in rows if r["Step"] == "40")
    ip, w, l = (float(bug_row[k]) for k in ("InnerProduct", "Grad_W_Norm", "Grad_L_Norm"))
    assert l < w and ip / w**2 <= 1 < ip / l**2 and float(bug_row["Grad_Condition"]) <= 1

    for path in (CSV, JSONL):
        s = logs.summarize(logs.load_log(path))
        c = s["condition"]
        per = {r["step"]: r for r in c["per_step"]}
        assert per[40]["case1_logged"] is True and per[40]["case1_corrected"] is False
        assert per[40]["rho"] == pytest.approx(ip / l**2, rel=1e-6)
        for step, (corr, logged) in expect.items():
            assert (per[step]["case1_corrected"], per[step]["case1_logged"]) == (corr, logged)
        disagree = [st for st, (corr, logged) in expect.items() if corr != logged]
        assert c["disagreement_count"] == len(disagree) == 1
        assert c["disagreement_steps"] == disagree == [40]
        assert c["corrected"]["case1_steps"] == sum(v[0] for v in expect.values())
        assert c["logged"]["case1_steps"] == sum(v[1] for v in expect.values())
        assert "ratio of per-step means" in c["corrected"]["definition"]
        assert s["n_intervals"] is None and s["net_change"] is None  # the file has no log-probs
        # First-order prediction (R3) at step 40: G_ww > G_wl > G_ll, so both rise (Case 3).
        assert per[40]["predicted_regime"] == "both_up"


def test_condition_ratios_per_pair():
    # |g_w|^2 = 4 > |g_l|^2 = 1, G_wl = 1.5: the buggy G_wl/min(G_ww, G_ww) = 0.375 passes.
    rho_w, rho_l, rho = logs.condition_ratios(4.0, 1.5, 1.0)
    assert (float(rho_w), float(rho_l), float(rho)) == (0.375, 1.5, 1.5)
    # negative inner product: Case 1 for either sign
    assert float(logs.condition_ratios(2.0, -3.0, 1.0)[2]) <= 1


def test_pairs_jsonl_paired_changes_by_hand():
    recs = [json.loads(ln) for ln in PAIRS.read_text().splitlines()]
    at = {(r["step"], r["pair"]): r for r in recs}
    steps = sorted({r["step"] for r in recs})
    exp_regimes, pooled, agree, n_pred = [], [], 0, 0
    for s0, s1 in zip(steps, steps[1:]):
        both = [p for (s, p) in at if s == s0 and (s1, p) in at]
        dc = [at[(s1, p)]["chosen_logp"] - at[(s0, p)]["chosen_logp"] for p in both]
        dr = [at[(s1, p)]["rejected_logp"] - at[(s0, p)]["rejected_logp"] for p in both]
        exp_regimes.append(_regime(sum(dc) / len(dc), sum(dr) / len(dr)))
        for p, c, r in zip(both, dc, dr):
            obs = _regime(c, r)
            pooled.append(obs)
            g = at[(s0, p)]
            n_pred += 1
            agree += obs == _regime(g["G_ww"] - g["G_wl"], g["G_wl"] - g["G_ll"])
    s = logs.summarize(logs.load_log(PAIRS))
    assert s["format"] == "pairs-jsonl"
    assert [iv["regime"] for iv in s["intervals"]] == exp_regimes
    p = s["pairs"]
    assert p["n_pair_changes"] == len(pooled) == 7  # pair 2 is missing at step 20
    assert p["regime_counts"]["both_down"] == pooled.count("both_down")
    assert p["regime_counts"]["chosen_up_rejected_down"] == pooled.count("chosen_up_rejected_down")
    agr = p["condition"]["prediction_agreement"]
    assert (agr["agree"], agr["n"]) == (agree, n_pred) == (6, 7)
    step0 = p["condition"]["per_step"][0]
    g0 = [at[(0, q)] for q in (0, 1, 2)]
    rhos = [max(g["G_wl"] / g["G_ww"], g["G_wl"] / g["G_ll"]) for g in g0]
    assert step0["case1_fraction"] == pytest.approx(sum(r <= 1 for r in rhos) / 3, abs=1e-6)
    assert step0["rho_mean_of_ratios"] == pytest.approx(sum(rhos) / 3, abs=1e-6)


def test_truncated_last_jsonl_line_is_skipped_with_note(tmp_path):
    p = tmp_path / "grad.jsonl"
    p.write_text(JSONL.read_text() + '{"Step": 320, "InnerPro')
    series = logs.load_log(p)
    assert len(series.step) == 7 and any("truncated" in n for n in series.notes)


# ---------------------------------------------------------------- command line


def test_cli_json_on_trl_fixture(capsys):
    rc, out, err = _run(capsys, TRL, "--json")
    assert rc == 0 and err == ""
    s = json.loads(out)
    for key in ("format", "split", "n_intervals", "regime_fractions", "net_change",
                "rejected_rose_intervals", "chosen_fell_intervals"):
        assert key in s
    assert set(s["regime_fractions"]) == {"chosen_up_rejected_down", "both_up", "both_down",
                                          "chosen_down_rejected_up", "stationary"}
    assert set(s["net_change"]) == {"chosen", "rejected", "margin"}


def test_cli_human_output(capsys):
    rc, out, _ = _run(capsys, CSV)
    assert rc == 0
    assert "Case 1 holds at 1 of 7 steps" in out and "differ at steps [40]" in out
    rc, out, _ = _run(capsys, TRL, "--split", "train")
    assert rc == 0 and "rejected log-prob rose in 2 of 9 intervals" in out


def test_cli_out_writes_figure_and_summary(tmp_path, capsys):
    out_dir = tmp_path / "report"
    rc, out, _ = _run(capsys, CSV, "--json", "--out", out_dir)
    assert rc == 0
    names = sorted(os.listdir(out_dir))
    assert names == ["log_regimes.pdf", "log_regimes.png", "summary.json"]  # no temp leftovers
    assert json.loads((out_dir / "summary.json").read_text()) == json.loads(out)
    assert (out_dir / "log_regimes.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out_dir / "log_regimes.pdf").read_bytes()[:5] == b"%PDF-"


def _cases(tmp_path):
    state = json.loads(TRL.read_text())
    no_logps = {**state, "log_history": [e for e in state["log_history"]
                                         if not any("logps" in k for k in e)]}
    one_entry = {**state, "log_history": [e for e in state["log_history"]
                                          if e.get("step") == 10 and "loss" in e]}
    files = {
        "empty.json": "",
        "blank.jsonl": "\n  \n",
        "no_logps.json": json.dumps(no_logps),
        "one_entry.json": json.dumps(one_entry),
        "not_a_log.json": json.dumps({"hello": 1}),
        "notes.txt": "step loss\n10 0.69\n",
        "bad_header.csv": "Step,Loss\n10,0.69\n",
        "all_nan.csv": "Step,InnerProduct,Correlation,Grad_W_Norm,Grad_L_Norm,Grad_Condition\n"
                       "40,,0.8,,,\n",
        "mid_corrupt.jsonl": '{"Step": 40, "InnerProduct": 1, "Grad_W_Norm": 2, '
                             '"Grad_L_Norm": 3}\n{"Step": 8\n{"Step": 80, "InnerProduct": 1, '
                             '"Grad_W_Norm": 2, "Grad_L_Norm": 3}\n',
        "one_step_pairs.jsonl": '{"step": 0, "pair": 1, "chosen_logp": -3, "rejected_logp": -4}\n',
        "binary.bin": b"\x89PNG\r\n\x1a\n\x00\xff\xfe",
    }
    for name, content in files.items():
        p = tmp_path / name
        p.write_bytes(content) if isinstance(content, bytes) else p.write_text(content)
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "trainer_state.json").write_text(TRL.read_text())
    (tmp_path / "afile").write_text("x")
    return [
        ([DATA / "trainer_state_truncated.json"], "line 78"),
        ([tmp_path / "empty.json"], "empty"),
        ([tmp_path / "blank.jsonl"], "empty"),
        ([tmp_path / "run"], "is a directory"),
        ([tmp_path / "missing.json"], "no such file"),
        ([tmp_path / "no_logps.json"], "no train entries"),
        ([tmp_path / "one_entry.json"], "need at least 2"),
        ([TRL, "--split", "eval", "--format", "trl"], None),  # valid: sanity of the harness
        ([tmp_path / "not_a_log.json"], "unrecognised"),
        ([tmp_path / "notes.txt"], "unrecognised log format"),
        ([tmp_path / "bad_header.csv"], "InnerProduct"),
        ([tmp_path / "all_nan.csv"], "no usable rows"),
        ([tmp_path / "mid_corrupt.jsonl"], "line 2"),
        ([tmp_path / "one_step_pairs.jsonl"], "need at least 2"),
        ([tmp_path / "binary.bin"], "UTF-8"),
        ([CSV, "--format", "trl"], "invalid JSON"),
        ([TRL, "--format", "official-csv"], "lacks column"),
        ([TRL, "--format", "pairs-jsonl"], "line 1"),
        ([TRL, "--format", "xml"], "invalid choice"),
        ([TRL, "--tol", "-1"], "--tol"),
        ([TRL, "--tol", "nan"], "--tol"),
        ([TRL, "--out", tmp_path / "afile"], "not a directory"),
    ]


def test_every_error_path_is_one_line_exit_2(tmp_path, capsys):
    for argv, needle in _cases(tmp_path):
        rc, out, err = _run(capsys, *argv)
        if needle is None:
            assert rc == 0, err
            continue
        assert rc == 2, (argv, out, err)
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("entangle-sim: error:"), (argv, err)
        assert needle in lines[0], (argv, lines[0])
        assert "Traceback" not in err and out == ""
    # a directory holding a trainer_state.json gets a hint
    _, _, err = _run(capsys, tmp_path / "run")
    assert "did you mean" in err


def test_no_train_entries_hint_points_to_other_split(tmp_path, capsys):
    state = json.loads(TRL.read_text())
    state["log_history"] = [e for e in state["log_history"] if "eval_loss" in e]
    p = tmp_path / "trainer_state.json"
    p.write_text(json.dumps(state))
    rc, _, err = _run(capsys, p, "--split", "train")
    assert rc == 2 and "try --split eval" in err


# ---------------------------------------------------------------- figure


@pytest.mark.parametrize("path", [TRL, CSV, PAIRS])
def test_figure_renders_under_agg(path):
    import matplotlib.pyplot as plt

    from entangle_sim.plotting.logs import plot_log_regimes

    assert matplotlib.get_backend().lower() == "agg"
    series = logs.load_log(path)
    summary = logs.summarize(series)
    fig = plot_log_regimes(series)
    try:
        ax = fig.axes[0]
        assert ax.get_title() == summary["finding"]
        n_shaded = (len(summary["intervals"]) if "intervals" in summary
                    else len(summary["condition"]["per_step"]))
        assert len(ax.patches) == n_shaded
        fig.canvas.draw()
    finally:
        plt.close(fig)
    fig2, ax2 = plt.subplots()
    try:
        assert plot_log_regimes(summary, ax=ax2) is fig2  # draws on the given axes
        assert len(ax2.lines) >= 2
    finally:
        plt.close(fig2)


def test_plot_rejects_other_input():
    from entangle_sim.plotting.logs import plot_log_regimes

    with pytest.raises(TypeError):
        plot_log_regimes({"no": "format"})


def test_unrecognised_json_lines_name_their_keys(tmp_path, capsys):
    p = tmp_path / "metrics.jsonl"
    p.write_text('{"step": 1, "loss": 0.7}\n{"step": 2, "loss": 0.6}\n')
    rc, _, err = _run(capsys, p)
    assert rc == 2 and "unrecognised JSON-lines log" in err and "step, loss" in err


def test_pair_levels_follow_paired_changes_not_pair_turnover():
    # pair 2 is absent at step 20: a plain mean would jump there although no pair moved so.
    s = logs.load_log(PAIRS)
    np.testing.assert_allclose(np.diff(s.chosen), s.delta_chosen)
    np.testing.assert_allclose(np.diff(s.rejected), s.delta_rejected)
    first = [json.loads(ln) for ln in PAIRS.read_text().splitlines()
             if json.loads(ln)["step"] == 0]
    assert s.chosen[0] == pytest.approx(sum(r["chosen_logp"] for r in first) / len(first))
