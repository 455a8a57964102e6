"""Vectorised CIFAR-style data augmentation in JAX (runs on device, jit-able)."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jaxtyping import Array, PRNGKeyArray, Shaped


@functools.partial(jax.jit, static_argnames=("padding", "flip", "channels_first"))
def augment(
    key: PRNGKeyArray,
    x: Shaped[Array, "batch ..."],
    *,
    padding: int = 4,
    flip: bool = True,
    channels_first: bool = True,
) -> Shaped[Array, "batch ..."]:
    """Random crop with zero `padding` on each side, then random horizontal flip, per image.

    **Arguments:**

    - `key`: a PRNG key; each image draws its own crop offset and flip.
    - `x`: a batch `(N, C, H, W)` (`channels_first=True`, the model layout after
      [`normalize`][], where zero padding is the dataset mean colour) or `(N, H, W, C)`
      (`channels_first=False`, e.g. raw uint8 images, where padding is black).
    - `padding`: pixels of zero padding; crops are `H x W` windows of the padded image.
    - `flip`: whether to flip each image left-right with probability 1/2.

    **Returns:** an array of the same shape and dtype as `x`.
    """
    if not channels_first:
        x = jnp.moveaxis(x, -1, 1)
    n, c, h, w = x.shape
    crop_key, flip_key = jax.random.split(key)
    if padding > 0:
        padded = jnp.pad(x, ((0, 0), (0, 0), (padding, padding), (padding, padding)))
        offsets = jax.random.randint(crop_key, (n, 2), 0, 2 * padding + 1)

        def crop(image, offset):
            return jax.lax.dynamic_slice(image, (0, offset[0], offset[1]), (c, h, w))

        x = jax.vmap(crop)(padded, offsets)
    if flip:
        flips = jax.random.bernoulli(flip_key, 0.5, (n,))
        x = jnp.where(flips[:, None, None, None], x[..., ::-1], x)
    return x if channels_first else jnp.moveaxis(x, 1, -1)
