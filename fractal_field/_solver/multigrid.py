"""Nonlinear multigrid (Full Approximation Scheme) for fixed points of field maps on a torus."""

from __future__ import annotations

import math
import numbers
from typing import ClassVar, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu
from jaxtyping import Array, Inexact, PyTree

from .._misc import describe, tree_add, tree_lerp, tree_sub
from .base import AbstractFixedPointSolver, Fn

Restriction = Literal["average", "full_weighting"]
Prolongation = Literal["bilinear", "constant"]


def restrict(x: Inexact[Array, "*b H W"], mode: Restriction = "average") -> Array:
    """Periodic fine-to-coarse transfer of the last two axes, `(..., H, W) -> (..., H/2, W/2)`.

    Cell-centred: coarse cell `(i, j)` covers fine cells `2i, 2i+1` by `2j, 2j+1`.

    - `"average"`: mean over those 2x2 fine cells.
    - `"full_weighting"`: the `[1, 3, 3, 1] / 8` tensor-product stencil over fine cells
      `2i-1 .. 2i+2` with wrap-around (a quarter of the transpose of `"bilinear"`
      prolongation).

    Both keep constants, commute with translations by two fine cells and keep the dtype.
    """
    *batch, h, w = x.shape
    if mode == "average":
        return x.reshape(*batch, h // 2, 2, w // 2, 2).mean(axis=(-3, -1))
    if mode == "full_weighting":
        for axis in (-2, -1):
            x = (
                jnp.roll(x, 1, axis) + 3 * x + 3 * jnp.roll(x, -1, axis) + jnp.roll(x, -2, axis)
            ) / 8
            x = x[..., ::2, :] if axis == -2 else x[..., ::2]
        return x
    raise ValueError(f"Unknown restriction {mode!r}.")


def prolong(x: Inexact[Array, "*b h w"], mode: Prolongation = "bilinear") -> Array:
    """Periodic coarse-to-fine transfer of the last two axes, `(..., h, w) -> (..., 2h, 2w)`.

    - `"constant"`: each coarse value is copied to its 2x2 fine cells (so
      `restrict(prolong(c), "average") == c` exactly).
    - `"bilinear"`: cell-centred bilinear interpolation with wrap-around (weights `3/4, 1/4`
      per axis), exact for constants and, away from the wrap, for affine fields.
    """
    for axis in (x.ndim - 2, x.ndim - 1):
        if mode == "constant":
            x = jnp.repeat(x, 2, axis=axis)
        elif mode == "bilinear":
            even = 0.75 * x + 0.25 * jnp.roll(x, 1, axis)
            odd = 0.75 * x + 0.25 * jnp.roll(x, -1, axis)
            both = jnp.stack([even, odd], axis=axis + 1)
            shape = x.shape[:axis] + (2 * x.shape[axis],) + x.shape[axis + 1 :]
            x = both.reshape(shape).astype(x.dtype)
        else:
            raise ValueError(f"Unknown prolongation {mode!r}.")
    return x


def chebyshev_damping(low: float, high: float, steps: int) -> tuple[float, ...]:
    """Step sizes for `steps` smoothing steps that damp every error mode whose eigenvalue
    `mu` of `I - f'(z)` lies in `[low, high]` (`0 < low < high`) by the least possible
    factor: `max |prod_k (1 - w_k mu)|`, the scaled Chebyshev polynomial of degree `steps`.

    For `Multigrid(damping=...)`: `[low, high]` should hold the modes the smoother must damp,
    the ones too rough for the next coarser grid (for a cell `z <- (1 - a) z + a g(z)`,
    `mu = a (1 - lambda)` for the eigenvalues `lambda` of `g'` at high frequencies) and, if the
    map holds some entries fixed (`f(z)_i = c_i`, e.g. known pixels), `mu = 1`. Ordered from
    the smallest step size to the largest.
    """
    if not 0 < low < high:
        raise ValueError(f"chebyshev_damping needs 0 < low < high, got low={low}, high={high}.")
    if steps < 1:
        raise ValueError(f"chebyshev_damping(steps={steps}) must be >= 1.")
    mid, half = (high + low) / 2, (high - low) / 2
    nodes = [mid + half * math.cos((2 * k + 1) * math.pi / (2 * steps)) for k in range(steps)]
    return tuple(1 / x for x in nodes)


def _grid(z: PyTree) -> tuple[int, int]:
    leaves = jtu.tree_flatten_with_path(z)[0]
    grids = {tuple(x.shape[-2:]) for _, x in leaves if len(x.shape) >= 2}
    bad = [jtu.keystr(p) or "<root>" for p, x in leaves if len(x.shape) < 2]
    if bad or len(grids) != 1:
        shapes = ", ".join(f"z{jtu.keystr(p)}: {describe(x)}" for p, x in leaves)
        raise ValueError(
            "Multigrid needs every state leaf to have shape (..., H, W) with one common torus "
            f"grid (H, W) in its last two axes; got {shapes}."
        )
    return grids.pop()  # pyright: ignore


def _real_vdot(a: PyTree, b: PyTree) -> Array:
    """`Re <a, b>` summed over all leaves."""
    pairs = zip(jtu.tree_leaves(a), jtu.tree_leaves(b), strict=True)
    return sum(jnp.sum(jnp.real(jnp.conj(x) * y)) for x, y in pairs)  # pyright: ignore


def _axpy(alpha, x: PyTree, y: PyTree) -> PyTree:
    return jtu.tree_map(lambda u, v: (v + alpha * u).astype(v.dtype), x, y)


def _coarsen_tree(tree: PyTree, grid: tuple[int, int], mode: Restriction) -> PyTree:
    """Restrict every array leaf whose last two axes equal `grid` (subsample integer and
    boolean ones); keep the rest."""

    def leaf(x):
        if not (eqx.is_array(x) and x.ndim >= 2 and tuple(x.shape[-2:]) == grid):
            return x
        if jnp.issubdtype(x.dtype, jnp.inexact):
            return restrict(jnp.asarray(x), mode)
        return jnp.asarray(x)[..., ::2, ::2]

    return jtu.tree_map(leaf, tree)


def _as_damping(d):
    """A list of step sizes (as configs store them) as a tuple."""
    return tuple(d) if isinstance(d, list) else d


def _has_coarsened(x) -> bool:
    return isinstance(x, eqx.Module) and callable(getattr(x, "coarsened", None))


def _coarsen_layers(tree: PyTree) -> PyTree:
    """Every layer with a `coarsened()` method replaced by what it returns."""
    return jtu.tree_map(
        lambda x: x.coarsened() if _has_coarsened(x) else x, tree, is_leaf=_has_coarsened
    )


class Multigrid(AbstractFixedPointSolver):
    """Nonlinear multigrid V-cycle (Full Approximation Scheme) for `z = f(z)` on a torus.

    One `step` is one V-cycle for `N(z) = z - f(z) = 0`. At every level the smoother is the
    map itself (damped Picard): for the level equation `N_H(z) = b_H` it is
    `z <- (1 - damping) z + damping (f_H(z) + b_H)`, where `f_H` is `fn` evaluated on the
    coarser grid. The coarse-grid correction is the FAS one: with `r_h = b_h - N_h(z_h)`,
    the coarse problem has right-hand side `b_H = N_H(R z_h) + R r_h` (tau correction), is
    solved approximately by the next V-cycle (or `coarse_steps` smoothing steps on the
    coarsest grid), and `z_h += P(z_H - R z_h)` (scaled, see `correction`). A fixed point is
    left unchanged by a cycle.

    - `levels`: number of grids, each halving `H` and `W` (`levels=1` is damped Picard).
    - `pre_smooth`, `post_smooth`: smoothing steps before and after the correction.
    - `coarse_steps`: smoothing steps on the coarsest grid.
    - `damping`: smoother step size `w > 0`, or a sequence of them taken in turn by the steps
      of every smoothing sweep (restarting with each sweep). Above 1 the step over-relaxes:
      the smoother's job is to damp the error modes the coarser grid cannot represent, and a
      step size fitted to their eigenvalues damps them much faster than `w = 1` (see
      `ff.chebyshev_damping`, which also keeps the modes the map holds fixed, such as
      clamped pixels, damped).
    - `restriction`: `"average"` (2x2 mean, default) or `"full_weighting"`.
    - `prolongation`: `"bilinear"` (periodic, default) or `"constant"` (piecewise constant).
    - `correction`: `"minimal_residual"` (default) scales the prolonged correction by the
      `alpha` in `[0, max_correction]` that minimises the fine residual, linearised by a
      secant; `"unit"` adds it as it is. The scaling compensates a coarse map that is only a
      rough model of the fine one (a fixed 3x3 stencil reaches twice as far on a grid twice
      as coarse) and an under-solved coarsest grid; it costs no extra evaluation.
    - `max_correction`: upper bound on `alpha`.
    - `coarsen_layers`: on every coarser grid, replace each layer of `fn` that has a
      `coarsened()` method (e.g. `ff.ToroidalConv`; `fn` an `eqx.Module` holding it) by the
      layer it returns, the same operator on smooth fields one grid coarser. Without it a
      fixed stencil acts on the coarse grid as it is and reaches twice as far. Layers in a
      plain function's closure are not reached.
    - `residual_scale`: multiplies the residual restricted to each coarser grid. A fixed 3x3
      stencil that acts as a second-order (diffusion) operator is `4x` stronger on smooth
      errors one grid coarser, so its coarse correction comes out `4x` too small: `4` (with
      `correction="unit"` and full weighting) makes it the right size for such maps, e.g. the
      harmonic hole filling of `ff.InpaintField` at its diffusion initialisation
      (`benchmarks/solvers_field.py`). Keep `1` (default) where the slow modes decay at a rate
      that does not depend on the grid (a mass-like term): there `4` over-corrects and diverges.

    Defaults were chosen by measurement on smooth, strongly contractive convolutional field
    maps (see `benchmarks/solvers.py`): bilinear prolongation and the minimal-residual
    correction each roughly halve the work relative to piecewise-constant / unit
    corrections, while more than three levels or full weighting did not help.

    **Contract.** Every state leaf has shape `(..., H, W)` with a common torus grid `(H, W)`
    divisible by `2**(levels - 1)`, and `fn(z, args)` accepts and returns the state at each
    coarser grid (a resolution-agnostic field update, e.g. periodic convolutions via
    `jnp.roll`). Leaves of `args`, and array leaves of `fn` when it is a pytree such as an
    `eqx.Module`, whose last two axes equal the fine grid `(H, W)` are restricted alongside
    the state (e.g. an injection field; integer and boolean fields such as masks are
    subsampled); all other leaves (weights, scalars) are used as they are. So an unrelated
    parameter whose last two axes happen to equal `(H, W)` is restricted too, and a
    fine-grid array closed over by a plain function cannot be: pass fields through `args`
    or as `eqx.Module` fields. `fixed_point` checks the contract at trace time. Since `fn`
    is not closure-converted, parameters to differentiate must also enter through `args` or
    as fields of an `eqx.Module` `fn`.

    `num_fn_evals` counts work in fine-grid evaluations: an evaluation on a grid `4**l`
    times smaller counts `4**-l`. A cycle costs `pre_smooth + post_smooth + 1` fine
    evaluations (one more with `post_smooth=0` and the minimal-residual correction) plus
    the coarse work, `7.5` in all with the defaults.
    """

    levels: int = 3
    pre_smooth: int = 2
    post_smooth: int = 2
    coarse_steps: int = 20
    damping: float | tuple[float, ...] = eqx.field(default=1.0, converter=_as_damping)
    restriction: Restriction = "average"
    prolongation: Prolongation = "bilinear"
    correction: Literal["minimal_residual", "unit"] = "minimal_residual"
    max_correction: float = 4.0
    residual_scale: float = 1.0
    # Static, so that checkpoints of models that hold a solver keep their layout.
    coarsen_layers: bool = eqx.field(static=True, default=False)

    # `fn` is called on coarser grids, so the driver must not closure-convert it.
    resolution_agnostic: ClassVar[bool] = True

    def __check_init__(self):
        if self.levels < 1:
            raise ValueError(f"Multigrid(levels={self.levels}): levels must be >= 1.")
        if self.pre_smooth < 0 or self.post_smooth < 0:
            raise ValueError("Multigrid(pre_smooth=..., post_smooth=...) must be >= 0.")
        if self.coarse_steps < 1:
            raise ValueError(f"Multigrid(coarse_steps={self.coarse_steps}) must be >= 1.")
        weights = self.damping if isinstance(self.damping, tuple) else (self.damping,)
        ok = all(isinstance(w, numbers.Real) and math.isfinite(w) and w > 0 for w in weights)
        if not weights or not ok:
            raise ValueError(
                f"Multigrid(damping={self.damping}): damping must be a positive number or a "
                "non-empty sequence of them."
            )
        if self.restriction not in ("average", "full_weighting"):
            raise ValueError("Multigrid(restriction=...) must be 'average' or 'full_weighting'.")
        if self.prolongation not in ("bilinear", "constant"):
            raise ValueError("Multigrid(prolongation=...) must be 'bilinear' or 'constant'.")
        if self.correction not in ("minimal_residual", "unit"):
            raise ValueError("Multigrid(correction=...) must be 'minimal_residual' or 'unit'.")
        if not self.max_correction >= 1:
            raise ValueError(f"Multigrid(max_correction={self.max_correction}) must be >= 1.")
        if not self.residual_scale > 0:
            raise ValueError(f"Multigrid(residual_scale={self.residual_scale}) must be > 0.")

    def check(self, fn: Fn, z0: PyTree, args: PyTree) -> None:
        h, w = _grid(z0)
        factor = 2 ** (self.levels - 1)
        if h % factor or w % factor:
            raise ValueError(
                f"Multigrid(levels={self.levels}) needs the torus grid (H, W) = ({h}, {w}) to "
                f"be divisible by 2**(levels - 1) = {factor}. Use fewer levels or pad the grid."
            )
        if self.levels == 1:
            return

        def coarse_problem(fn, z, args):
            fns, argss = self._hierarchy(fn, args, (h, w))
            for level in range(1, self.levels):
                z = jtu.tree_map(lambda x: restrict(x, self.restriction), z)
                z_in = z
                z = fns[level](z, argss[level])
                if jtu.tree_structure(z) != jtu.tree_structure(z_in):
                    raise ValueError("fn changed the pytree structure of the state.")
                for a, b in zip(jtu.tree_leaves(z_in), jtu.tree_leaves(z), strict=True):
                    if a.shape != b.shape or a.dtype != b.dtype:
                        raise ValueError(
                            f"fn mapped a state leaf {describe(a)} on grid {a.shape[-2:]} to "
                            f"{describe(b)}."
                        )
            return z

        try:
            eqx.filter_eval_shape(coarse_problem, fn, z0, args)
        except Exception as e:  # noqa: BLE001
            raise ValueError(
                "Multigrid needs a resolution-agnostic fn: fn(z, args) must accept the state "
                f"on every coarser grid (H, W) / 2**l, l < levels={self.levels} (fine grid "
                f"({h}, {w})), and return the same shapes and dtypes. Fine-grid fields must be "
                "leaves of `args` or array fields of an eqx.Module `fn` (these are restricted "
                "with the state), not arrays closed over by a plain function. Evaluating fn on a "
                f"coarser grid failed with:\n  {type(e).__name__}: {e}"
            ) from e

    def _hierarchy(self, fn, args, grid):
        """`fn` and `args` at every level, restricting fine-grid array leaves."""
        fns, argss = [fn], [args]
        for _ in range(1, self.levels):
            coarse = _coarsen_tree(fns[-1], grid, self.restriction)
            fns.append(_coarsen_layers(coarse) if self.coarsen_layers else coarse)
            argss.append(_coarsen_tree(argss[-1], grid, self.restriction))
            grid = (grid[0] // 2, grid[1] // 2)
        return fns, argss

    def init(self, fn, y, fy, args):
        return None

    def step(self, fn, y, fy, args, state):
        fns, argss = self._hierarchy(fn, args, _grid(y))
        y_new, fy_new, work = self._cycle(0, fns, argss, y, fy, None, need_f=True)
        return y_new, fy_new, state, work

    def _cycle(self, level, fns, argss, z, fz, b, need_f):
        """One V-cycle for `z - f_l(z) = b` (`b=None` means zero) from `z` with `fz = f_l(z)`.

        Returns the new `z`, `f_l(z)` (or `None` unless `need_f`) and the work spent.
        """
        cost = 0.25**level
        work = 0.0

        def evaluate(z):
            nonlocal work
            work += cost
            return fns[level](z, argss[level])

        weights = self.damping if isinstance(self.damping, tuple) else (self.damping,)

        def update(z, fz, i):
            # The i-th step of a sweep takes the i-th step size, cyclically.
            w = weights[i % len(weights)] if isinstance(i, int) else jnp.asarray(weights)[i]
            return tree_lerp(z, fz if b is None else tree_add(fz, b), w)

        def smooth(z, fz, steps):
            if steps == 0:
                return z, fz
            first = 0
            if fz is not None:
                z, fz, first = update(z, fz, 0), None, 1
            if steps - first > 2:
                n = len(weights)
                body = lambda i, z: update(z, fns[level](z, argss[level]), i % n)
                z = jax.lax.fori_loop(first, steps, body, z)
                nonlocal work
                work += cost * (steps - first)
            else:
                for i in range(first, steps):
                    z = update(z, evaluate(z), i)
            return z, None

        if level == self.levels - 1:
            z, fz = smooth(z, fz, self.coarse_steps)
        else:
            z, fz = smooth(z, fz, self.pre_smooth)
            if fz is None:
                fz = evaluate(z)
            r = tree_sub(fz if b is None else tree_add(fz, b), z)  # b - N(z)
            down = lambda t: jtu.tree_map(lambda x: restrict(x, self.restriction), t)
            zc = down(z)
            fzc = fns[level + 1](zc, argss[level + 1])
            work += cost / 4
            rc = down(r)
            if self.residual_scale != 1:
                rc = jtu.tree_map(lambda x: (self.residual_scale * x).astype(x.dtype), rc)
            bc = tree_add(tree_sub(zc, fzc), rc)  # N_H(R z) + s R r
            zc_new, _, coarse_work = self._cycle(level + 1, fns, argss, zc, fzc, bc, False)
            work += coarse_work
            c = jtu.tree_map(
                lambda x, e: prolong(e, self.prolongation).astype(x.dtype), z, tree_sub(zc_new, zc)
            )
            if self.correction == "unit":
                z, fz = tree_add(z, c), None
            else:
                # Minimise ||r - alpha A c|| with the secant `A c = N(z + c) - N(z)`; the
                # evaluation at `z + c` also gives `f` at `z + alpha c` to first order, which
                # the first post-smoothing step uses.
                dfz = tree_sub(evaluate(tree_add(z, c)), fz)
                ac = tree_sub(c, dfz)
                den = _real_vdot(ac, ac)
                alpha = jnp.where(den > 0, _real_vdot(ac, r) / jnp.where(den > 0, den, 1), 1)
                alpha = jnp.clip(alpha, 0, self.max_correction)
                z, fz = _axpy(alpha, c, z), _axpy(alpha, dfz, fz)
                if self.post_smooth == 0:
                    fz = None
            z, fz = smooth(z, fz, self.post_smooth)
        if need_f and fz is None:
            fz = evaluate(z)
        return z, fz, work
