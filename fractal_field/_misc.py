"""Small pytree helpers shared by the solvers and adjoints."""

from __future__ import annotations

import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import PyTree, Scalar


def tree_sub(a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda x, y: x - y, a, b)


def tree_add(a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda x, y: x + y, a, b)


def tree_lerp(a: PyTree, b: PyTree, w) -> PyTree:
    """`(1 - w) a + w b`, leafwise, keeping each leaf's dtype."""
    return jtu.tree_map(lambda x, y: (x + w * (y - x)).astype(x.dtype), a, b)


def tree_sq_norm(a: PyTree) -> Scalar:
    """Squared 2-norm over all leaves (complex leaves count `|x|^2`)."""
    leaves = jtu.tree_leaves(a)
    if not leaves:
        return jnp.zeros(())
    return sum(jnp.sum(jnp.real(x * jnp.conj(x)).astype(real_dtype(x.dtype))) for x in leaves)


def tree_norm(a: PyTree) -> Scalar:
    return jnp.sqrt(tree_sq_norm(a))


def tree_where(pred, a: PyTree, b: PyTree) -> PyTree:
    return jtu.tree_map(lambda x, y: jnp.where(pred, x, y), a, b)


def real_dtype(dtype) -> jnp.dtype:
    """The real dtype matching `dtype` (`complex64 -> float32`)."""
    return jnp.finfo(dtype).dtype if jnp.issubdtype(dtype, jnp.inexact) else jnp.dtype(dtype)


def state_real_dtype(tree: PyTree) -> jnp.dtype:
    """The widest real dtype among the inexact leaves of `tree` (norms are kept in it)."""
    dtypes = [real_dtype(x.dtype) for x in jtu.tree_leaves(tree)]
    return jnp.result_type(*dtypes) if dtypes else jnp.dtype(jnp.float32)


def describe(x) -> str:
    return f"{jnp.dtype(x.dtype).name}{list(x.shape)}"


def check_same_structure(z0: PyTree, out: PyTree, what: str = "fn(z, args)") -> None:
    """Raise a clear error if `out` (abstract) differs from `z0` in structure, shape or dtype."""
    s0, s1 = jtu.tree_structure(z0), jtu.tree_structure(out)
    if s0 != s1:
        raise ValueError(
            f"{what} must return a pytree with the same structure as z0.\n"
            f"  z0 structure:     {s0}\n  output structure: {s1}"
        )
    for path, a, b in zip(
        jtu.tree_flatten_with_path(z0)[0], jtu.tree_leaves(z0), jtu.tree_leaves(out), strict=True
    ):
        name = jtu.keystr(path[0]) or "<root>"
        if a.shape != b.shape or jnp.dtype(a.dtype) != jnp.dtype(b.dtype):
            raise ValueError(
                f"{what} changed leaf z{name}: z0 has {describe(a)} but the output has "
                f"{describe(b)}. A fixed-point map must return the same shapes and dtypes "
                "as its input (cast inside fn if needed)."
            )


def check_inexact(z0: PyTree, name: str = "z0") -> None:
    leaves = jtu.tree_flatten_with_path(z0)[0]
    if not leaves:
        raise ValueError(f"{name} has no array leaves: nothing to solve for.")
    for path, x in leaves:
        if not hasattr(x, "dtype") or not jnp.issubdtype(x.dtype, jnp.inexact):
            raise TypeError(
                f"{name}{jtu.keystr(path)} must be a floating-point or complex array, got "
                f"{type(x).__name__} {getattr(x, 'dtype', '')}."
            )
