"""A field cell with a Hermitian coupling: its fixed points minimise an explicit energy."""

from __future__ import annotations

import equinox as eqx
import jax.numpy as jnp
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._cell import make_activation
from ._contraction import check_norm_args, spectrum_norm
from ._conv import ToroidalConv
from ._energy import AbstractEnergyMap

# Activations that are the gradient of a convex potential psi (so their real 2x2 Jacobian is
# symmetric), with the convex conjugate psi* that enters the energy.
ENERGY_ACTIVATIONS = ("modrelu", "phase_tanh", "crelu")


def _abs(z):
    return jnp.sqrt(jnp.real(z) ** 2 + jnp.imag(z) ** 2)


def conjugate_potential(name: str, act, z: Complex[Array, "c h w"]) -> Float[Array, ""]:
    """`sum psi*(z)` over the sites, for the activation `act = grad psi` called `name`."""
    r = _abs(z)
    if name == "modrelu":
        # psi(u) = relu(|u| + b)^2 / 2 with b <= 0, psi*(z) = |z|^2 / 2 - b |z|.
        b = jnp.minimum(act.bias, 0.0) if act.nonpositive else act.bias
        b = b.reshape(b.shape + (1,) * (z.ndim - 1)).astype(r.dtype)
        return jnp.sum(0.5 * r**2 - b * r)
    if name == "phase_tanh":
        # psi(u) = log cosh |u|, psi*(z) = |z| artanh |z| + log(1 - |z|^2) / 2 for |z| < 1.
        inside = r < 1
        r = jnp.where(inside, r, 0.0)
        return jnp.sum(jnp.where(inside, r * jnp.arctanh(r) + 0.5 * jnp.log1p(-(r**2)), jnp.inf))
    if name == "crelu":
        # psi(u) = (relu(Re u)^2 + relu(Im u)^2) / 2: psi* is |z|^2 / 2 on the first quadrant.
        inside = (jnp.real(z) >= 0) & (jnp.imag(z) >= 0)
        return jnp.sum(jnp.where(inside, 0.5 * r**2, jnp.inf))
    raise ValueError(f"no energy for activation {name!r}")


def check_energy_activation(activation: str) -> None:
    if activation not in ENERGY_ACTIVATIONS:
        why = {
            "cardioid": "its real Jacobian is not symmetric, so it is not the gradient of a "
            "potential",
            "zrelu": "it is discontinuous, not the gradient of a potential",
        }.get(activation, "it is not a known activation")
        raise ValueError(
            f"SymmetricCell(activation={activation!r}): {why}. An energy needs the gradient "
            f"of a convex potential: one of {list(ENERGY_ACTIVATIONS)}."
        )


def hermitian_part(weight: Complex[Array, "d c c k k"]) -> Complex[Array, "d c c k k"]:
    """`(W + W^H) / 2`, where `W^H[j, o, i, a, b] = conj(W[j, i, o, k-1-a, k-1-b])` is the
    kernel of the adjoint correlation: the result is a self-adjoint (Hermitian) operator."""
    adjoint = jnp.conj(jnp.flip(jnp.swapaxes(weight, 1, 2), axis=(-2, -1)))
    return 0.5 * (weight + adjoint)


class BoundSymmetricCell(AbstractEnergyMap):
    """A `SymmetricCell` with its operator built for one grid size (`SymmetricCell.bind`)."""

    op: eqx.Module
    act: eqx.Module
    act_name: str = eqx.field(static=True)
    alpha: float = eqx.field(static=True)

    def __call__(self, z, injection, nudge=None):
        u = self.op(z) + injection
        if nudge is not None:
            u = u - nudge
        out = (1 - self.alpha) * z + self.alpha * self.act(u)
        return out.astype(z.dtype)

    def energy(self, z, injection):
        coupling = jnp.real(jnp.vdot(z, self.op(z)))
        drive = jnp.real(jnp.vdot(injection, z))
        return conjugate_potential(self.act_name, self.act, z) - 0.5 * coupling - drive


class SymmetricCell(AbstractEnergyMap):
    """`z <- (1 - alpha) z + alpha * act(K z + injection)` with a Hermitian `K`, on a
    `(channels, h, w)` torus: an energy-based `FractalCell`.

    `K` is a toroidal convolution whose kernel is kept point-symmetric across channels,
    `K[-a] = K[a]^H` (`hermitian_part` of a free weight), rescaled to operator norm at most
    `gamma < 1` on `norm_grid`; `act` is the gradient of a convex potential `psi`
    (`"modrelu"`, `"phase_tanh"` or `"crelu"`, see `ENERGY_ACTIVATIONS`). The fixed point is
    then the unique minimiser of the strongly convex energy

    `E(z) = sum psi*(z) - Re<z, K z> / 2 - Re<injection, z>`

    (`psi*` the convex conjugate), and a nudge `n` moves it to the minimiser of
    `E + Re<n, z>` by replacing the injection with `injection - n`. What
    `ff.EquilibriumPropagation` needs. The relaxation `alpha` does not move the fixed point.
    """

    conv: ToroidalConv
    act: eqx.Module
    act_name: str = eqx.field(static=True)
    alpha_value: float = eqx.field(static=True)
    gamma: float = eqx.field(static=True)
    norm_grid: tuple[int, int] = eqx.field(static=True)

    def __init__(
        self,
        channels: int,
        *,
        kernel_size: int = 3,
        dilations: tuple[int, ...] = (1,),
        gamma: float = 0.9,
        norm_grid: tuple[int, int] = (28, 28),
        activation: str = "modrelu",
        alpha: float = 0.5,
        impl: str = "auto",
        dtype=jnp.complex64,
        key: PRNGKeyArray,
    ):
        check_energy_activation(activation)
        check_norm_args(gamma, norm_grid, "svd")
        if not 0 < gamma < 1:
            raise ValueError(f"SymmetricCell(gamma={gamma}) must lie in (0, 1).")
        if not 0 < alpha <= 1:
            raise ValueError(f"SymmetricCell(alpha={alpha}) must lie in (0, 1].")
        self.conv = ToroidalConv(
            channels, channels, kernel_size, dilations, impl=impl, dtype=dtype, key=key
        )
        self.act = make_activation(activation, channels)
        self.act_name = activation
        self.alpha_value = float(alpha)
        self.gamma = float(gamma)
        self.norm_grid = (int(norm_grid[0]), int(norm_grid[1]))

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    def alpha(self) -> float:
        return self.alpha_value

    def coupling(self) -> ToroidalConv:
        """`K`: the Hermitian part of the weight, rescaled by `min(1, gamma / ||K||_op)`."""
        weight = hermitian_part(self.conv.weight)
        sym = eqx.tree_at(lambda c: c.weight, self.conv, weight)
        norm = spectrum_norm(sym.spectrum(*self.norm_grid), "svd", 0)
        big = norm > self.gamma
        scale = jnp.where(big, self.gamma / jnp.where(big, norm, 1.0), 1.0)
        return eqx.tree_at(lambda c: c.weight, sym, weight * scale.astype(weight.dtype))

    def operator(self, h: int, w: int):
        """`K` on the `h x w` torus; build once per solve."""
        return self.coupling().operator(h, w)

    def bind(self, h: int, w: int) -> BoundSymmetricCell:
        """This cell as an energy map with its operator built for the `h x w` torus (the
        `fn` to give `ff.fixed_point`)."""
        return BoundSymmetricCell(self.operator(h, w), self.act, self.act_name, self.alpha_value)

    def __call__(
        self,
        z: Complex[Array, "c h w"],
        injection: Complex[Array, "c h w"],
        nudge: Complex[Array, "c h w"] | None = None,
    ) -> Complex[Array, "c h w"]:
        return self.bind(*z.shape[1:])(z, injection, nudge)

    def energy(self, z: Complex[Array, "c h w"], injection: Complex[Array, "c h w"]):
        return self.bind(*z.shape[1:]).energy(z, injection)

    def step_with(self, op, z, injection):
        """One update with a prebuilt operator `op = cell.operator(h, w)`."""
        return BoundSymmetricCell(op, self.act, self.act_name, self.alpha_value)(z, injection)

    def init_state(self, injection: Array) -> Array:
        return jnp.zeros_like(injection)

    def lipschitz_bound(self, h: int, w: int):
        """Upper bound of the update's Lipschitz constant on an `h x w` torus."""
        a = self.alpha_value
        return (1 - a) + a * self.coupling().operator_norm(h, w)
