"""`python -m fractal_field [--version]`: the version, and where to start."""

from __future__ import annotations

import argparse

from ._version import __version__


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m fractal_field",
        description="fractal-field: deep-equilibrium fractal neural fields in JAX/Equinox.",
        epilog="Train: python scripts/train.py --config configs/mnist_nano.py --workdir DIR",
    )
    parser.add_argument("--version", action="version", version=f"fractal-field {__version__}")
    parser.parse_args(argv)
    parser.print_help()


if __name__ == "__main__":
    main()
