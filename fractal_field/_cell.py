"""The fractal cell: one weight set iterated on a complex (or real) toroidal field."""

from __future__ import annotations

from collections.abc import Callable

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Complex, Float, PRNGKeyArray

from ._activation import LIPSCHITZ, Cardioid, CReLU, ModReLU, PhaseTanh, ZReLU
from ._contraction import ContractiveToroidalConv
from ._conv import ToroidalConv
from ._norm import ComplexGroupNorm

_ACTIVATIONS = {"cardioid": Cardioid, "crelu": CReLU, "phase_tanh": PhaseTanh, "zrelu": ZReLU}


def check_activation(activation: str) -> None:
    if activation != "modrelu" and activation not in _ACTIVATIONS:
        raise ValueError(
            f"Unknown activation {activation!r}; choose from {['modrelu', *sorted(_ACTIVATIONS)]}."
        )


def make_activation(activation: str, channels: int) -> eqx.Module:
    check_activation(activation)
    return ModReLU(channels) if activation == "modrelu" else _ACTIVATIONS[activation]()


def make_alpha(alpha: float, learn_alpha: bool, owner: str) -> Array | float:
    """The relaxation parameter: `alpha` itself, or (learnable) its logit, so that the
    learned alpha stays in (0, 1)."""
    if not 0 < alpha < 1 and not (alpha == 1 and not learn_alpha):
        raise ValueError(f"{owner}(alpha={alpha}): alpha must lie in (0, 1].")
    return jnp.asarray(jnp.log(alpha / (1 - alpha)), jnp.float32) if learn_alpha else float(alpha)


class Expanded(eqx.Module):
    """`K act(E z)`: an expansion to a wider hidden field, an activation, a projection back.

    The linear part of an expanded `FractalCell` (its `operator`/`planar_operator`); `act` is
    the hidden activation (or its `.planar` method for planar fields).
    """

    expand: Callable
    act: Callable
    project: Callable

    def __call__(self, z):
        return self.project(self.act(self.expand(z)))


class FractalCell(eqx.Module):
    """`z <- (1 - alpha) z + alpha * act(K z + injection)` on a `(channels, h, w)` torus.

    - `K`: a complex toroidal convolution whose exact operator norm is kept at most `gamma`
      (on the reference grid `norm_grid`; see `ContractiveToroidalConv`).
    - `hidden > 0` makes `K z` an expanded map `K act_h(E z)` (MDEQ's wide residual block):
      `E` widens the field to `hidden` channels with operator norm at most 1, `act_h` is
      `hidden_activation` (default: `activation`), and `K` projects back with norm at most
      `gamma`, so the contraction bound is unchanged for 1-Lipschitz activations.
    - `act`: `"modrelu"` (learnable per-channel bias), `"cardioid"`, `"crelu"` or
      `"phase_tanh"`.
    - `alpha`: relaxation in (0, 1); learnable (through a sigmoid) if `learn_alpha`.
    - `norm_groups > 0` normalises `K z` with `ComplexGroupNorm(channels, norm_groups)`
      (initial gain 0.25) before the injection is added (MDEQ's GroupNorm). The normalisation
      is not Lipschitz, so such a cell has no contraction certificate (`lipschitz_bound` is
      `inf`); its fixed point exists (the update is bounded) but need not be unique, and
      solvers may stop unconverged. `ff.jacobian_penalty` helps keep the solves short.
    - `weight_norm`: weight normalisation (MDEQ's) of the convolutions: each output channel's
      weights are `gain * v / ||v||` with a learnt `gain`, before the contraction rescaling
      (`ContractiveToroidalConv(weight_norm=True)`).
    - `dtype=jnp.float32`: a real field, with real convolution weights and the activation's
      real counterpart (modReLU is then `sign(z) relu(|z| + b)`), the same contraction
      certificate; not with `norm_groups` or the planar layout.

    Resolution-agnostic: the same weights act on any grid size, which the multigrid solver
    uses. With a 1-Lipschitz activation the cell is a contraction with constant
    `lipschitz_bound()`, so the fixed point exists, is unique and naive iteration reaches it
    from any start.
    """

    conv: ContractiveToroidalConv | ToroidalConv
    act: eqx.Module
    act_name: str = eqx.field(static=True)
    expand: ContractiveToroidalConv | ToroidalConv | None
    hidden_act: eqx.Module | None
    hidden_act_name: str | None = eqx.field(static=True)
    norm: ComplexGroupNorm | None
    alpha_param: Float[Array, ""] | float
    learn_alpha: bool = eqx.field(static=True)

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
        learn_alpha: bool = False,
        impl: str = "auto",
        hidden: int = 0,
        hidden_activation: str | None = None,
        norm_groups: int = 0,
        weight_norm: bool = False,
        dtype=jnp.complex64,
        key: PRNGKeyArray,
    ):
        alpha_param = make_alpha(alpha, learn_alpha, "FractalCell")
        if not jnp.issubdtype(dtype, jnp.inexact):
            raise TypeError(f"FractalCell(dtype={dtype}) must be complex or real floating.")
        if norm_groups and not jnp.issubdtype(dtype, jnp.complexfloating):
            raise ValueError(
                f"FractalCell(norm_groups={norm_groups}) normalises complex fields; it is not "
                f"available with a real field (dtype={jnp.dtype(dtype).name})."
            )
        if hidden < 0:
            raise ValueError(f"FractalCell(hidden={hidden}) must be >= 0 (0: no expansion).")
        if norm_groups < 0:
            raise ValueError(
                f"FractalCell(norm_groups={norm_groups}) must be >= 0 (0: no normalisation)."
            )
        # Without expansion, the keys (so the initial weights) are those of cells before it.
        ckey, akey = jr.split(key)
        ekey = jr.fold_in(key, 1)
        check_activation(activation)
        hidden_activation = activation if hidden_activation is None else hidden_activation
        check_activation(hidden_activation)
        if hidden:
            self.expand = ContractiveToroidalConv(
                channels,
                hidden,
                kernel_size,
                dilations,
                gamma=1.0,
                norm_grid=norm_grid,
                impl=impl,
                dtype=dtype,
                weight_norm=weight_norm,
                key=ekey,
            )
            self.hidden_act = make_activation(hidden_activation, hidden)
            self.hidden_act_name = hidden_activation
        else:
            self.expand = self.hidden_act = self.hidden_act_name = None
        self.conv = ContractiveToroidalConv(
            hidden or channels,
            channels,
            kernel_size,
            dilations,
            gamma=gamma,
            norm_grid=norm_grid,
            impl=impl,
            dtype=dtype,
            weight_norm=weight_norm,
            key=ckey,
        )
        # A small initial gain: with gain 1 the normalised update starts far from contractive
        # (a 64-channel CIFAR field: no convergence in 60 Anderson steps), with 0.25 it
        # converges in ~20.
        self.norm = ComplexGroupNorm(channels, norm_groups, gain=0.25) if norm_groups else None
        self.act_name = activation
        self.act = make_activation(activation, channels)
        self.learn_alpha = learn_alpha
        self.alpha_param = alpha_param

    @property
    def channels(self) -> int:
        return self.conv.out_channels

    def alpha(self):
        return jax.nn.sigmoid(self.alpha_param) if self.learn_alpha else self.alpha_param

    @property
    def hidden(self) -> int:
        return 0 if self.expand is None else self.expand.out_channels

    def __call__(
        self, z: Complex[Array, "c h w"], injection: Complex[Array, "c h w"]
    ) -> Complex[Array, "c h w"]:
        """One cell update at any grid size."""
        if self.expand is None:
            return self.step_with(self.conv, z, injection)
        return self.step_with(Expanded(self.expand, self.hidden_act, self.conv), z, injection)

    def operator(self, h: int, w: int) -> Callable:
        """The cell's (rescaled) linear part on the `h x w` torus, for `step_with`; build once
        per solve."""
        if self.expand is None:
            return self.conv.operator(h, w)
        return Expanded(self.expand.operator(h, w), self.hidden_act, self.conv.operator(h, w))

    def planar_operator(self, h: int, w: int) -> Callable:
        """The same for batched planar fields, for `planar_step`."""
        if self.expand is None:
            return self.conv.planar_operator(h, w)
        return Expanded(
            self.expand.planar_operator(h, w),
            self.hidden_act.planar,
            self.conv.planar_operator(h, w),
        )

    def init_state(self, injection: Array) -> Array:
        """The zero field matching `injection` (unbatched, or batched planar)."""
        return jnp.zeros_like(injection)

    def step_with(self, op: Callable, z, injection):
        a = self.alpha()
        u = op(z) if self.norm is None else self.norm(op(z))
        out = (1 - a) * z + a * self.act(u + injection)
        return out.astype(z.dtype)

    def planar_step(
        self, op: Callable, p: Float[Array, "2 h w c b"], injection: Float[Array, "2 h w c b"]
    ) -> Float[Array, "2 h w c b"]:
        """One cell update on a batch of fields in the planar layout (`ff.to_planar`), with
        `op = cell.planar_operator(h, w)` built once per solve. Same map as `step_with`
        applied to each field of the batch."""
        a = self.alpha()
        u = op(p) if self.norm is None else self.norm.planar(op(p))
        out = (1 - a) * p + a * self.act.planar(u + injection)
        return out.astype(p.dtype)

    def normalized(self) -> FractalCell:
        """This cell with the contraction rescaling applied once (a plain `ToroidalConv`), for
        solvers that call it at several grid sizes."""
        if isinstance(self.conv, ToroidalConv):
            return self
        cell = eqx.tree_at(lambda c: c.conv, self, self.conv.effective())
        if self.expand is None:
            return cell
        return eqx.tree_at(lambda c: c.expand, cell, self.expand.effective())

    def smoothing_interval(self, grid: int = 64) -> tuple[float, float]:
        """The range of `Re mu` over the eigenvalues `mu` of `I - J` at the frequencies a 2x
        coarser grid cannot hold, `J` the cell's Jacobian with the activation taken as the
        identity: `mu = alpha (1 - lambda)`, `lambda` the eigenvalues of the kernel's
        `c x c` symbol at frequencies with `max(|k_x|, |k_y|) >= grid / 4`. For
        `ff.chebyshev_damping` in a multigrid smoother (`ff.Multigrid(damping=...)`).
        Cells with an expansion layer or group norm have no such symbol."""
        if self.expand is not None or self.norm is not None:
            raise ValueError(
                "FractalCell.smoothing_interval needs a cell whose linear part is one "
                "convolution (no expansion layer, no group norm)."
            )
        if grid < 4 or grid % 4:
            raise ValueError(f"smoothing_interval(grid={grid}) must be a multiple of 4.")
        conv = self.normalized().conv
        symbol = np.asarray(conv.spectrum(grid, grid))  # (c, c, grid, grid)
        k = np.minimum(np.arange(grid), grid - np.arange(grid))
        rough = np.maximum(k[:, None], k[None]) >= grid // 4
        mats = np.moveaxis(symbol[:, :, rough], -1, 0)
        mu = float(self.alpha()) * (1 - np.linalg.eigvals(mats).real)
        return float(mu.min()), float(mu.max())

    def lipschitz_bound(self, h: int, w: int):
        """Upper bound of the cell's Lipschitz constant on an `h x w` torus (`inf` with
        `norm_groups`)."""
        if self.norm is not None:
            return jnp.asarray(jnp.inf, jnp.float32)
        lip = LIPSCHITZ[self.act_name] * _norm(self.conv, h, w)
        if self.expand is not None:
            lip = lip * LIPSCHITZ[self.hidden_act_name] * _norm(self.expand, h, w)
        a = self.alpha()
        return (1 - a) + a * lip


def _norm(conv: ContractiveToroidalConv | ToroidalConv, h: int, w: int) -> Array:
    if isinstance(conv, ContractiveToroidalConv):
        return conv.lipschitz_bound(h, w)
    return conv.operator_norm(h, w)
