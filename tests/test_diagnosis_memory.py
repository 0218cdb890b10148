"""`run_diagnosis` streams every step, not only the measurement.

* the streamed batch-level prediction (`MeasurementSession.predict_stream`: v accumulated chunk by chunk,
  then <g_i, v> chunk by chunk) equals the in-memory one (`predict`, one 2B-row batch) in float64, with
  a chunk size that does not divide the number of pairs, for the ghost and the exact method;
* a whole diagnosis (written to --out, with token maps and top pairs) of 48 rows in chunks of 4 never
  has more than a few chunks' worth of rows (or tokenised pairs) alive at once: every row and every
  tokenised pair handed out is counted while it lives. Holding all rows (a `rows` / `examples` list
  for the batch prediction) would make 48 of them alive together.
"""
import gc
import json
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import data as tdata  # noqa: E402
from entangle_sim.torch.data import pad_token_id, tokenize_rows  # noqa: E402
from entangle_sim.torch.session import MeasurementSession  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402

pytestmark = pytest.mark.filterwarnings("ignore::UserWarning", "ignore::FutureWarning", "ignore::DeprecationWarning")


@pytest.fixture(scope="module")
def tok():
    return tiny_tokenizer()


@pytest.fixture(scope="module")
def model64(tok):
    return tiny_model("gpt2", tok, width=16).double()


@pytest.mark.parametrize("method", ["ghost", "exact"])
def test_predict_stream_equals_in_memory(tok, model64, method):
    ex = tokenize_rows(tok, toy_rows(7, seed=11))
    rng = np.random.default_rng(0)
    c_w, c_l = rng.uniform(0.1, 1.0, 7) / 7, rng.uniform(0.1, 1.0, 7) / 7
    s = MeasurementSession(model64, pad_token_id=pad_token_id(tok), method=method, batch_size=2)
    calls = []

    def chunks():  # 3 + 3 + 1 pairs; a fresh iterator on every call
        calls.append(1)
        return (ex[i:i + 3] for i in range(0, 7, 3))

    dw, dl = s.predict_stream(chunks, c_w, c_l)
    rw, rl = s.predict(ex, c_w, c_l)
    assert len(calls) == 2  # two passes over the data, no more
    scale = max(np.abs(rw).max(), np.abs(rl).max())
    # float64 throughout; only the summation order differs (chunked vs one batch): round-off ~1e-15
    np.testing.assert_allclose(dw, rw, rtol=0, atol=1e-10 * scale)
    np.testing.assert_allclose(dl, rl, rtol=0, atol=1e-10 * scale)
    with pytest.raises(ValueError, match="gave 6 pairs"):
        s.predict_stream(lambda: iter([ex[:3], ex[3:6]]), c_w, c_l)


class _Tracked(dict):
    """A dict that counts how many of its kind are alive (weakref finalizers run when freed)."""

    alive = 0
    peak = 0
    made = 0

    @classmethod
    def of(cls, d):
        t = cls(d)
        cls.alive += 1
        cls.made += 1
        cls.peak = max(cls.peak, cls.alive)
        weakref.finalize(t, cls._freed)
        return t

    @classmethod
    def _freed(cls):
        cls.alive -= 1


def test_run_diagnosis_never_holds_all_rows(tok, tmp_path, monkeypatch):
    from entangle_sim.torch.diagnosis_run import run_diagnosis

    n, chunk = 48, 4
    src = tmp_path / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in toy_rows(n, seed=2)))
    model = tiny_model("gpt2", tok, width=8, layers=1)
    # every validated row (stream.iter_chunks -> data.load_preference_rows) and every tokenised pair
    # (data.tokenize_row) is a tracked dict
    real_load, real_tok = tdata.load_preference_rows, tdata.tokenize_row
    monkeypatch.setattr(tdata, "load_preference_rows", lambda rows, **k: [_Tracked.of(r) for r in real_load(rows, **k)])
    monkeypatch.setattr(tdata, "tokenize_row", lambda t, r: _Tracked.of(real_tok(t, r)))
    gc.collect()
    _Tracked.alive = _Tracked.peak = _Tracked.made = 0
    top_k, token_maps = 3, 1
    res = run_diagnosis(model, tok, src, out=tmp_path / "out", chunk_rows=chunk, batch_size=chunk, top_k=top_k,
                        token_maps=token_maps, progress=False)
    assert res["summary"]["n_pairs"] == n and len(res["table"]) == n
    assert len(res["summary"]["top_pairs"]) == top_k and "chosen_tokens" in res["summary"]["top_pairs"][0]
    assert _Tracked.made >= 4 * n  # rows and pairs were read several times (selection, measurement, passes)
    # kept on purpose: the top pairs and the token maps' pairs; in flight: a chunk of rows, its pairs
    # tokenised twice (measurement and per-group split) and the next chunk being read (4 chunks)
    assert _Tracked.peak <= top_k + token_maps + 4 * chunk < n, _Tracked.peak
