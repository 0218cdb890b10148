"""Preference rows in TRL's format, tokenised the way TRL 1.16's `DPOTrainer` tokenises them.

Rows: dicts with `prompt`, `chosen`, `rejected`, either strings (standard format) or lists of
`{"role", "content"}` messages (conversational format; `prompt` may be omitted, then the shared
leading messages are the prompt, as TRL's `extract_prompt` does). Sources: a JSON file (a list of
rows), a JSONL file, a list of dicts or a `datasets.Dataset`.

Tokenisation (TRL 1.16 `DPOTrainer._prepare_dataset` + `DataCollatorForPreference`):
* standard rows: the tokenizer's EOS is appended to `chosen` / `rejected` unless already there; the
  prompt and prompt+completion are tokenised with `tokenizer(text=...)`;
* conversational rows: `apply_chat_template(prompt, add_generation_prompt=True)` and
  `apply_chat_template(prompt + completion)` (EOS is whatever the template emits);
* the completion starts where the tokenised prompt and prompt+completion first differ;
* the collator concatenates prompt + completion, truncates to `max_length` keeping the start
  (TRL's default 1024), right-pads, and marks completion tokens in `completion_mask`.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable

import torch

REQUIRED = ("chosen", "rejected")


def _is_messages(x) -> bool:
    return isinstance(x, list) and len(x) > 0 and isinstance(x[0], dict) and "role" in x[0] and "content" in x[0]


def is_conversational(row: dict) -> bool:
    """True when the row's completions are message lists."""
    return any(_is_messages(row.get(k)) for k in ("prompt", "chosen", "rejected"))


def _extract_prompt(row: dict) -> dict:
    """Implicit prompt: the longest common leading run of messages of chosen and rejected."""
    c, r = row["chosen"], row["rejected"]
    i = 0
    while i < min(len(c), len(r)) and c[i] == r[i]:
        i += 1
    return {**row, "prompt": c[:i], "chosen": c[i:], "rejected": r[i:]}


def read_rows(source) -> tuple[list, str]:
    """(rows, where) from a JSON list / JSONL path (where = the path) or an iterable of dicts (where =
    'data'), not yet validated. Raises ValueError (one line) for a missing file or unreadable JSON."""
    if not isinstance(source, (str, Path)):
        return [dict(r) for r in source], "data"
    path = Path(source)
    if not path.is_file():
        raise ValueError(f"data file not found: {path}")
    text = path.read_text()
    try:
        if path.suffix == ".jsonl" or (text.lstrip()[:1] == "{" and "\n{" in text.strip()):
            rows = [json.loads(line) for line in text.splitlines() if line.strip()]
        else:
            rows = json.loads(text) if text.strip() else []
            rows = [rows] if isinstance(rows, dict) else rows
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}: not valid JSON/JSONL ({e.msg}, line {e.lineno})") from None
    return rows, str(path)


def load_preference_rows(source, *, limit: int | None = None) -> list[dict]:
    """Rows from a JSON/JSONL path, a list of dicts or a `datasets.Dataset`, validated.

    Raises ValueError (one line) for a missing file, unreadable JSON, no rows or missing columns.
    """
    rows, where = read_rows(source)
    if not isinstance(rows, list) or not all(isinstance(r, dict) for r in rows):
        raise ValueError(f"{where}: expected a list of objects with prompt/chosen/rejected")
    if not rows:
        raise ValueError(f"{where}: no rows")
    if limit is not None:
        rows = rows[:limit]
    for i, r in enumerate(rows):
        missing = [k for k in REQUIRED if k not in r]
        if "prompt" not in r and not (_is_messages(r.get("chosen")) and _is_messages(r.get("rejected"))):
            missing = ["prompt", *missing]
        if missing:
            raise ValueError(f"{where}: row {i} is missing column(s) {', '.join(missing)} "
                             f"(TRL preference format: prompt, chosen, rejected)")
    return rows


def shared_prefix(a, b) -> int:
    """Number of equal leading tokens.

    >>> shared_prefix([5, 6, 7], [5, 6, 9, 7])
    2
    """
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def token_ids(out) -> list[int]:
    """The token ids of a tokenizer's output (a dict with input_ids, or already a list)."""
    ids = out["input_ids"] if not isinstance(out, list) else out
    return list(ids)


def tokenize_row(tokenizer, row: dict) -> dict[str, list[int]]:
    """{'prompt_ids', 'chosen_ids', 'rejected_ids'} exactly as TRL 1.16's DPOTrainer builds them."""
    if "prompt" not in row:
        row = _extract_prompt(row)
    if is_conversational(row):
        tools = row.get("tools")
        tools = json.loads(tools) if isinstance(tools, str) else tools
        kw: dict[str, Any] = {"tools": tools, **row.get("chat_template_kwargs", {})}
        if getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("conversational rows need a tokenizer with a chat template")

        def tok(msgs, **extra):
            return token_ids(tokenizer.apply_chat_template(msgs, tokenize=True, return_dict=True, **extra, **kw))

        prompt = tok(row["prompt"], add_generation_prompt=True)
        pc = tok(row["prompt"] + row["chosen"])
        pr = tok(row["prompt"] + row["rejected"])
    else:
        eos = tokenizer.eos_token
        if eos is None:
            raise ValueError("the tokenizer has no eos_token (TRL appends it to every completion)")
        chosen, rejected = row["chosen"], row["rejected"]
        if not isinstance(chosen, str) or not isinstance(rejected, str) or not isinstance(row["prompt"], str):
            raise ValueError("prompt/chosen/rejected must all be strings or all message lists")
        chosen = chosen if chosen.endswith(eos) else chosen + eos
        rejected = rejected if rejected.endswith(eos) else rejected + eos
        prompt = token_ids(tokenizer(text=row["prompt"]))
        pc = token_ids(tokenizer(text=row["prompt"] + chosen))
        pr = token_ids(tokenizer(text=row["prompt"] + rejected))
    n = min(shared_prefix(prompt, pc), shared_prefix(prompt, pr))
    return {"prompt_ids": prompt[:n], "chosen_ids": pc[n:], "rejected_ids": pr[n:]}


def tokenize_rows(tokenizer, rows: Iterable[dict], *, max_length: int | None = 1024) -> list[dict]:
    """Tokenise every row; a completion with no token left (after truncation) raises ValueError."""
    out = []
    for i, r in enumerate(rows):
        ex = tokenize_row(tokenizer, r)
        for side in ("chosen", "rejected"):
            n_left = len(ex[f"{side}_ids"])
            if max_length is not None:
                n_left = min(n_left, max(0, max_length - len(ex["prompt_ids"])))
            if n_left == 0:
                raise ValueError(f"row {i}: the {side} completion tokenizes to zero tokens"
                                 + ("" if max_length is None else f" (within max_length={max_length})"))
        out.append(ex)
    return out


def collate(examples: list[dict], pad_token_id: int, *, max_length: int | None = None) -> dict[str, torch.Tensor]:
    """TRL's `DataCollatorForPreference` (keep_start truncation, right padding).

    Returns input_ids, attention_mask, completion_mask [2B, S]: rows 0..B-1 prompt+chosen,
    B..2B-1 prompt+rejected.
    """
    seqs, masks = [], []
    for side in ("chosen_ids", "rejected_ids"):
        for ex in examples:
            ids = list(ex["prompt_ids"]) + list(ex[side])
            m = [0] * len(ex["prompt_ids"]) + [1] * len(ex[side])
            if max_length is not None:
                ids, m = ids[:max_length], m[:max_length]
            seqs.append(ids)
            masks.append(m)
    S = max(len(s) for s in seqs)
    n = len(seqs)
    input_ids = torch.full((n, S), pad_token_id, dtype=torch.long)
    attention = torch.zeros((n, S), dtype=torch.long)
    completion = torch.zeros((n, S), dtype=torch.long)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        input_ids[i, :len(s)] = torch.tensor(s, dtype=torch.long)
        attention[i, :len(s)] = 1
        completion[i, :len(m)] = torch.tensor(m, dtype=torch.long)
    return {"input_ids": input_ids, "attention_mask": attention, "completion_mask": completion}


def pad_token_id(tokenizer) -> int:
    """TRL's choice: the tokenizer's pad token, else its EOS."""
    pid = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    if pid is None:
        raise ValueError("the tokenizer has neither a pad_token nor an eos_token")
    return int(pid)
