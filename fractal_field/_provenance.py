"""Where a result came from: the date, the command, the hardware and the library versions."""

from __future__ import annotations

import datetime
import os
import platform
import sys

import equinox as eqx
import jax


def hardware() -> str:
    """`"2-core CPU"`-style name of the machine's first JAX device (the GPU's name on a GPU)."""
    device = jax.devices()[0]
    if device.platform == "cpu":
        return f"{os.cpu_count()}-core CPU"
    return str(device.device_kind)


def provenance(script: str, argv: list[str] | None = None) -> dict:
    """The fields every results file starts with, for `python script *argv`."""
    given = sys.argv[1:] if argv is None else argv
    return dict(
        date=datetime.date.today().isoformat(),
        command=" ".join(["python", script, *given]),
        hardware=hardware(),
        platform=platform.platform(),
        jax=jax.__version__,
        equinox=eqx.__version__,
    )
