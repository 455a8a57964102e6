"""Jacobian regularisation of a fixed-point map (Bai, Koltun & Kolter, 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import jax.random as jr
import jax.tree_util as jtu
from jaxtyping import Array, Float, PRNGKeyArray, PyTree

from ._misc import check_inexact


def _to_real(x: Array) -> Array:
    return jnp.stack([jnp.real(x), jnp.imag(x)]) if jnp.iscomplexobj(x) else x


def _from_real(r: Array, like: Array) -> Array:
    return jax.lax.complex(r[0], r[1]).astype(like.dtype) if jnp.iscomplexobj(like) else r


def jacobian_penalty(
    fn: Callable[[PyTree, Any], PyTree],
    z: PyTree[Array],
    args: Any = None,
    *,
    key: PRNGKeyArray,
    probes: int = 1,
) -> Float[Array, ""]:
    """Hutchinson estimate of `||d fn(z, args) / dz||_F^2 / n` at `z`, `n` the number of real
    entries of `z` (complex entries count twice: the Jacobian is that of the real map).

    Unbiased with Gaussian probes (`probes` of them, averaged): the mean squared singular
    value, at most `L^2` for an `L`-Lipschitz `fn`. Added to a training loss it keeps the fixed
    point's Jacobian small, so the forward and backward solves stay short (Bai et al. 2021,
    "Stabilizing Equilibrium Models by Jacobian Regularization"). Differentiable in whatever
    `fn` closes over and in `args`; pass `jax.lax.stop_gradient(z)` to leave `z` out, as they do.
    """
    if probes < 1:
        raise ValueError(f"jacobian_penalty(probes={probes}) must be >= 1.")
    check_inexact(z, "jacobian_penalty: z")
    leaves, treedef = jtu.tree_flatten(z)

    def real_fn(real_leaves):
        parts = zip(real_leaves, leaves, strict=True)
        zz = jtu.tree_unflatten(treedef, [_from_real(r, x) for r, x in parts])
        out_leaves = jtu.tree_leaves(fn(zz, args))
        return [_to_real(y) for y in out_leaves]

    out, vjp = jax.vjp(real_fn, [_to_real(x) for x in leaves])
    n = sum(x.size * (2 if jnp.iscomplexobj(x) else 1) for x in leaves)

    def one(k):
        ks = jr.split(k, len(out))
        eps = [jr.normal(ki, y.shape, y.dtype) for ki, y in zip(ks, out, strict=True)]
        (g,) = vjp(eps)
        return sum(jnp.sum(gi**2) for gi in g)

    return jnp.mean(jax.vmap(one)(jr.split(key, probes))) / n
