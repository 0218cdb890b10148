"""Streaming input (JSONL, JSON, Parquet, a `datasets` folder) and resumable chunked output.

* every format yields exactly the rows written, in order, in chunks of the requested size; the JSON
  array decoder is run with a 7-byte buffer so that objects straddle every block boundary;
* a run killed after two chunks resumes: only the missing chunks are recomputed and the output
  (arrays and chunk files, byte for byte) equals an uninterrupted run's; a damaged chunk is
  recomputed; another configuration in the same folder is refused;
* bad input is one-line `StreamError` naming the row in the whole file.
"""
import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")

from entangle_sim.torch import stream  # noqa: E402
from entangle_sim.torch.tiny import toy_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::FutureWarning")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("data")
    rows = toy_rows(23, seed=4) + toy_rows(2, conversational=True)
    (d / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    (d / "r.json").write_text(json.dumps(rows, indent=1))
    out = {"jsonl": d / "r.jsonl", "json": d / "r.json"}
    try:
        import pyarrow as pa
        import pyarrow.parquet as pq
        flat = toy_rows(23, seed=4)  # one schema per Parquet file: standard rows only
        pq.write_table(pa.Table.from_pylist(flat), d / "r.parquet")
        out["parquet"] = d / "r.parquet"
    except ImportError:
        pass
    try:
        import datasets
        datasets.disable_progress_bars()
        datasets.Dataset.from_list(toy_rows(23, seed=4)).save_to_disk(str(d / "ds"))
        out["datasets"] = d / "ds"
    except ImportError:
        pass
    return rows, out


@pytest.mark.parametrize("fmt", ["jsonl", "json", "parquet", "datasets"])
def test_formats_stream_the_same_rows(files, fmt):
    rows, paths = files
    if fmt not in paths:
        pytest.skip(f"{fmt} support not installed")
    expected = rows if fmt in ("jsonl", "json") else rows[:23]
    chunks = list(stream.iter_chunks(paths[fmt], 5))
    assert [s for s, _ in chunks] == list(range(0, len(expected), 5))
    assert [r for _, c in chunks for r in c] == expected
    assert stream.count_rows(paths[fmt]) in (None, len(expected))
    if fmt == "json":
        assert list(stream.iter_json_array(paths["json"], block=7)) == rows


def _compute(calls):
    def f(rows, start):
        calls.append(start)
        return {"start": np.full(len(rows), start), "n_chosen": np.array([len(str(r["chosen"])) for r in rows]),
                "x": np.sin(np.arange(start, start + len(rows)) * 0.37)}
    return f


def test_killed_run_resumes_with_identical_output(files, tmp_path):
    src = files[1]["jsonl"]
    full_calls = []
    full = stream.run_chunked(src, tmp_path / "full", _compute(full_calls), chunk_rows=4, progress=False)
    assert full_calls == [0, 4, 8, 12, 16, 20, 24]

    calls = []

    def dies(rows, start):
        if start == 8:
            raise KeyboardInterrupt  # killed during the third chunk
        return _compute(calls)(rows, start)

    with pytest.raises(KeyboardInterrupt):
        stream.run_chunked(src, tmp_path / "cut", dies, chunk_rows=4, progress=False)
    assert calls == [0, 4]
    calls.clear()
    again = stream.run_chunked(src, tmp_path / "cut", _compute(calls), chunk_rows=4, progress=False)
    assert calls == [8, 12, 16, 20, 24]
    for k in full:
        np.testing.assert_array_equal(again[k], full[k])
    for f in sorted((tmp_path / "full" / "chunks").iterdir()):
        assert (tmp_path / "cut" / "chunks" / f.name).read_bytes() == f.read_bytes()
    man = json.loads((tmp_path / "cut" / "manifest.json").read_text())
    assert [c["rows"] for c in man["chunks"]] == [4] * 6 + [1]

    p = stream.chunk_path(tmp_path / "cut", 3)       # damage one chunk: it is recomputed
    p.write_bytes(p.read_bytes()[:-10])
    calls.clear()
    again = stream.run_chunked(src, tmp_path / "cut", _compute(calls), chunk_rows=4, progress=False)
    assert calls == [12]
    np.testing.assert_array_equal(again["x"], full["x"])
    with pytest.raises(ValueError, match="different configuration"):
        stream.run_chunked(src, tmp_path / "cut", _compute(calls), chunk_rows=5, progress=False)


def test_bad_input_is_one_line(tmp_path):
    rows = toy_rows(7)
    del rows[5]["rejected"]
    (tmp_path / "bad.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    with pytest.raises(stream.StreamError, match=r"row 5 is missing column\(s\) rejected"):
        list(stream.iter_chunks(tmp_path / "bad.jsonl", 3))
    (tmp_path / "broken.jsonl").write_text('{"prompt": "a"}\n{oops\n')
    with pytest.raises(stream.StreamError, match="line 2 is not valid JSON"):
        list(stream.iter_chunks(tmp_path / "broken.jsonl", 3))
    (tmp_path / "cut.json").write_text(json.dumps(toy_rows(3))[:-5])
    with pytest.raises(stream.StreamError, match="not valid JSON|not closed"):
        list(stream.iter_chunks(tmp_path / "cut.json", 3))
    (tmp_path / "x.csv").write_text("a,b\n")
    with pytest.raises(stream.StreamError, match="unknown data format"):
        stream.source_format(tmp_path / "x.csv")
    with pytest.raises(stream.StreamError, match="not found"):
        stream.source_format(tmp_path / "nope.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(stream.StreamError, match="no rows"):
        list(stream.iter_chunks(tmp_path / "empty.jsonl", 3))
    assert Path(tmp_path / "bad.jsonl").exists()


def test_measure_rows_through_the_chunked_runner(tmp_path):
    torch = pytest.importorskip("torch")
    from entangle_sim.torch import diagnosis, optim_state
    from entangle_sim.torch.data import collate, tokenize_rows
    from entangle_sim.torch.geometry import response_logps
    from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer

    tok = tiny_tokenizer()
    model = tiny_model("gpt2", tok, width=16).double()
    ref = tiny_model("gpt2", tok, width=16, seed=3).double()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    b = collate(tokenize_rows(tok, toy_rows(3, seed=9)), tok.pad_token_id)
    response_logps(model, b["input_ids"], b["attention_mask"], b["completion_mask"]).sum().backward()
    opt.step()
    st = optim_state.from_optimizer(opt, model)
    rows = toy_rows(7, seed=5)
    src = tmp_path / "rows.jsonl"
    src.write_text("\n".join(json.dumps(r) for r in rows))

    def compute(rs, start):
        return diagnosis.measure_rows(model, tok, rs, start, state=st, ref_model=ref, by_group=True, batch_size=2)

    cols = stream.run_chunked(src, tmp_path / "o", compute, chunk_rows=3, progress=False)
    plain, groups = diagnosis.split_group_columns(cols)
    assert plain["index"].tolist() == list(range(7))
    assert {"G_ww_adam", "G_wl_adam", "G_ll_adam", "ref_chosen_logps", "G_wl", "rho"} <= set(plain)
    np.testing.assert_allclose(sum(d["G_wl_adam"] for d in groups.values()), plain["G_wl_adam"], rtol=1e-12)
    whole = collate(tokenize_rows(tok, rows), tok.pad_token_id)
    with torch.no_grad():
        lp = response_logps(ref, whole["input_ids"], whole["attention_mask"], whole["completion_mask"]).numpy()
    np.testing.assert_allclose(plain["ref_chosen_logps"], lp[:7], rtol=1e-10)
    np.testing.assert_allclose(plain["ref_rejected_logps"], lp[7:], rtol=1e-10)
