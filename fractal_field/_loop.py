"""The solver loop's `while`, with a batching rule that leaves the solver state alone."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.tree_util as jtu

Carry = dict[str, Any]

_plain = [False]


@contextlib.contextmanager
def plain_batching() -> Iterator[None]:
    """Within this context `while_done` traces as a plain `lax.while_loop` (batched by JAX's
    own rule), for tools that rewrite traced programs, like the ONNX export."""
    _plain.append(True)
    try:
        yield
    finally:
        _plain.pop()


def _where_leading(pred, a, b):
    """`where(pred, a, b)` with `pred` of shape `(batch,)` against leaves `(batch, ...)`."""
    return jtu.tree_map(
        lambda x, y: jnp.where(pred.reshape(pred.shape + (1,) * (x.ndim - 1)), x, y), a, b
    )


def while_done(
    body: Callable[[Any, Carry], Carry],
    operands: Any,
    carry: Carry,
    *,
    scratch: tuple[str, ...] = ("state",),
) -> Carry:
    """Run `carry = body(operands, carry)` until `carry["done"]`.

    Under `vmap`, `lax.while_loop` keeps every sample's whole carry with a select after each
    step (so a finished sample stops changing), which copies the solver's state, e.g.
    Anderson's history of `m` residuals, once per step. Here the batched loop runs until all
    samples are done and freezes every entry of `carry` except those named in `scratch`: a
    finished sample's solver state is never read again, so it may go on changing, and its
    update happens in place. The values returned are those of the plain batched loop.

    `operands` and `carry` are pytrees whose leaves are arrays or static values; `body` must
    not close over traced arrays (pass them in `operands`).
    """
    if _plain[-1]:
        return jax.lax.while_loop(lambda c: ~c["done"], lambda c: body(operands, c), carry)
    dyn_ops, static_ops = eqx.partition(operands, eqx.is_array)
    dyn_carry, static_carry = eqx.partition(carry, eqx.is_array)

    def step(dyn_ops, dyn_carry):
        ops = eqx.combine(dyn_ops, static_ops)
        new = body(ops, eqx.combine(dyn_carry, static_carry))
        return eqx.filter(new, eqx.is_array)

    @jax.custom_batching.custom_vmap
    def loop(dyn_ops, dyn_carry):
        return jax.lax.while_loop(lambda c: ~c["done"], lambda c: step(dyn_ops, c), dyn_carry)

    @loop.def_vmap
    def _rule(axis_size, in_batched, dyn_ops, dyn_carry):
        ops_batched, carry_batched = in_batched
        dyn_carry = jtu.tree_map(
            lambda x, b: x if b else jnp.broadcast_to(x, (axis_size,) + jnp.shape(x)),
            dyn_carry,
            carry_batched,
        )
        op_axes = jtu.tree_map(lambda b: 0 if b else None, ops_batched)
        batched_step = jax.vmap(step, in_axes=(op_axes, 0), axis_size=axis_size)

        def batched_body(c):
            new = batched_step(dyn_ops, c)
            return {
                k: v if k in scratch else _where_leading(c["done"], c[k], v) for k, v in new.items()
            }

        out = jax.lax.while_loop(lambda c: jnp.any(~c["done"]), batched_body, dyn_carry)
        return out, jtu.tree_map(lambda _: True, out)

    final = loop(dyn_ops, dyn_carry)
    return eqx.combine(final, static_carry)
