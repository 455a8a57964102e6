"""Master and key files. The master is stored once (float16 weights plus its config); a key
file holds a book's key, tied to its master by the master's hash."""

from __future__ import annotations

import os
import struct
import zlib
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .._checkpoint import load_checkpoint, read_meta, save_checkpoint
from ._codec import VERSION, AtlasFormatError, master_hash, round_to_storage
from ._model import AtlasMaster, build_master, master_config
from ._quant import pack_leaf, unpack_leaf

KEY_MAGIC = b"FFATKEY\x00"
_KEY_HEADER = struct.Struct("<8sH16sH")  # magic, version, master hash, key size


def _packed(master: AtlasMaster) -> list:
    params = eqx.filter(master, eqx.is_inexact_array)
    return [pack_leaf(x) for x in jax.tree_util.tree_leaves(params)]


def save_master(path: str | os.PathLike, master: AtlasMaster, **meta) -> None:
    """Store `master` (int8 matrices with per-row power-of-two scales, float16 vectors;
    written atomically) with its config and hash in `path.json`."""
    master = round_to_storage(master)
    save_checkpoint(
        path,
        _packed(master),
        dict(meta, atlas_master=master_config(master), master_hash=master_hash(master).hex()),
    )


def load_master(path: str | os.PathLike) -> AtlasMaster:
    """Read a master written by `save_master`."""
    meta = read_meta(path)
    if "atlas_master" not in meta:
        raise ValueError(f"{path} is not an Atlas master (no 'atlas_master' in its JSON).")
    like = build_master(meta["atlas_master"])
    packed = load_checkpoint(path, _packed(like))
    params, static = eqx.partition(like, eqx.is_inexact_array)
    leaves, treedef = jax.tree_util.tree_flatten(params)
    if len(leaves) != len(packed):
        raise AtlasFormatError(f"Master {path} does not match its config (corrupt).")
    params = jax.tree_util.tree_unflatten(treedef, [jnp.asarray(unpack_leaf(p)) for p in packed])
    master = eqx.combine(params, static)
    if master_hash(master).hex() != meta.get("master_hash"):
        raise AtlasFormatError(f"Master {path} does not match the hash in its JSON (corrupt).")
    return master


def master_bytes(path: str | os.PathLike) -> int:
    """Bytes on disk of a stored master (weights file plus its JSON)."""
    path = Path(path)
    return path.stat().st_size + path.with_name(path.name + ".json").stat().st_size


def save_key(path: str | os.PathLike, master: AtlasMaster, key) -> None:
    """Write a key file tied to `master`."""
    master = round_to_storage(master)
    key = np.asarray(key, np.float32)
    if key.shape != (master.key_size,):
        raise ValueError(f"Key of shape {key.shape}; this master takes ({master.key_size},).")
    body = _KEY_HEADER.pack(KEY_MAGIC, VERSION, master_hash(master), master.key_size)
    body += key.astype(np.float16).tobytes()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_bytes(body + struct.pack("<I", zlib.crc32(body)))


def load_key(path: str | os.PathLike, master: AtlasMaster) -> jnp.ndarray:
    """Read a key file, checking that it belongs to `master`."""
    blob = Path(path).read_bytes()
    if len(blob) < _KEY_HEADER.size + 4 or blob[:8] != KEY_MAGIC:
        raise AtlasFormatError(f"{path} is not an Atlas key file.")
    _, version, mhash, size = _KEY_HEADER.unpack_from(blob)
    if version != VERSION:
        raise AtlasFormatError(f"Key file version {version}; this code reads {VERSION}.")
    if len(blob) != _KEY_HEADER.size + 2 * size + 4 or zlib.crc32(blob[:-4]) != int(
        struct.unpack_from("<I", blob, len(blob) - 4)[0]
    ):
        raise AtlasFormatError(f"Key file {path} is corrupt (checksum or length mismatch).")
    if mhash != master_hash(round_to_storage(master)):
        raise AtlasFormatError(f"Key file {path} was fitted for another master.")
    return jnp.asarray(np.frombuffer(blob, np.float16, size, _KEY_HEADER.size).astype(np.float32))
