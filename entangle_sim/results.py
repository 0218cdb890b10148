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


def _atomic_write(path: Path, write) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
        os.replace(tmp, path)  # atomic on POSIX: readers see the old file or the new one, never half
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def save_json(path, obj: Any) -> None:
    _atomic_write(Path(path), lambda f: f.write(json.dumps(obj, indent=2, default=str).encode()))


def save_npz(path, **arrays) -> None:
    _atomic_write(Path(path), lambda f: np.savez_compressed(f, **{k: np.asarray(v) for k, v in arrays.items()}))


def load_npz(path) -> dict[str, np.ndarray]:
    with np.load(path) as z:
        return {k: z[k] for k in z.files}


def prepare_dir(out, config: dict[str, Any]) -> Path:
    """Create `out` with config.json (config + package version + hash); refuse a different config."""
    out = Path(out)
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
