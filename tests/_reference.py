"""Independent NumPy references shared by the tests: wrap-around correlation tap by tap, exact
operator norms from dense SVDs, and the elementwise complex activations."""

import numpy as np


def np_correlate(weight, z):
    """`weight (cout, cin, k, k)` cross-correlated with `z (cin, h, w)` on the torus."""
    k = weight.shape[-1]
    c = k // 2
    out = np.zeros((weight.shape[0],) + z.shape[1:], complex)
    for a in range(k):
        for b in range(k):
            shifted = np.roll(z, (-(a - c), -(b - c)), axis=(1, 2))
            out += np.einsum("oi,ihw->ohw", weight[:, :, a, b], shifted)
    return out


def np_conv_norm(weight, h, w):
    """Exact operator norm: the largest singular value of the dense matrix of the map."""
    cin = weight.shape[1]
    n = cin * h * w
    cols = []
    for j in range(n):
        e = np.zeros(n, complex)
        e[j] = 1
        cols.append(np_correlate(weight, e.reshape(cin, h, w)).reshape(-1))
    return np.linalg.norm(np.stack(cols, 1), 2)


def np_modrelu(z, b):
    """modReLU with the per-channel bias clamped to `<= 0`, as `ff.ModReLU` does."""
    r = np.sqrt(np.abs(z) ** 2 + 1e-12)
    return np.maximum(r + np.minimum(b, 0)[:, None, None], 0) / r * z


def np_crelu(z):
    return np.maximum(z.real, 0) + 1j * np.maximum(z.imag, 0)


def solve_cell(cell, injection, grid, adjoint):
    """The cell's fixed point on a `grid x grid` torus, differentiated with `adjoint`: Anderson
    for `ff.ImplicitAdjoint`, a plain naive unroll otherwise (the reference), both to 1e-13."""
    import fractal_field as ff

    op = cell.operator(grid, grid)
    implicit = isinstance(adjoint, ff.ImplicitAdjoint)
    return ff.fixed_point(
        lambda z, u: cell.step_with(op, z, u),
        cell.init_state(injection),
        injection,
        solver=ff.Anderson() if implicit else ff.Naive(),
        adjoint=adjoint,
        max_steps=200,
        rtol=1e-13,
        atol=0.0,
    )


def to_float64(tree):
    """`tree` with every inexact array in double precision (complex128 / float64)."""
    import equinox as eqx
    import jax
    import jax.numpy as jnp

    def cast(x):
        if not eqx.is_inexact_array(x):
            return x
        return x.astype(jnp.complex128 if jnp.iscomplexobj(x) else jnp.float64)

    return jax.tree_util.tree_map(cast, tree)


def random_field(key, shape, dtype=None):
    """A standard complex normal field of `shape` (complex64 unless `dtype` says)."""
    import jax.numpy as jnp
    import jax.random as jr

    dtype = jnp.complex64 if dtype is None else dtype
    kr, ki = jr.split(key)
    real = jnp.finfo(dtype).dtype
    return (jr.normal(kr, shape, real) + 1j * jr.normal(ki, shape, real)).astype(dtype)
