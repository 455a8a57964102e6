import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fractal_field._activation import (
    LIPSCHITZ,
    Cardioid,
    ModReLU,
    cardioid,
    crelu,
    modrelu,
    phase_tanh,
    zrelu,
)


@pytest.fixture(autouse=True)
def _x64():
    with jax.enable_x64(True):
        yield


def _z(n=2000, seed=0, scale=2.0):
    rng = np.random.default_rng(seed)
    return scale * (rng.standard_normal(n) + 1j * rng.standard_normal(n))


def test_formulas():
    z = _z()
    r, th = np.abs(z), np.angle(z)
    b = -0.5
    np.testing.assert_allclose(
        np.asarray(modrelu(jnp.asarray(z), b, eps=0.0)), np.maximum(r + b, 0) * z / r, atol=1e-12
    )
    np.testing.assert_allclose(np.asarray(phase_tanh(jnp.asarray(z), eps=0.0)), np.tanh(r) * z / r)
    np.testing.assert_allclose(
        np.asarray(cardioid(jnp.asarray(z), eps=0.0)), 0.5 * (1 + np.cos(th)) * z, atol=1e-12
    )
    np.testing.assert_allclose(
        np.asarray(crelu(jnp.asarray(z))), np.maximum(z.real, 0) + 1j * np.maximum(z.imag, 0)
    )
    keep = (th >= 0) & (th <= np.pi / 2)
    np.testing.assert_allclose(np.asarray(zrelu(jnp.asarray(z))), np.where(keep, z, 0))
    assert 0 < keep.mean() < 1
    # Cardioid is ReLU on the real line.
    x = np.linspace(-2, 2, 11)
    np.testing.assert_allclose(
        np.asarray(cardioid(jnp.asarray(x + 0j))).real, np.maximum(x, 0), atol=1e-12
    )


@pytest.mark.parametrize("dtype", [jnp.complex64, jnp.complex128])
def test_no_nan_at_zero(dtype):
    zero = jnp.zeros((), dtype)
    fns = {
        "modrelu": lambda z: modrelu(z, -0.1),
        "modrelu_pos": lambda z: modrelu(z, 0.1),
        "phase_tanh": phase_tanh,
        "cardioid": cardioid,
    }
    for name, f in fns.items():
        value = f(zero)
        assert jnp.isfinite(value) and value == 0, name
        # Real loss, complex input; gradients of both real and imaginary parts.
        for part in (jnp.real, jnp.imag):
            g = jax.grad(lambda z, f=f, part=part: part(f(z)), holomorphic=False)(zero)
            assert jnp.isfinite(g), name
        g = jax.grad(lambda z, f=f: jnp.abs(f(z)) ** 2)(zero)
        assert jnp.isfinite(g), name
    m = ModReLU(3)
    grads = jax.grad(lambda m, z: jnp.sum(jnp.abs(m(z)) ** 2), argnums=(0, 1))(
        m, jnp.zeros((3, 4, 4), dtype)
    )
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in jax.tree.leaves(grads))


@pytest.mark.parametrize("name", ["modrelu", "crelu", "cardioid", "phase_tanh"])
def test_empirical_lipschitz(name):
    fn = {
        "modrelu": lambda z: modrelu(z, -0.7),
        "crelu": crelu,
        "cardioid": cardioid,
        "phase_tanh": phase_tanh,
    }[name]
    rng = np.random.default_rng(1)
    z1 = _z(20000, 2, scale=1.0)
    # Include close pairs (local slope) as well as far ones.
    z2 = np.concatenate([_z(10000, 3, scale=1.0), z1[10000:] + 1e-4 * _z(10000, 4)])
    z1, z2 = z1[rng.permutation(20000)], z2[rng.permutation(20000)]
    z1 = z1[: len(z2)]
    f1, f2 = np.asarray(fn(jnp.asarray(z1))), np.asarray(fn(jnp.asarray(z2)))
    ratio = np.abs(f1 - f2) / np.abs(z1 - z2)
    assert ratio.max() <= LIPSCHITZ[name] * (1 + 1e-6)
    if name == "cardioid":
        assert ratio.max() > 1.0  # not 1-Lipschitz: the documented constant is needed


def test_cardioid_constant_attained():
    # Directional derivative at the documented maximiser reaches the constant.
    th = -0.5185826993
    z = np.exp(1j * th)
    jac = jax.jacfwd(lambda v: jnp.stack(_real2(cardioid(jax.lax.complex(v[0], v[1])))))(
        jnp.array([z.real, z.imag])
    )
    np.testing.assert_allclose(np.linalg.norm(np.asarray(jac), 2), LIPSCHITZ["cardioid"], rtol=1e-8)


def _real2(z):
    return jnp.real(z), jnp.imag(z)


def test_zrelu_discontinuous():
    assert LIPSCHITZ["zrelu"] == float("inf")
    t = 1e-9
    a, b = zrelu(jnp.asarray(t + 1j)), zrelu(jnp.asarray(-t + 1j))
    assert abs(complex(a) - complex(b)) > 0.5


def test_modules():
    m = ModReLU(2, init=-0.3)
    z = jnp.asarray(_z(2 * 3 * 3).reshape(2, 3, 3))
    np.testing.assert_allclose(np.asarray(m(z)), np.asarray(modrelu(z, -0.3)), rtol=1e-6)
    with pytest.raises(ValueError, match="channel"):
        m(jnp.zeros((3, 2, 2), jnp.complex64))
    # Positive bias is clipped to 0 by default (keeps the activation 1-Lipschitz).
    m_pos = ModReLU(2, init=0.5)
    np.testing.assert_allclose(np.asarray(m_pos(z)), np.asarray(modrelu(z, 0.0)), rtol=1e-6)
    assert Cardioid().lipschitz == LIPSCHITZ["cardioid"]
    np.testing.assert_allclose(np.asarray(Cardioid()(z)), np.asarray(cardioid(z)))


@pytest.mark.parametrize(
    "name, reference",
    [
        ("modrelu", lambda x: np.sign(x) * np.maximum(np.abs(x) - 0.5, 0)),
        ("modrelu_module", lambda x: np.sign(x) * np.maximum(np.abs(x) - 0.5, 0)),
        ("phase_tanh", np.tanh),
        ("cardioid", lambda x: np.maximum(x, 0)),
        ("crelu", lambda x: np.maximum(x, 0)),
        ("zrelu", lambda x: np.maximum(x, 0)),
    ],
)
def test_real_inputs_give_the_real_counterparts(name, reference):
    """On a real float32 field each activation is its real counterpart (modReLU:
    `sign(x) relu(|x| + b)`), real and float32; its gradient is finite at 0."""
    fns = {
        "modrelu": lambda x: modrelu(x, -0.5),
        "modrelu_module": ModReLU(1, init=-0.5),
        "phase_tanh": phase_tanh,
        "cardioid": cardioid,
        "crelu": crelu,
        "zrelu": zrelu,
    }
    x = np.concatenate([np.linspace(-3, 3, 61), [0.0]])[None].astype(np.float32)
    out = fns[name](jnp.asarray(x))
    assert out.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(out), reference(x.astype(np.float64)), atol=1e-6)
    grad = jax.grad(lambda x: jnp.sum(fns[name](x)))(jnp.asarray(x))
    assert bool(jnp.all(jnp.isfinite(grad)))
