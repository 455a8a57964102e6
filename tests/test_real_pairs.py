"""The real-pair replay computes what the complex computation computes, with no complex
values left in the trace."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import fractal_field as ff
from fractal_field._real_pairs import Pair, real_pairs


def _complex(x):
    return x.re + 1j * x.im if isinstance(x, Pair) else x


def _fft_mix(x, w):
    z = jax.lax.complex(x, jnp.flip(x, -1)) * jnp.exp(1j * w[:, None, None])
    zf = jnp.fft.fft2(z) / (1 + jnp.abs(z) + 0.5j)
    return jnp.real(jnp.fft.ifft2(jnp.conj(zf) * zf)), jnp.imag(jnp.einsum("chw,c->hw", zf, w))


def _solve(x, w):
    z = jax.lax.complex(x[..., :4, :4], x[..., 1:5, :4]) + 4 * jnp.eye(4)
    b = z[..., 0] * w[0]
    batched = jnp.linalg.solve(z, b[..., None])[..., 0]
    return batched, jnp.linalg.solve(jnp.real(z[0]), jnp.real(b[0]))


def _vmapped_loops(x, w):
    # A batched `while` (each element stops on its own), a scatter under vmap, a cond.
    def one(xi):
        z = jax.lax.complex(xi[0], xi[1])

        def body(c):
            k, z, buf = c
            buf = buf.at[k % 3].set(z)
            return k + 1, 0.5 * z * jnp.exp(0.3j) + w[0], buf

        def cond(c):
            return (c[0] < 20) & (jnp.sum(jnp.abs(c[1])) > 4 + jnp.sum(xi))

        k, z, buf = jax.lax.while_loop(cond, body, (0, z, jnp.zeros((3,) + z.shape, z.dtype)))
        z = jax.lax.cond(k > 3, lambda v: v * 1j, lambda v: -v, z)
        return k, z, buf

    return jax.vmap(one)(x)


def _vmapped_loops_state(x, w):
    # The buffer is loop state nobody reads afterwards: finished elements need not freeze it.
    k, z, _ = _vmapped_loops(x, w)
    return k, z


@pytest.mark.parametrize(
    "fn, shape",
    [
        (_fft_mix, (3, 6, 5)),
        (_solve, (2, 6, 6)),
        (_vmapped_loops, (5, 2, 4, 4)),
        (_vmapped_loops_state, (5, 2, 4, 4)),
    ],
)
def test_real_pairs_match_complex(fn, shape):
    x = np.asarray(jr.normal(jr.PRNGKey(0), shape), np.float32)
    w = np.asarray(jr.normal(jr.PRNGKey(1), (shape[0],)), np.float32)
    replay = real_pairs(fn, x, w)
    assert "c64" not in str(jax.make_jaxpr(replay)(x, w))  # every complex value split
    out = jax.jit(replay)(x, w)
    got = jax.tree_util.tree_map(_complex, out, is_leaf=lambda a: isinstance(a, Pair))
    want = fn(x, w)
    for g, v in zip(jax.tree_util.tree_leaves(got), jax.tree_util.tree_leaves(want), strict=True):
        np.testing.assert_allclose(np.asarray(g), np.asarray(v), rtol=2e-5, atol=2e-5)


def test_real_pairs_model_and_errors():
    # The planar batch solve (real planes, a custom VJP, an optimisation barrier) and a phase.
    model = ff.make_model(
        "tiny", key=jr.PRNGKey(0), batch_solve="planar", phase="learned", solver=ff.Naive()
    )
    model = eqx.tree_at(lambda m: m.cell, model, model.cell.normalized())  # no SVD
    x = np.asarray(jr.normal(jr.PRNGKey(1), (3, 1, 8, 8)), np.float32)

    def logits(x):
        return model.batched(x)[0]

    got = jax.jit(real_pairs(logits, x))(x)
    np.testing.assert_allclose(got, jax.jit(logits)(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(NotImplementedError, match="'log' on complex values"):
        real_pairs(lambda x: jnp.log(x + 1j), x)(x)
