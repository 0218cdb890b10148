"""Preference rows streamed in chunks, and resumable chunked output.

Input (`iter_chunks(source, chunk_rows)`), never loaded whole:

* JSONL (`.jsonl`): read line by line;
* JSON (`.json`): a top-level array decoded one object at a time (`json.JSONDecoder.raw_decode` over
  a sliding buffer), or a single object;
* Parquet (`.parquet`, needs pyarrow): `ParquetFile.iter_batches`;
* a `datasets` dataset saved with `save_to_disk` (a folder): memory-mapped Arrow, iterated in slices.

Output (`run_chunked`): chunk k (rows k*chunk_rows ...) is computed by `compute(rows, start)` into
numpy columns and saved as `chunks/chunk-0000k.npz` with a `.sha256` sidecar (`results.save_chunk`,
both atomic); `manifest.json` lists the finished chunks. A killed run, started again with the same
configuration, skips every chunk whose file matches its checksum and recomputes the rest, so its
output is identical to an uninterrupted run's. Chunk boundaries do not depend on the number of
processes: with `rank`/`world_size` each process computes the chunks k with k % world_size == rank
(see `entangle_sim.torch.parallel`).

    out = run_chunked("pairs.jsonl", "out/diag", compute, chunk_rows=256, config={"model": "gpt2"})
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable, Iterator

import numpy as np

from .. import results

CHUNK_FILE = "chunk-{:05d}.npz"


class StreamError(ValueError):
    """Unreadable or invalid input (one-line message)."""


# ----------------------------------------------------------------------------------------------
# input
# ----------------------------------------------------------------------------------------------
def source_format(source) -> str:
    """'jsonl', 'json', 'parquet' or 'datasets' (a `save_to_disk` folder); StreamError otherwise."""
    p = Path(source)
    if p.is_dir():
        if (p / "dataset_info.json").is_file() or (p / "state.json").is_file():
            return "datasets"
        if (p / "dataset_dict.json").is_file():
            raise StreamError(f"{p}: a DatasetDict; pass one split's folder (e.g. {p / 'train'})")
        raise StreamError(f"{p}: a folder that is not a `datasets` save_to_disk folder")
    if not p.is_file():
        raise StreamError(f"data file not found: {p}")
    suf = p.suffix.lower()
    if suf == ".jsonl":
        return "jsonl"
    if suf == ".json":
        return "json"
    if suf in (".parquet", ".pq"):
        return "parquet"
    raise StreamError(f"{p}: unknown data format {suf!r} (.jsonl, .json, .parquet or a datasets folder)")


def iter_json_array(path: Path, block: int = 1 << 20) -> Iterator[dict]:
    """Objects of a top-level JSON array (or one top-level object), decoded incrementally."""
    dec = json.JSONDecoder()
    buf, pos, eof, started = "", 0, False, False
    with open(path, encoding="utf-8") as f:
        def more() -> bool:
            nonlocal buf, pos, eof
            chunk = f.read(block)
            if not chunk:
                eof = True
                return False
            buf = buf[pos:] + chunk
            pos = 0
            return True

        while True:
            while pos < len(buf) and buf[pos] in " \t\r\n,":
                pos += 1
            if pos >= len(buf):
                if eof or not more():
                    if not started:
                        raise StreamError(f"{path}: empty JSON file")
                    raise StreamError(f"{path}: JSON array not closed")
                continue
            if not started:
                started = True
                if buf[pos] == "{":  # a single object
                    try:
                        obj, _ = dec.raw_decode(buf[pos:] + f.read())
                    except json.JSONDecodeError as e:
                        raise StreamError(f"{path}: not valid JSON ({e.msg})") from None
                    yield obj
                    return
                if buf[pos] != "[":
                    raise StreamError(f"{path}: expected a JSON array of rows")
                pos += 1
                continue
            if buf[pos] == "]":
                return
            try:
                obj, end = dec.raw_decode(buf, pos)
            except json.JSONDecodeError as e:
                if not eof and more():
                    continue
                raise StreamError(f"{path}: not valid JSON ({e.msg})") from None
            if end == len(buf) and not eof:  # a value cut at the buffer's end could be longer: re-read
                if more():
                    continue
            pos = end
            yield obj


def _jsonl(path: Path) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for i, line in enumerate(f, 1):
            if line.strip():
                try:
                    yield json.loads(line)
                except json.JSONDecodeError as e:
                    raise StreamError(f"{path}: line {i} is not valid JSON ({e.msg})") from None


def iter_rows(source) -> Iterator[dict]:
    """Rows one by one (dicts), in file order."""
    fmt = source_format(source)
    p = Path(source)
    if fmt == "jsonl":
        yield from _jsonl(p)
    elif fmt == "json":
        yield from iter_json_array(p)
    elif fmt == "parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise StreamError("Parquet input needs pyarrow: pip install pyarrow") from None
        for batch in pq.ParquetFile(p).iter_batches(batch_size=1024):
            yield from batch.to_pylist()
    else:
        from datasets import load_from_disk

        ds = load_from_disk(str(p))  # memory-mapped; slices are read on demand
        for s in range(0, len(ds), 1024):
            yield from _rows_of(ds[s:s + 1024])


def _rows_of(cols: dict) -> list[dict]:
    keys = list(cols)
    n = len(cols[keys[0]]) if keys else 0
    return [{k: cols[k][i] for k in keys} for i in range(n)]


def count_rows(source) -> int | None:
    """Number of rows without decoding them (JSONL: non-blank lines; Parquet: metadata; datasets: its
    length); None for a JSON array (unknown until read)."""
    fmt = source_format(source)
    p = Path(source)
    if fmt == "jsonl":
        with open(p, "rb") as f:
            return sum(1 for line in f if line.strip())
    if fmt == "parquet":
        import pyarrow.parquet as pq
        return pq.ParquetFile(p).metadata.num_rows
    if fmt == "datasets":
        from datasets import load_from_disk
        return len(load_from_disk(str(p)))
    return None


def iter_chunks(source, chunk_rows: int, *, validate: bool = True) -> Iterator[tuple[int, list[dict]]]:
    """(start row, rows) chunks of `chunk_rows` rows; each chunk checked for the TRL preference columns."""
    if chunk_rows <= 0:
        raise StreamError(f"chunk_rows must be >= 1, got {chunk_rows}")
    buf: list[dict] = []
    start = 0
    for row in iter_rows(source):
        buf.append(row)
        if len(buf) == chunk_rows:
            yield start, _checked(buf, start, source) if validate else buf
            start += len(buf)
            buf = []
    if buf:
        yield start, _checked(buf, start, source) if validate else buf
    elif start == 0:
        raise StreamError(f"{source}: no rows")


def _checked(rows: list[dict], start: int, source) -> list[dict]:
    from .data import load_preference_rows

    if not all(isinstance(r, dict) for r in rows):
        raise StreamError(f"{source}: rows {start}..{start + len(rows) - 1}: expected objects with prompt/chosen/rejected")
    try:
        return load_preference_rows(rows)
    except ValueError as e:
        msg = str(e)
        if msg.startswith("data: row "):
            i, rest = msg[len("data: row "):].split(" ", 1)
            msg = f"row {start + int(i)} {rest}"
        raise StreamError(f"{source}: {msg}") from None


# ----------------------------------------------------------------------------------------------
# resumable chunked output
# ----------------------------------------------------------------------------------------------
def chunk_path(out, k: int) -> Path:
    return Path(out) / "chunks" / CHUNK_FILE.format(k)


def _manifest(out, done: dict[int, dict]) -> None:
    results.save_json(Path(out) / "manifest.json", {"chunks": [done[k] for k in sorted(done)]})


def prepare_out(source, out, chunk_rows: int, config: dict | None = None) -> Path:
    """`results.prepare_dir` with the run's configuration (source path, chunk_rows, `config`)."""
    cfg = {"source": str(Path(source).resolve()), "chunk_rows": int(chunk_rows), **(config or {})}
    return results.prepare_dir(out, cfg)


def run_chunked(source, out, compute: Callable[[list[dict], int], dict], *, chunk_rows: int = 256,
                config: dict | None = None, rank: int = 0, world_size: int = 1, progress: bool = True,
                desc: str = "pairs", validate: bool = True):
    """Stream `source` in chunks; `compute(rows, start) -> {column: numpy [len(rows)]}`; resumable.

    The output folder holds config.json (`results.prepare_dir`: a different configuration is refused),
    chunks/chunk-*.npz (+ .sha256) and manifest.json. Returns the concatenated columns (rank 0 /
    single process, after every chunk exists) or None on other ranks. Progress: a tqdm bar with ETA
    (rows; resumed chunks count at once). validate=False skips the TRL column check (rows of
    another shape, e.g. pre-tokenised ids). With world_size > 1 every rank returns the number of
    chunks instead, and `merge_chunks` (after a barrier) concatenates them.
    """
    from tqdm.auto import tqdm

    out = Path(out)
    if rank == 0:
        prepare_out(source, out, chunk_rows, config)
    total = count_rows(source)
    bar = tqdm(total=total, desc=desc, unit="row", disable=not progress or rank != 0, dynamic_ncols=True)
    done: dict[int, dict] = {}
    n_chunks = 0
    try:
        for k, (start, rows) in enumerate(iter_chunks(source, chunk_rows, validate=validate)):
            n_chunks = k + 1
            if k % world_size != rank:
                continue
            path = chunk_path(out, k)
            cols = results.load_chunk(path)
            if cols is None or len(next(iter(cols.values()), [])) != len(rows):
                cols = compute(rows, start)
                cols = {c: np.asarray(v) for c, v in cols.items()}
                bad = [c for c, v in cols.items() if v.shape[:1] != (len(rows),)]
                if bad:
                    raise ValueError(f"compute returned column {bad[0]!r} of length {cols[bad[0]].shape[:1]}, "
                                     f"expected {len(rows)}")
                results.save_chunk(path, **cols)
            if world_size == 1:
                done[k] = {"chunk": k, "start": start, "rows": len(rows), "file": path.name,
                           "sha256": path.with_name(path.name + ".sha256").read_text().split()[0]}
                _manifest(out, done)
            bar.update(len(rows) * (world_size if world_size > 1 else 1))
    finally:
        bar.close()
    return merge_chunks(out, n_chunks) if world_size == 1 else n_chunks


def merge_chunks(out, n_chunks: int) -> dict[str, np.ndarray]:
    """Concatenate chunks 0..n_chunks-1 (each must exist and match its checksum) and write the manifest."""
    out = Path(out)
    parts, done, start = [], {}, 0
    for k in range(n_chunks):
        path = chunk_path(out, k)
        cols = results.load_chunk(path)
        if cols is None:
            raise StreamError(f"{path}: missing or damaged chunk (run again to recompute it)")
        n = len(next(iter(cols.values())))
        done[k] = {"chunk": k, "start": start, "rows": n, "file": path.name,
                   "sha256": path.with_name(path.name + ".sha256").read_text().split()[0]}
        start += n
        parts.append(cols)
    _manifest(out, done)
    if not parts:
        return {}
    return {c: np.concatenate([p[c] for p in parts]) for c in parts[0]}
