"""The Atlas kernel: one shared update `h <- (1 - a) h + a tanh(W h + u)`, iterated."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, PRNGKeyArray

from .._adjoint import ImplicitAdjoint
from .._fixed_point import fixed_point
from .._solver import Anderson


class AtlasKernel(eqx.Module):
    """A contractive update of a real state `h` (size `width`) driven by an injection `u`.

    `W = V * min(1, rho / ||V||_F)`, so `h -> tanh(W h + u)` is a contraction with Lipschitz
    constant at most `rho < 1` (tanh is 1-Lipschitz, `||W||_2 <= ||W||_F`): iterating it
    converges to a unique fixed point for every `u`.
    """

    weight: Float[Array, "width width"]
    bias: Float[Array, " width"]
    rho: float = eqx.field(static=True)
    relax: float = eqx.field(static=True)

    def __init__(self, width: int, *, rho: float = 0.9, relax: float = 1.0, key: PRNGKeyArray):
        if width < 1:
            raise ValueError(f"AtlasKernel(width={width}): width must be >= 1.")
        if not 0 < rho < 1:
            raise ValueError(f"AtlasKernel(rho={rho}) must lie in (0, 1) for a contraction.")
        if not 0 < relax <= 1:
            raise ValueError(f"AtlasKernel(relax={relax}) must lie in (0, 1].")
        self.weight = jr.normal(key, (width, width)) * (0.5 * rho / width)
        self.bias = jnp.zeros((width,))
        self.rho = rho
        self.relax = relax

    @property
    def width(self) -> int:
        return self.bias.shape[0]

    def matrix(self) -> Float[Array, "width width"]:
        norm = jnp.sqrt(jnp.sum(self.weight**2))
        return self.weight * jnp.minimum(1.0, self.rho / jnp.maximum(norm, 1e-12))

    def __call__(
        self, h: Float[Array, " width"], u: Float[Array, " width"]
    ) -> Float[Array, " width"]:
        """One dense update of every unit."""
        new = jnp.tanh(self.matrix() @ h + u + self.bias)
        return h + self.relax * (new - h)

    def block_update(self, h, u, block, blocks: int, matrix=None):
        """Update only units `[block * width / blocks, (block + 1) * width / blocks)`.

        Costs `1 / blocks` of a dense update (only those rows of `W` are used); the other
        units stay static this step.
        """
        size = self.width // blocks
        start = block * size
        w = self.matrix() if matrix is None else matrix
        rows = jax.lax.dynamic_slice_in_dim(w, start, size, axis=0)
        hb = jax.lax.dynamic_slice_in_dim(h, start, size)
        ub = jax.lax.dynamic_slice_in_dim(u + self.bias, start, size)
        new = hb + self.relax * (jnp.tanh(rows @ h + ub) - hb)
        return jax.lax.dynamic_update_slice_in_dim(h, new, start, axis=0)


def iterate(
    kernel: AtlasKernel,
    u: Float[Array, " width"],
    steps: int,
    *,
    blocks: int = 1,
    record: bool = False,
):
    """`steps` updates from `h = 0` with shared weights.

    `blocks = 1`: every unit is updated at every step. `blocks = k > 1`: sparse updates, step
    `t` updates only block `t mod k` (a fraction `1 - 1/k` of the state is static per step).
    Returns the final state, or with `record=True` the states after each step `(steps, width)`.
    """
    if steps < 1:
        raise ValueError(f"iterate(steps={steps}): steps must be >= 1.")
    if blocks < 1 or kernel.width % blocks:
        raise ValueError(f"blocks={blocks} must be >= 1 and divide the width {kernel.width}.")
    w = kernel.matrix()
    # The state takes the promoted dtype of the weights and the drive (float64 under x64).
    h0 = jnp.zeros(u.shape, jnp.result_type(w, u, kernel.bias))

    def body(h, t):
        if blocks == 1:
            h = h + kernel.relax * (jnp.tanh(w @ h + u + kernel.bias) - h)
        else:
            h = kernel.block_update(h, u, t % blocks, blocks, matrix=w)
        return h, (h if record else None)

    h, hist = jax.lax.scan(body, h0, jnp.arange(steps))
    return hist if record else h


def solve(
    kernel: AtlasKernel,
    u: Float[Array, " width"],
    *,
    max_steps: int = 30,
    rtol: float = 1e-4,
    atol: float = 1e-6,
    solver=None,
    adjoint=None,
):
    """The kernel's fixed point `h* = kernel(h*, u)` with `ff.fixed_point` (implicit
    gradients by default). Returns an `ff.Solution`."""
    return fixed_point(
        lambda h, u: kernel(h, u),
        jnp.zeros_like(u),
        u,
        solver=Anderson(history=4) if solver is None else solver,
        adjoint=ImplicitAdjoint(max_steps=max_steps, rtol=rtol, throw=False)
        if adjoint is None
        else adjoint,
        max_steps=max_steps,
        rtol=rtol,
        atol=atol,
        throw=False,
    )
