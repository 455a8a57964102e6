"""Optax helpers for complex parameters.

For a real loss `L` and complex parameter `p = x + iy`, `jax.grad` returns
`dL/dx - i dL/dy`, the *conjugate* of the steepest-ascent direction `dL/dx + i dL/dy`.
Optax uses the gradient as given, so complex parameters would move in the wrong direction.
"""

import jax
import jax.numpy as jnp
import optax


def conjugate_complex_grads() -> optax.GradientTransformation:
    """Conjugates complex leaves of the updates, leaving real leaves (and `None`) untouched."""

    def init_fn(params):
        del params
        return optax.EmptyState()

    def update_fn(updates, state, params=None):
        del params
        updates = jax.tree.map(lambda g: jnp.conj(g) if jnp.iscomplexobj(g) else g, updates)
        return updates, state

    return optax.GradientTransformation(init_fn, update_fn)


def complex_safe(optimizer: optax.GradientTransformation) -> optax.GradientTransformation:
    """`optax.chain(conjugate_complex_grads(), optimizer)`: use `jax.grad` output directly."""
    return optax.chain(conjugate_complex_grads(), optimizer)
