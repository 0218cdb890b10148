"""The results layer: every file the package writes or reads back goes through here.

* `atomic_write(path, write)`: temp file in the same directory + `os.replace` (readers see the old
  file or the new one, never half of one); `save_json`, `save_text`, `save_npz`, `save_figure` use it.
* npz arrays + a JSON config sidecar (`prepare_dir`, `load_npz`) for resumable sweeps.
* figure/check data: nested dicts of arrays and JSON values in one npz (`save_data`, `load_data`).
* the cache: `code_fingerprint` (hash of the computational source), `config_hash`, `load_or_build`
  (one cache for figure data and report checks).
* `markdown_table`: the one markdown-table writer.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

from . import __version__


def config_hash(config: dict[str, Any]) -> str:
    """Stable short hash of a JSON-able config (sorted keys)."""
    blob = json.dumps(config, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _file_mode() -> int:
    """Ordinary mode for a new file: 0666 minus the umask (mkstemp's temporaries are 0600)."""
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


def remove_stale_tmp(folder) -> int:
    """Delete temporary files left by an interrupted atomic write (`.NAME.*.tmp`); returns the count."""
    n = 0
    for p in Path(folder).glob(".*.tmp"):
        try:
            p.unlink()
            n += 1
        except OSError:
            pass
    return n


# ----------------------------------------------------------------------------------------------
# atomic writers
# ----------------------------------------------------------------------------------------------
def atomic_write(path, write: Callable) -> None:
    """Write through `write(binary file)` into a temporary file next to `path` (flushed and fsynced),
    then rename; the file gets the ordinary mode 0666 & ~umask, and the temporary is removed on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, _file_mode())
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def strict_json_value(obj: Any) -> Any:
    """`obj` with every non-finite float (NaN, inf) replaced by None, so it is valid JSON."""
    if isinstance(obj, float):
        return obj if np.isfinite(obj) else None
    if isinstance(obj, dict):
        return {k: strict_json_value(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [strict_json_value(v) for v in obj]
    if isinstance(obj, np.generic) and np.issubdtype(type(obj), np.floating):
        return strict_json_value(float(obj))
    return obj


def save_json(path, obj: Any) -> None:
    """Strict JSON written atomically (mode 0666 & ~umask); non-finite floats are written as null."""
    text = json.dumps(strict_json_value(obj), indent=2, default=str, allow_nan=False)
    atomic_write(path, lambda f: f.write(text.encode()))


_atomic_write = atomic_write   # the name earlier callers used


def save_text(path, text: str) -> None:
    atomic_write(path, lambda f: f.write(text.encode()))


def save_npz(path, **arrays) -> None:
    atomic_write(path, lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def save_figure(fig, out_dir, name: str, exts: Sequence[str] = ("png", "pdf")) -> list[Path]:
    """Save a matplotlib Figure as out_dir/name.{png,pdf}, each atomically; returns the paths."""
    paths = []
    for ext in exts:
        path = Path(out_dir) / f"{name}.{ext}"
        atomic_write(path, lambda f, ext=ext: fig.savefig(f, format=ext))
        paths.append(path)
    return paths


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def _sha256(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def save_chunk(path, **arrays) -> None:
    """A resumable chunk: the npz, then a `.sha256` sidecar with its checksum (both atomic; a chunk
    without a matching sidecar is treated as missing by `load_chunk`)."""
    path = Path(path)
    save_npz(path, **arrays)
    digest = _sha256(path)
    atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))


def load_chunk(path) -> dict[str, np.ndarray] | None:
    """The chunk's arrays if it exists and matches its checksum, else None (missing, cut short or
    damaged: the caller recomputes it)."""
    path = Path(path)
    side = path.with_name(path.name + ".sha256")
    if not (path.is_file() and side.is_file()):
        return None
    try:
        expected = side.read_text().split()[0]
        if _sha256(path) != expected:
            return None
        return load_npz(path)
    except (OSError, ValueError, IndexError, EOFError, KeyError):
        return None
    except Exception:  # zipfile.BadZipFile and friends from a damaged archive
        return None


def prepare_dir(out, config: dict[str, Any]) -> Path:
    """Create `out` with config.json (config + package version + hash); refuse a different config."""
    out = Path(out)
    if out.is_dir():
        remove_stale_tmp(out)
    meta = {"config": config, "hash": config_hash(config), "entangle_sim_version": __version__}
    cfg_path = out / "config.json"
    if cfg_path.exists():
        try:
            old = json.loads(cfg_path.read_text())
        except json.JSONDecodeError:
            old = {}
        if old.get("hash") != meta["hash"]:
            raise ValueError(f"{out} holds results of a different configuration (hash {old.get('hash')} != "
                             f"{meta['hash']}); choose another --out")
    else:
        save_json(cfg_path, meta)
    return out


# ----------------------------------------------------------------------------------------------
# nested data dicts: arrays in npz, everything else as one JSON string; keys flattened with '/'
# ----------------------------------------------------------------------------------------------
def flatten(d: dict, prefix: str = "") -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Nested dict -> ({'a/b': array}, {'a/c': JSON value}); non-empty dicts are descended into."""
    arrays, meta = {}, {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if "/" in str(k):
            raise ValueError(f"data key {k!r} must not contain '/'")
        if isinstance(v, dict) and v:
            a, m = flatten(v, key + "/")
            arrays.update(a)
            meta.update(m)
        elif isinstance(v, (np.ndarray, np.generic)) or type(v).__module__.startswith("jax"):
            arrays[key] = np.asarray(v)
        else:
            meta[key] = v
    return arrays, meta


def unflatten(arrays: dict[str, np.ndarray], meta: dict[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in [*meta.items(), *arrays.items()]:
        parts = k.split("/")
        node = out
        for p in parts[:-1]:
            node = node.setdefault(p, {})
        node[parts[-1]] = v
    return out


def json_default(x):
    if isinstance(x, np.generic):
        return x.item()
    if isinstance(x, np.ndarray):
        return x.tolist()
    return str(x)


def save_data(path, data: dict[str, Any]) -> None:
    """Atomically write a data dict (arrays + JSON-able values, nested) to one npz file."""
    arrays, meta = flatten(data)
    arrays["__json__"] = np.asarray(json.dumps(meta, default=json_default))
    save_npz(path, **arrays)


def load_data(path) -> dict[str, Any]:
    arrays = load_npz(path)
    meta = json.loads(str(arrays.pop("__json__")))
    return unflatten(arrays, meta)


# ----------------------------------------------------------------------------------------------
# the cache
# ----------------------------------------------------------------------------------------------
# Not science: changing them must not invalidate cached numbers.
SKIP_FINGERPRINT = ("plotting", "cli", "torch", "report", "report.py", "reproduce.py", "figures.py", "logs.py",
                    "distributed.py", "results.py")
# Modules that enter the fingerprint only of the results that use them (`code_fingerprint(extra)`).
OPTIONAL_CODE = ("diagnose.py", "sentiment.py", "corpus.py", "claim_stats.py", "mitigations.py", "mitigations",
                 "symbolic/mitigations.py", "policies/transformer.py")


def code_fingerprint(extra: tuple = ()) -> str:
    """Hash of the package's computational source files (not plotting / CLI / report code): a change
    to the science invalidates cached results, a change to a figure's look does not. Modules of
    `OPTIONAL_CODE` (a file, or a package folder) are included only when named in `extra`."""
    root = Path(__file__).resolve().parent
    h = hashlib.sha256()
    for f in sorted(root.rglob("*.py")):
        rel = f.relative_to(root).as_posix()
        top = rel.split("/")[0]
        optional = rel in OPTIONAL_CODE or top in OPTIONAL_CODE
        if top in SKIP_FINGERPRINT or (optional and rel not in extra and top not in extra):
            continue
        h.update(rel.encode())
        h.update(f.read_bytes())
    return h.hexdigest()[:16]


def load_or_build(path, build: Callable[[], Any], *, fmt: str = "npz", force: bool = False) -> Any:
    """The cached value at `path` if present (and readable), else `build()` saved atomically there.

    fmt: 'npz' (a nested data dict, `save_data`) or 'json'. path=None: always build, never write.
    A corrupt cache file (not expected: writes are atomic) is rebuilt."""
    load, save = (load_data, save_data) if fmt == "npz" else (lambda p: json.loads(Path(p).read_text()), save_json)
    if path is not None and Path(path).exists() and not force:
        try:
            return load(path)
        except Exception:
            pass
    value = build()
    if path is not None:
        save(path, value)
    return value


# ----------------------------------------------------------------------------------------------
# markdown
# ----------------------------------------------------------------------------------------------
def markdown_cell(x) -> str:
    """A table cell: '|' escaped, newlines folded."""
    return str(x).replace("|", "\\|").replace("\n", " ")


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]], *, escape: bool = True) -> str:
    """GitHub markdown table: '| a | b |', '|---|---|', one line per row (cells str()-ed).

    >>> markdown_table(["x", "y"], [[1, 2]])
    '| x | y |\\n|---|---|\\n| 1 | 2 |'
    """
    cell = markdown_cell if escape else str
    lines = ["| " + " | ".join(str(h) for h in header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in r) + " |" for r in rows]
    return "\n".join(lines)
