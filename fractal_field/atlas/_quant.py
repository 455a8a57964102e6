"""Storage precision of masters and keys.

Arrays with two or more axes (weight matrices, embedding and hash tables) are stored as int8
with one power-of-two scale per row (first axis); vectors (biases, keys) as float16. Both
roundings are idempotent, so a stored master reloads to exactly the numbers it was made from
and encoder and decoder see identical weights.
"""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


def pack_leaf(x) -> tuple[np.ndarray, np.ndarray] | np.ndarray:
    """`(int8 values, int8 row exponents)` for a matrix-like array, float16 for a vector."""
    x = np.asarray(x, np.float32)
    if x.ndim < 2:
        return x.astype(np.float16)
    rows = x.reshape(x.shape[0], -1)
    amax = np.abs(rows).max(axis=1)
    # Scale 2**e with amax / 2**e in (63.5, 127]: int8 values, exact products, idempotent.
    e = np.where(amax > 0, np.ceil(np.log2(np.maximum(amax, 1e-30) / 127.0)), 0)
    e = np.clip(e, -127, 127).astype(np.int8)
    q = np.clip(np.round(rows / np.exp2(e.astype(np.float32))[:, None]), -127, 127)
    return q.astype(np.int8).reshape(x.shape), e


def unpack_leaf(packed) -> np.ndarray:
    if isinstance(packed, tuple):
        q, e = (np.asarray(a) for a in packed)
        scale = np.exp2(e.astype(np.float32)).reshape((-1,) + (1,) * (q.ndim - 1))
        return q.astype(np.float32) * scale
    return np.asarray(packed).astype(np.float32)


def round_to_storage(tree):
    """Every float leaf rounded to its stored precision (int8 rows or float16), as float32."""
    return jax.tree_util.tree_map(
        lambda x: jnp.asarray(unpack_leaf(pack_leaf(x))) if eqx.is_inexact_array(x) else x, tree
    )


def packed_bytes(tree) -> int:
    """Bytes of the stored numbers of `tree` (values plus row exponents)."""
    total = 0
    for x in jax.tree_util.tree_leaves(eqx.filter(tree, eqx.is_inexact_array)):
        p = pack_leaf(x)
        total += sum(a.nbytes for a in p) if isinstance(p, tuple) else p.nbytes
    return total
