"""Save/load results: npz arrays + a JSON config sidecar, atomic writes, cache keys by config hash."""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

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


def _atomic_write(path: Path, write) -> None:
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
    _atomic_write(Path(path), lambda f: f.write(text.encode()))


def save_npz(path, **arrays) -> None:
    _atomic_write(Path(path), lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


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
    _atomic_write(path.with_name(path.name + ".sha256"), lambda f: f.write(f"{digest}  {path.name}\n".encode()))


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
