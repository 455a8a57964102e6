"""Atomic checkpoints: equinox leaves plus a JSON of what is needed to rebuild the model."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

import equinox as eqx
import jax
import numpy as np

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


class CheckpointError(ValueError):
    """A checkpoint is corrupt (`kind="corrupt"`) or does not fit the tree it is loaded into
    (`kind="incompatible"`)."""

    def __init__(self, message: str, kind: str = "corrupt"):
        super().__init__(message)
        self.kind = kind


def read_meta(path: str | os.PathLike) -> dict:
    """The JSON written beside checkpoint `path` by `save_checkpoint`."""
    path = Path(path)
    meta_path = path.with_name(path.name + ".json")
    if not path.exists():
        raise FileNotFoundError(
            f"No checkpoint at {path}. Train a model with "
            "`python scripts/train.py --config configs/mnist_nano.py --workdir DIR` first."
        )
    if not meta_path.exists():
        raise FileNotFoundError(
            f"Checkpoint {path} has no metadata file {meta_path.name} beside it "
            "(save_checkpoint writes both; copy them together)."
        )
    try:
        meta = json.loads(meta_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"Checkpoint metadata {meta_path} is corrupt: {e}") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"Checkpoint metadata {meta_path} is corrupt: not a JSON object.")
    return meta


def _header(f, index: int, path: Path):
    """Shape and dtype from the `.npy` header at `f`'s position (which is kept)."""
    pos = f.tell()
    try:
        version = np.lib.format.read_magic(f)
        read = (
            np.lib.format.read_array_header_1_0
            if version == (1, 0)
            else np.lib.format.read_array_header_2_0
        )
        shape, _, dtype = read(f)
    except (ValueError, EOFError, OSError) as e:
        if pos == 0:
            why = f"corrupt: not an array file written by save_checkpoint ({e})"
        elif pos == os.fstat(f.fileno()).st_size:
            why = (
                f"incompatible or truncated: it ends after {index} arrays, and the "
                "model/optimiser to load into has more"
            )
        else:
            why = f"corrupt: no array header at array {index} (byte {pos})"
        kind = "incompatible" if why.startswith("incompatible") else "corrupt"
        raise CheckpointError(f"Checkpoint {path} is {why}.", kind) from None
    f.seek(pos)
    return shape, dtype


def load_checkpoint(path: str | os.PathLike, like: Any) -> Any:
    """Load leaves saved by `save_checkpoint` into a pytree shaped like `like`.

    **Raises:** `CheckpointError` (a `ValueError`), in one line, if the file is not an array
    file written by `save_checkpoint`, ends early, or holds arrays of other shapes, dtypes or
    number than `like`'s.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"No checkpoint at {path}.")
    index = 0

    def spec(f, x):
        nonlocal index
        if isinstance(x, (jax.Array, jax.ShapeDtypeStruct, np.ndarray, np.generic)):
            shape, dtype = _header(f, index, path)
            if tuple(shape) != tuple(x.shape) or dtype != x.dtype:
                raise CheckpointError(
                    f"Checkpoint {path} is incompatible: array {index} is {dtype}{list(shape)} "
                    f"on disk, {x.dtype}{list(x.shape)} in the model/optimiser to load into.",
                    "incompatible",
                )
        elif isinstance(x, (bool, int, float, complex)):
            _header(f, index, path)
        else:
            return eqx.default_deserialise_filter_spec(f, x)
        index += 1
        try:
            return eqx.default_deserialise_filter_spec(f, x)
        except (ValueError, EOFError, OSError) as e:
            raise CheckpointError(
                f"Checkpoint {path} is corrupt: array {index - 1} cannot be read "
                f"({type(e).__name__}: {e})."
            ) from None

    with open(path, "rb") as f:
        try:
            out = eqx.tree_deserialise_leaves(f, like, filter_spec=spec)
        except Exception as e:
            # Equinox wraps errors in one naming the leaf's path; ours already say it all.
            cause = e
            while cause is not None and not isinstance(cause, CheckpointError):
                cause = cause.__cause__
            if cause is None:
                raise CheckpointError(
                    f"Checkpoint {path} is incompatible: {type(e).__name__}: {e}", "incompatible"
                ) from None
            raise cause from None
        left = len(f.read())
    if left:
        raise CheckpointError(
            f"Checkpoint {path} is incompatible: it holds more than the {index} arrays of the "
            f"model/optimiser to load into ({left} bytes left).",
            "incompatible",
        )
    return out
