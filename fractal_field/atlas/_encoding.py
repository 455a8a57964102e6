"""Coordinate encodings of x in [0, 1]: Fourier octaves and a 1-D multiresolution hash grid."""

from __future__ import annotations

import math

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray, Scalar

# Instant-NGP's first spatial prime is 1 (no mixing along x); in 1-D we use its second prime so
# that the vertices of a level that overflows its table scatter over the table.
HASH_PRIME = 2654435761


class FourierFeatures(eqx.Module):
    """`[sin(2^k pi x), cos(2^k pi x)]` for octaves `k = 0 .. octaves - 1`."""

    octaves: int = eqx.field(static=True)

    def __check_init__(self):
        if self.octaves < 1:
            raise ValueError(f"FourierFeatures(octaves={self.octaves}): octaves must be >= 1.")

    @property
    def size(self) -> int:
        return 2 * self.octaves

    def __call__(self, x: Scalar) -> Float[Array, " 2*octaves"]:
        freqs = jnp.pi * 2.0 ** jnp.arange(self.octaves, dtype=jnp.result_type(x, jnp.float32))
        return jnp.concatenate([jnp.sin(freqs * x), jnp.cos(freqs * x)])


def grid_resolutions(levels: int, base: int, growth: float) -> tuple[int, ...]:
    """Cells per level: `floor(base * growth**l)`."""
    return tuple(int(math.floor(base * growth**level)) for level in range(levels))


def hash_index(vertex, resolution: int, table_size: int):
    """Table slot of integer `vertex` on a level with `resolution` cells.

    A level whose `resolution + 1` vertices fit the table is stored densely (slot = vertex, no
    collisions); a finer level hashes `vertex * HASH_PRIME mod 2^32 mod table_size`.
    """
    if resolution + 1 <= table_size:
        return vertex
    v = jnp.asarray(vertex).astype(jnp.uint32) * jnp.uint32(HASH_PRIME)
    return (v % jnp.uint32(table_size)).astype(jnp.int32)


class HashGrid1D(eqx.Module):
    """Instant-NGP style multiresolution hash encoding of a 1-D coordinate.

    Level `l` splits [0, 1] into `resolutions[l]` cells; the feature at `x` linearly
    interpolates the learned vectors of the two vertices around `x * resolutions[l]`.
    The levels' features are concatenated (`levels * features` numbers).
    """

    tables: Float[Array, "levels table_size features"]
    resolutions: tuple[int, ...] = eqx.field(static=True)
    base_resolution: int = eqx.field(static=True)
    growth: float = eqx.field(static=True)

    def __init__(
        self,
        levels: int = 8,
        table_size: int = 1024,
        features: int = 2,
        base_resolution: int = 16,
        growth: float = 2.0,
        *,
        key: PRNGKeyArray,
    ):
        if levels < 1 or table_size < 2 or features < 1 or base_resolution < 1 or growth < 1:
            raise ValueError(
                f"HashGrid1D(levels={levels}, table_size={table_size}, features={features}, "
                f"base_resolution={base_resolution}, growth={growth}): need levels >= 1, "
                "table_size >= 2, features >= 1, base_resolution >= 1 and growth >= 1."
            )
        self.resolutions = grid_resolutions(levels, base_resolution, growth)
        self.base_resolution = base_resolution
        self.growth = float(growth)
        # Instant-NGP initialises the tables at U(-1e-4, 1e-4).
        self.tables = jr.uniform(key, (levels, table_size, features), minval=-1e-4, maxval=1e-4)

    @property
    def size(self) -> int:
        return self.tables.shape[0] * self.tables.shape[2]

    def slots(self, level: int, vertex):
        return hash_index(vertex, self.resolutions[level], self.tables.shape[1])

    def __call__(self, x: Scalar) -> Float[Array, " levels*features"]:
        out = []
        for level, res in enumerate(self.resolutions):
            s = jnp.clip(x, 0.0, 1.0) * res
            v0 = jnp.minimum(jnp.floor(s), res - 1).astype(jnp.int32)
            w = (s - v0).astype(self.tables.dtype)
            table = self.tables[level]
            f0 = table[self.slots(level, v0)]
            f1 = table[self.slots(level, v0 + 1)]
            out.append((1 - w) * f0 + w * f1)
        return jnp.concatenate(out)


def collision_count(resolution: int, table_size: int) -> int:
    """How many of a level's `resolution + 1` vertices share a slot with an earlier vertex."""
    v = np.arange(resolution + 1)
    slots = np.asarray(hash_index(v, resolution, table_size))
    return int(len(v) - len(np.unique(slots)))
