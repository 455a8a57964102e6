"""Complex activations.

Lipschitz constants are for the activation viewed as a map `R^2 -> R^2` (equivalently
`C -> C` with the modulus as norm), applied elementwise; they are what a fixed-point
contraction bound multiplies by. See `LIPSCHITZ`.

On a real field each is its real counterpart, of the input's dtype: `modrelu` is
`sign(x) relu(|x| + b)`, `phase_tanh` is `tanh`, and `cardioid`, `crelu` and `zrelu` are ReLU.
"""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float

_EPS = 1e-12

LIPSCHITZ: dict[str, float] = {
    # Soft-thresholding of the modulus (a proximal map) for `b <= 0`; for `b > 0` it is
    # discontinuous at 0 (unbounded Lipschitz constant), which `ModReLU` prevents by default.
    "modrelu": 1.0,
    "crelu": 1.0,
    # sup over the unit circle of the largest singular value of the 2x2 real Jacobian (the map
    # is positively homogeneous, so that is the global constant); attained near arg z = -0.5186.
    "cardioid": 1.0663552057,
    # Discontinuous across arg z = pi/2 and arg z = 0 (e.g. z = -t + i vs z = t + i, t -> 0).
    "zrelu": float("inf"),
    "phase_tanh": 1.0,
}


def _safe_abs(z: Array, eps: float) -> Array:
    # sqrt(|z|^2 + eps) is smooth and never zero, so neither it nor z / it has a NaN value or
    # gradient at z = 0.
    return jnp.sqrt(jnp.real(z) ** 2 + jnp.imag(z) ** 2 + eps)


def modrelu(z: Complex[Array, "..."], b: Float[Array, "..."], eps: float = _EPS) -> Array:
    """`modReLU(z) = relu(|z| + b) z / |z|` (Arjovsky et al. 2016), with `|z|` smoothed to
    `sqrt(|z|^2 + eps)` so that value and gradient are finite at `z = 0`.

    1-Lipschitz for `b <= 0` (also with the smoothing); discontinuous at 0 for `b > 0`.
    """
    r = _safe_abs(z, eps)
    return (jax.nn.relu(r + b) / r) * z


def phase_tanh(z: Complex[Array, "..."], eps: float = _EPS) -> Array:
    """`tanh(|z|) z / |z|`: squashes the modulus, keeps the phase. 1-Lipschitz."""
    r = _safe_abs(z, eps)
    return (jnp.tanh(r) / r) * z


def cardioid(z: Complex[Array, "..."], eps: float = _EPS) -> Array:
    """`0.5 (1 + cos(arg z)) z` (Virtue et al. 2017); equals ReLU on the real line.
    Lipschitz constant 1.06636 (see `LIPSCHITZ`)."""
    cos_arg = jnp.real(z) / _safe_abs(z, eps)
    return 0.5 * (1 + cos_arg) * z


def crelu(z: Complex[Array, "..."]) -> Array:
    """`relu(Re z) + i relu(Im z)`. 1-Lipschitz."""
    if not jnp.iscomplexobj(z):
        return jax.nn.relu(z)
    return jax.lax.complex(jax.nn.relu(jnp.real(z)), jax.nn.relu(jnp.imag(z)))


def zrelu(z: Complex[Array, "..."]) -> Array:
    """`z` if `arg z` is in `[0, pi/2]` (both parts non-negative), else 0 (Guberman 2016).
    Not continuous, so it has no finite Lipschitz constant."""
    keep = (jnp.real(z) >= 0) & (jnp.imag(z) >= 0)
    return jnp.where(keep, z, jnp.zeros_like(z))


class ModReLU(eqx.Module):
    """modReLU with a learnable per-channel bias, on `(channels, ...)` fields.

    With `nonpositive=True` (default) the bias used is `min(bias, 0)`, which keeps the
    activation 1-Lipschitz (and continuous) as a DEQ contraction argument requires.
    """

    bias: Float[Array, " channels"]
    nonpositive: bool = eqx.field(static=True)
    eps: float = eqx.field(static=True)

    def __init__(
        self, channels: int, *, init: float = 0.0, nonpositive: bool = True, eps: float = _EPS
    ):
        self.bias = jnp.full((channels,), init, jnp.float32)
        self.nonpositive = nonpositive
        self.eps = eps

    def __call__(self, z: Complex[Array, "channels ..."]) -> Complex[Array, "channels ..."]:
        if z.ndim < 1 or z.shape[0] != self.bias.shape[0]:
            raise ValueError(
                f"ModReLU expects a leading channel axis of size {self.bias.shape[0]}, "
                f"got shape {z.shape}."
            )
        b = jnp.minimum(self.bias, 0.0) if self.nonpositive else self.bias
        b = b.reshape(b.shape + (1,) * (z.ndim - 1)).astype(jnp.real(z).dtype)
        return modrelu(z, b, self.eps)

    def planar(self, p: Float[Array, "2 ... channels b"]) -> Float[Array, "2 ... channels b"]:
        """The same on batched planar fields (`ff.to_planar`: planes first, channels second
        to last)."""
        if p.ndim < 3 or p.shape[0] != 2 or p.shape[-2] != self.bias.shape[0]:
            raise ValueError(
                f"ModReLU.planar expects planar fields (2, ..., {self.bias.shape[0]}, b), "
                f"got shape {p.shape}."
            )
        b = jnp.minimum(self.bias, 0.0) if self.nonpositive else self.bias
        return _planar_modrelu(b[:, None].astype(p.dtype), p, self.eps)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _planar_modrelu(b: Array, p: Array, eps: float) -> Array:
    return _planar_modrelu_fwd(b, p, eps)[0]


def _planar_modrelu_fwd(b, p, eps):
    re, im = p[0], p[1]
    r = jnp.sqrt(re**2 + im**2 + eps)
    t = r + b
    s = jax.nn.relu(t) / r
    g = jnp.where(t > 0, 1 / r, 0)  # d s / d b
    c = (g - s / r) / r  # (d s / d r) / r
    # Plane by plane (`s * p` would make the gradient a reduction over the planes axis,
    # which XLA:CPU runs ~10x slower).
    return jnp.stack([s * re, s * im]), (s, c, g, re, im)


def _planar_modrelu_bwd(eps, res, ct):
    # The Jacobian is the symmetric `s I + c y y^T` (y = (re, im) at each site): the VJP
    # reads four planes instead of everything autodiff would keep.
    del eps
    s, c, g, re, im = res
    d = re * ct[0] + im * ct[1]
    ct_p = jnp.stack([s * ct[0] + c * re * d, s * ct[1] + c * im * d])
    axes = tuple(i for i in range(d.ndim) if i != d.ndim - 2)
    ct_b = jnp.sum(g * d, axis=axes)[:, None]
    return ct_b, ct_p


_planar_modrelu.defvjp(_planar_modrelu_fwd, _planar_modrelu_bwd)


class _Elementwise(eqx.Module):
    fn: str = eqx.field(static=True)

    def __call__(self, z: Complex[Array, "..."]) -> Complex[Array, "..."]:
        return _FUNCTIONS[self.fn](z)

    def planar(self, p: Float[Array, "2 ..."]) -> Float[Array, "2 ..."]:
        """The same on real/imaginary planes stacked on the first axis (`ff.to_planar`)."""
        if p.ndim < 1 or p.shape[0] != 2:
            raise ValueError(f"expected planes stacked on the first axis, got shape {p.shape}.")
        out = _FUNCTIONS[self.fn](jax.lax.complex(p[0], p[1]))
        return jnp.stack([jnp.real(out), jnp.imag(out)]).astype(p.dtype)

    @property
    def lipschitz(self) -> float:
        return LIPSCHITZ[self.fn]


def Cardioid() -> _Elementwise:
    """Module form of `cardioid`."""
    return _Elementwise("cardioid")


def CReLU() -> _Elementwise:
    """Module form of `crelu`."""
    return _Elementwise("crelu")


def ZReLU() -> _Elementwise:
    """Module form of `zrelu`."""
    return _Elementwise("zrelu")


def PhaseTanh() -> _Elementwise:
    """Module form of `phase_tanh`."""
    return _Elementwise("phase_tanh")


_FUNCTIONS = {"cardioid": cardioid, "crelu": crelu, "zrelu": zrelu, "phase_tanh": phase_tanh}


def activation_fn(name: str):
    """The parameter-free activation called `name` (`modrelu` gets a zero bias)."""
    if name == "modrelu":
        return lambda z: modrelu(z, 0.0)
    try:
        return _FUNCTIONS[name]
    except KeyError:
        raise ValueError(
            f"unknown activation {name!r}; expected one of {sorted(LIPSCHITZ)}."
        ) from None
