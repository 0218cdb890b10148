"""Forward-only CHES screen on tiny float64 models.

* batched CHES / ln-CHES (right padding, several pairs per forward) equal a per-pair brute force
  that slices the hidden states of the completion-predicting positions by hand: 1e-10 relative;
* on a hand-made hidden-state geometry the definitions give the known numbers (exact);
* top-K selection order and K <= 0; Spearman on a known permutation.
"""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from entangle_sim.torch import screen  # noqa: E402
from entangle_sim.torch.data import tokenize_rows  # noqa: E402
from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows  # noqa: E402


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_ches_batched_equals_brute_force(arch):
    tok = tiny_tokenizer()
    model = tiny_model(arch, tok, width=16).double()
    ex = tokenize_rows(tok, toy_rows(7, seed=3))
    got = screen.ches_scores(model, ex, tok.pad_token_id, batch_size=3)
    for i, e in enumerate(ex):
        sums = []
        for side in ("chosen_ids", "rejected_ids"):
            ids = torch.tensor([e["prompt_ids"] + e[side]])
            with torch.no_grad():
                h = model(input_ids=ids, output_hidden_states=True).hidden_states[-1][0]
            p, n = len(e["prompt_ids"]), len(e[side])
            sums.append((h[p - 1:p + n - 1].sum(0), n))  # positions predicting the n completion tokens
        (sp, n_p), (sm, n_m) = sums
        np.testing.assert_allclose(got["ches"][i], float(sp @ sm - sp @ sp), rtol=1e-10)
        np.testing.assert_allclose(got["ln_ches"][i], float(sp @ sm / (n_p * n_m) - sp @ sp / n_p ** 2), rtol=1e-10)
    if arch == "gpt2":  # --screen K: the exact Gram of the K best-scored pairs, in score order
        from entangle_sim.torch.measure import measure_pairs

        r = screen.screen_and_measure(model, ex, tok.pad_token_id, 3)
        assert r["index"].tolist() == np.argsort(-got["ln_ches"], kind="stable")[:3].tolist()
        full = measure_pairs(model, ex, tok.pad_token_id)
        np.testing.assert_allclose(r["measured"]["rho"], full["rho"][r["index"]], rtol=1e-9)
        assert set(r["spearman"]) == {"ches", "ln_ches"}


def test_ches_definition_on_known_hidden_states(monkeypatch):
    # S+ = (1, 2) over 2 tokens, S- = (3, 0) over 3 tokens:
    # CHES = <S+, S-> - |S+|^2 = 3 - 5 = -2; ln-CHES = 3 / 6 - 5 / 4 = -0.75
    monkeypatch.setattr(screen, "hidden_sums", lambda model, batch: (
        torch.tensor([[1.0, 2.0], [3.0, 0.0]], dtype=torch.float64), torch.tensor([2.0, 3.0], dtype=torch.float64)))
    r = screen.ches_batch(torch.nn.Linear(1, 1), {})
    assert r["ches"].tolist() == [-2.0] and r["ln_ches"].tolist() == [-0.75]


def test_select_top_and_rank_correlation():
    assert screen.select_top([0.1, 3.0, 2.0, 3.0], 3).tolist() == [1, 3, 2]
    assert screen.select_top([1.0, 2.0], 10).tolist() == [1, 0]
    with pytest.raises(ValueError, match=">= 1"):
        screen.select_top([1.0], 0)
    assert screen.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
    assert screen.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
    # one swapped neighbour pair among 4: 1 - 6 * 2 / (4 * 15) = 0.8
    assert screen.rank_correlation([1, 2, 3, 4], [1, 3, 2, 4]) == pytest.approx(0.8)
    assert np.isnan(screen.rank_correlation([1, 2], [2, 1]))
