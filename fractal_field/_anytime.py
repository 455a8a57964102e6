"""Anytime inference: accuracy against the solver budget, and per-input early exit."""

from __future__ import annotations

from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float, Int

from ._misc import tree_norm, tree_sub
from ._model import FieldClassifier
from ._multiscale import MultiScaleCell
from ._solver import AbstractFixedPointSolver


def _check_model(model) -> None:
    if not isinstance(model, FieldClassifier):
        raise TypeError(f"Expected a FieldClassifier, got {type(model).__name__}.")
    if isinstance(model.cell, MultiScaleCell):
        raise ValueError("Anytime inference supports single-field models (scales=1) only.")


def _settings(model, solver, max_steps, rtol, atol):
    solver = model.solver if solver is None else solver
    if not isinstance(solver, AbstractFixedPointSolver):
        raise TypeError(f"solver must be an ff solver (Naive, Anderson, Broyden), got {solver!r}.")
    if getattr(solver, "resolution_agnostic", False):
        raise ValueError(
            f"{type(solver).__name__} is not supported here: use Naive, Anderson or Broyden."
        )
    max_steps = model.max_steps if max_steps is None else int(max_steps)
    if max_steps < 1:
        raise ValueError(f"max_steps must be >= 1, got {max_steps}.")
    rtol = model.rtol if rtol is None else float(rtol)
    atol = model.atol if atol is None else float(atol)
    return solver, max_steps, rtol, atol


def _field_map(model: FieldClassifier, x):
    injection = model.encoder(x)
    _, h, w = injection.shape
    op = model.cell.operator(h, w)

    def fn(z, inj):
        return model.cell.step_with(op, z, inj)

    return fn, injection


class AnytimeTrace(eqx.Module):
    """The readout at every step of a batch of solves, from which the predictions and steps
    of any smaller budget follow without solving again.

    For image `i` and step `k <= num_steps[i]` (the solve's own length): `logits[i, k]` is the
    readout of the iterate `z_k`, `polished_logits[i, k]` that of `f(z_k)` (what a solve that
    stops at `k` on its residual test returns), and `residual[i, k]`, `fnorm[i, k]` are
    `||f(z_k) - z_k||` and `||f(z_k)||`; `final_logits[i]` is the readout of the solution.
    Entries past `num_steps[i]` are not meaningful. Arrays are NumPy arrays.
    """

    num_steps: Int[np.ndarray, " b"]
    logits: Float[np.ndarray, "b steps classes"]
    polished_logits: Float[np.ndarray, "b steps classes"]
    residual: Float[np.ndarray, "b steps"]
    fnorm: Float[np.ndarray, "b steps"]
    final_logits: Float[np.ndarray, "b classes"]
    max_steps: int = eqx.field(static=True)

    def budget(self, k: int) -> tuple[np.ndarray, np.ndarray]:
        """`(predictions, steps)` of solves with `max_steps=k` (same tolerances)."""
        if not 0 <= k <= self.max_steps:
            raise ValueError(f"budget k={k} must lie in [0, {self.max_steps}].")
        n = self.num_steps
        at_k = np.argmax(self.logits[:, k], -1)
        pred = np.where(k >= n, np.argmax(self.final_logits, -1), at_k)
        return pred, np.minimum(n, k)

    def tolerance(self, rtol: float, atol: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
        """`(predictions, steps)` of solves stopping on `||f(z) - z|| <= atol + rtol ||f(z)||`;
        valid for tolerances no tighter than those of the traced solve."""
        first = _first(self._converged(rtol, atol))
        return self._stop_at(first, np.zeros_like(first, bool))

    def early_exit(
        self, stable: int, rtol: float, atol: float = 0.0
    ) -> tuple[np.ndarray, np.ndarray]:
        """`(predictions, steps)` of `ff.solve_early_exit(..., stable=stable)`: each solve stops
        once its prediction has not changed for `stable` steps (or on the residual test)."""
        if stable < 1:
            raise ValueError(f"stable={stable} must be >= 1.")
        conv = self._converged(rtol, atol)
        pred = np.argmax(self.logits, -1)
        count = np.zeros_like(pred)
        for k in range(2, pred.shape[1]):
            count[:, k] = np.where(pred[:, k] == pred[:, k - 1], count[:, k - 1] + 1, 0)
        first = _first(conv | (count >= stable))
        return self._stop_at(
            first, ~conv[np.arange(len(first)), np.minimum(first, conv.shape[1] - 1)]
        )

    def _converged(self, rtol, atol) -> np.ndarray:
        k = np.arange(self.residual.shape[1])
        valid = k[None, :] <= self.num_steps[:, None]
        return valid & (self.residual <= atol + rtol * self.fnorm)

    def _stop_at(self, first: np.ndarray, raw: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Stop image `i` at step `first[i]` (beyond its solve: the solve's own end), with the
        readout of `z_k` where `raw` and of `f(z_k)` elsewhere."""
        n = self.num_steps
        idx = np.arange(len(n))
        k = np.minimum(first, self.logits.shape[1] - 1)
        pred = np.where(
            raw, np.argmax(self.logits[idx, k], -1), np.argmax(self.polished_logits[idx, k], -1)
        )
        beyond = first > n
        return np.where(beyond, np.argmax(self.final_logits, -1), pred), np.where(beyond, n, first)


def _first(mask: np.ndarray) -> np.ndarray:
    """Index of the first `True` along the last axis (its length if none)."""
    return np.where(mask.any(-1), np.argmax(mask, -1), mask.shape[-1])


@eqx.filter_jit
def _trace_batch(model, x, solver, max_steps, rtol, atol):
    def one(x):
        fn, injection = _field_map(model, x)
        sol = model.solve(
            x, solver=solver, max_steps=max_steps, rtol=rtol, atol=atol, record_every=1
        )
        traj = sol.stats.trajectory  # (max_steps + 1, c, h, w); zeros past num_steps
        fy = jax.vmap(fn, (0, None))(traj, injection)
        residual = jax.vmap(lambda a, b: tree_norm(tree_sub(a, b)))(fy, traj)
        return dict(
            num_steps=sol.stats.num_steps,
            logits=jax.vmap(model.readout)(traj),
            polished_logits=jax.vmap(model.readout)(fy),
            residual=residual,
            fnorm=jax.vmap(tree_norm)(fy),
            final_logits=model.readout(sol.value),
        )

    return jax.vmap(one)(x)


def anytime_trace(
    model: FieldClassifier,
    x: Float[Array, "b cin H W"],
    *,
    solver: AbstractFixedPointSolver | None = None,
    max_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
    batch_size: int = 250,
) -> AnytimeTrace:
    """Solve a batch once (recording every iterate) and return its `ff.AnytimeTrace`.

    `solver`, `max_steps`, `rtol`, `atol` default to the model's; the trace answers for every
    budget up to `max_steps` and every tolerance no tighter than `rtol`, `atol`. Runs in
    chunks of `batch_size` images (memory: `max_steps + 1` fields per image).
    """
    _check_model(model)
    solver, max_steps, rtol, atol = _settings(model, solver, max_steps, rtol, atol)
    x = np.asarray(x)
    if x.ndim != 4:
        raise ValueError(f"anytime_trace expects a batch (b, c, H, W), got shape {x.shape}.")
    parts = [
        jax.device_get(_trace_batch(model, x[i : i + batch_size], solver, max_steps, rtol, atol))
        for i in range(0, len(x), batch_size)
    ]
    out = {k: np.concatenate([np.asarray(p[k]) for p in parts]) for k in parts[0]}
    return AnytimeTrace(max_steps=max_steps, **out)


def solve_early_exit(
    model: FieldClassifier,
    x: Float[Array, "cin H W"],
    *,
    stable: int,
    solver: AbstractFixedPointSolver | None = None,
    max_steps: int | None = None,
    rtol: float | None = None,
    atol: float | None = None,
) -> tuple[Float[Array, " classes"], Int[Array, ""]]:
    """`(logits, steps)` for one image, stopping the solve as soon as the predicted class has
    not changed for `stable` consecutive steps (from step 1 on), or the residual test of
    `ff.fixed_point` passes (then the logits are those of `f(z)`), or after `max_steps`.
    `vmap` over a batch: each image stops on its own."""
    _check_model(model)
    if isinstance(stable, bool) or not isinstance(stable, int) or stable < 1:
        raise ValueError(f"stable={stable!r} must be a positive int.")
    solver, max_steps, rtol, atol = _settings(model, solver, max_steps, rtol, atol)
    fn, injection = _field_map(model, x)

    def predict(z):
        return jnp.argmax(model.readout(z))

    def converged(y, fy):
        return tree_norm(tree_sub(fy, y)) <= atol + rtol * tree_norm(fy)

    z0 = model.cell.init_state(injection)
    fy0 = fn(z0, injection)
    carry0: dict[str, Any] = dict(
        step=jnp.array(0),
        y=z0,
        fy=fy0,
        state=solver.init(fn, z0, fy0, injection),
        pred=predict(z0),
        count=jnp.array(0),
        conv=converged(z0, fy0),
    )

    def body(c):
        y, fy, state, _ = solver.step(fn, c["y"], c["fy"], injection, c["state"])
        step = c["step"] + 1
        pred = predict(y)
        same = (pred == c["pred"]) & (step >= 2)
        return dict(
            step=step,
            y=y,
            fy=fy,
            state=state,
            pred=pred,
            count=jnp.where(same, c["count"] + 1, 0),
            conv=converged(y, fy),
        )

    def cond(c):
        return ~c["conv"] & (c["count"] < stable) & (c["step"] < max_steps)

    final = jax.lax.while_loop(cond, body, carry0)
    z = jax.tree_util.tree_map(lambda a, b: jnp.where(final["conv"], a, b), final["fy"], final["y"])
    return model.readout(z), final["step"]
