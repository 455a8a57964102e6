"""Fixed-point maps whose fixed points are the stationary points of an energy."""

from __future__ import annotations

import abc

import equinox as eqx
from jaxtyping import Array, Float, PyTree


class AbstractEnergyMap(eqx.Module):
    """A fixed-point map `z -> fn(z, args)` whose fixed points are the stationary points of
    a real energy `E(z, args)`, also when nudged.

    - `__call__(z, args, nudge=None)`: the update; with a `nudge` (a pytree like `z`), its
      fixed points are the stationary points of `E(z, args) + Re<nudge, z>` (`<a, b>` sums
      `conj(a) b` over all leaves).
    - `energy(z, args)`: `E`, a real scalar.

    What `ff.EquilibriumPropagation` needs. An energy map holds its parameters as fields (or
    receives them through `args`): `ff.fixed_point` passes it to the adjoint as it is.
    """

    @abc.abstractmethod
    def __call__(self, z: PyTree, args: PyTree, nudge: PyTree | None = None) -> PyTree: ...

    @abc.abstractmethod
    def energy(self, z: PyTree, args: PyTree) -> Float[Array, ""]: ...
