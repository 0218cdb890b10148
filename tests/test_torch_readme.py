"""The README's PyTorch example runs as written on a tiny model saved as `my-model/`."""
import json
import re
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

ROOT = Path(__file__).resolve().parents[1]


def test_readme_torch_example_runs(tmp_path, monkeypatch):
    from entangle_sim.torch.tiny import tiny_model, tiny_tokenizer, toy_rows

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(tmp_path)
    tok = tiny_tokenizer()
    tiny_model("gpt2", tok).save_pretrained("my-model")
    tok.save_pretrained("my-model")
    Path("pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in toy_rows(3)))
    blocks = re.findall(r"```python\n(.*?)\n```", (ROOT / "README.md").read_text(), flags=re.S)
    code = next(b for b in blocks if "entangle_sim.torch" in b)
    assert len(code.splitlines()) <= 11
    ns: dict = {}
    exec(compile(code, "README.md", "exec"), ns)  # noqa: S102 - the README's own example
    g, heat = ns["g"], ns["heat"]
    assert g.cos.shape == (3,) and heat.shape[0] == len(ns["tokenize_rows"](tok, ns["rows"])[0]["chosen_ids"])
