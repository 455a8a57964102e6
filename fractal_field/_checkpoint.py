"""Atomic checkpoints: equinox leaves plus a JSON of what is needed to rebuild the model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx

FORMAT_VERSION = 1


def _atomic_write(path: Path, write) -> None:
    """Write through `write(fileobj)` into a temporary file, fsync, then rename over `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600 files; checkpoints are meant to be shared
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def save_checkpoint(path: str | os.PathLike, tree: Any, meta: dict) -> None:
    """Save `tree` (any pytree of arrays/modules) to `path` and `meta` to `path + '.json'`.

    Both files are written atomically (temporary file + rename); the array file is
    written first and the JSON last, so a JSON always describes a complete array file.
    """
    path = Path(path)
    meta = dict(meta, format_version=FORMAT_VERSION)
    _atomic_write(path, lambda f: eqx.tree_serialise_leaves(f, tree))
    _atomic_write(
        path.with_name(path.name + ".json"),
        lambda f: f.write(json.dumps(meta, indent=2, sort_keys=True, default=str).encode()),
    )


def read_meta(path: str | os.PathLike) -> dict:
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not path.exists() or not meta_path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path} (expected {path} and {meta_path}). Train a model with "
            "`python scripts/train.py --config configs/mnist_nano.py --workdir DIR` first."
        )
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"Checkpoint metadata {meta_path} is corrupt: {e}") from e


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Load leaves saved by `save_checkpoint` into a pytree shaped like `like`."""
    path = Path(path)
    try:
        return eqx.tree_deserialise_leaves(path, like)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"Checkpoint {path} does not match the model/optimiser built from its config "
            f"(incompatible config or corrupt file): {type(e).__name__}: {e}"
        ) from e
