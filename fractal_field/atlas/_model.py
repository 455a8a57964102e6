"""The Atlas master: coordinate encodings, context embedding, shared kernel and readout."""

from __future__ import annotations

import copy

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Float, Int, PRNGKeyArray, Scalar

from ._alphabet import check_alphabet
from ._encoding import FourierFeatures, HashGrid1D
from ._kernel import AtlasKernel, iterate, solve


class AtlasMaster(eqx.Module):
    """Predicts the symbol at coordinate `x = i / n` of a book from `x`, the book's key and
    the `context` preceding symbols.

    Symbols: the alphabet's bytes, then the escape symbol (`len(alphabet)`, any other byte);
    contexts may also hold the padding symbol (`len(alphabet) + 1`, before the start). The
    injection `u = A [embed(context), fourier(x), grid(x), key]` drives the shared kernel for
    `steps` iterations (or to its fixed point with `fixed_point=True`); a linear readout of
    the final state gives the logits over `len(alphabet) + 1` symbols.
    """

    embed: Float[Array, "vocab dim"]
    fourier: FourierFeatures
    grid: HashGrid1D
    inject: eqx.nn.Linear
    kernel: AtlasKernel
    readout: eqx.nn.Linear
    alphabet: bytes = eqx.field(static=True)
    context: int = eqx.field(static=True)
    key_size: int = eqx.field(static=True)
    steps: int = eqx.field(static=True)
    blocks: int = eqx.field(static=True)
    fixed_point: bool = eqx.field(static=True)
    max_steps: int = eqx.field(static=True)

    def __init__(
        self,
        alphabet: bytes,
        *,
        context: int = 16,
        embed_dim: int = 12,
        width: int = 256,
        octaves: int = 8,
        grid_levels: int = 8,
        table_size: int = 1024,
        grid_features: int = 2,
        base_resolution: int = 16,
        growth: float = 2.0,
        key_size: int = 48,
        steps: int = 4,
        blocks: int = 1,
        fixed_point: bool = False,
        max_steps: int = 30,
        rho: float = 0.9,
        key: PRNGKeyArray,
    ):
        check_alphabet(alphabet)
        if context < 0 or key_size < 0 or steps < 1:
            raise ValueError(
                f"AtlasMaster(context={context}, key_size={key_size}, steps={steps}): need "
                "context >= 0, key_size >= 0 and steps >= 1."
            )
        if blocks < 1 or width % blocks:
            raise ValueError(f"blocks={blocks} must be >= 1 and divide width={width}.")
        k = jr.split(key, 5)
        self.alphabet = bytes(alphabet)
        self.context = context
        self.key_size = key_size
        self.steps = steps
        self.blocks = blocks
        self.fixed_point = fixed_point
        self.max_steps = max_steps
        vocab = len(alphabet) + 2
        self.embed = jr.normal(k[0], (vocab, embed_dim)) * 0.5
        self.fourier = FourierFeatures(octaves)
        self.grid = HashGrid1D(
            grid_levels, table_size, grid_features, base_resolution, growth, key=k[1]
        )
        n_in = context * embed_dim + self.fourier.size + self.grid.size + key_size
        self.inject = eqx.nn.Linear(n_in, width, key=k[2])
        self.kernel = AtlasKernel(width, rho=rho, key=k[3])
        self.readout = eqx.nn.Linear(width, len(alphabet) + 1, key=k[4])

    @property
    def num_symbols(self) -> int:
        """Output symbols: the alphabet plus the escape symbol."""
        return len(self.alphabet) + 1

    @property
    def escape(self) -> int:
        return len(self.alphabet)

    @property
    def pad(self) -> int:
        return len(self.alphabet) + 1

    def injection(
        self, context: Int[Array, " context"], x: Scalar, key: Float[Array, " key_size"]
    ) -> Float[Array, " width"]:
        parts = [self.embed[context].reshape(-1), self.fourier(x), self.grid(x), key]
        return self.inject(jnp.concatenate([p.astype(jnp.float32) for p in parts]))

    def state(self, context, x, key) -> Float[Array, " width"]:
        u = self.injection(context, x, key)
        if self.fixed_point:
            return solve(self.kernel, u, max_steps=self.max_steps).value
        return iterate(self.kernel, u, self.steps, blocks=self.blocks)

    def __call__(
        self, context: Int[Array, " context"], x: Scalar, key: Float[Array, " key_size"]
    ) -> Float[Array, " symbols"]:
        """Logits over `num_symbols` for the symbol after `context` at coordinate `x`."""
        return self.readout(self.state(context, x, key))

    def iterates(self, context, x, key) -> Float[Array, "steps symbols"]:
        """The logits read out after each of the `steps` kernel iterations."""
        hs = iterate(
            self.kernel,
            self.injection(context, x, key),
            self.steps,
            blocks=self.blocks,
            record=True,
        )
        return jax.vmap(self.readout)(hs)


def with_iterations(
    master: AtlasMaster,
    steps: int | None = None,
    *,
    blocks: int | None = None,
    fixed_point: bool | None = None,
) -> AtlasMaster:
    """The same weights run with another number of steps, sparsity or fixed-point mode."""
    if steps is not None and steps < 1:
        raise ValueError(f"steps={steps} must be >= 1.")
    if blocks is not None and (blocks < 1 or master.kernel.width % blocks):
        raise ValueError(f"blocks={blocks} must be >= 1 and divide width={master.kernel.width}.")
    new = copy.copy(master)
    for name, value in (("steps", steps), ("blocks", blocks), ("fixed_point", fixed_point)):
        if value is not None:
            object.__setattr__(new, name, value)  # static fields of a frozen dataclass
    return new


def master_size(master: AtlasMaster) -> int:
    """Number of stored numbers in the master."""
    leaves = jax.tree_util.tree_leaves(eqx.filter(master, eqx.is_inexact_array))
    return int(sum(x.size for x in leaves))


def master_config(master: AtlasMaster) -> dict:
    """The constructor arguments (besides `key`) that rebuild `master`'s structure."""
    return dict(
        alphabet=master.alphabet.hex(),
        context=master.context,
        embed_dim=int(master.embed.shape[1]),
        width=master.kernel.width,
        octaves=master.fourier.octaves,
        grid_levels=int(master.grid.tables.shape[0]),
        table_size=int(master.grid.tables.shape[1]),
        grid_features=int(master.grid.tables.shape[2]),
        base_resolution=master.grid.base_resolution,
        growth=master.grid.growth,
        key_size=master.key_size,
        steps=master.steps,
        blocks=master.blocks,
        fixed_point=master.fixed_point,
        max_steps=master.max_steps,
        rho=master.kernel.rho,
    )


def build_master(config: dict, *, key: PRNGKeyArray | None = None) -> AtlasMaster:
    """`AtlasMaster` from `master_config`'s dict (alphabet as hex)."""
    cfg = dict(config)
    try:
        alphabet = bytes.fromhex(cfg.pop("alphabet"))
    except (KeyError, ValueError, TypeError) as e:
        raise ValueError(f"Master config needs the alphabet as a hex string: {e}") from e
    return AtlasMaster(alphabet, key=jr.PRNGKey(0) if key is None else key, **cfg)
