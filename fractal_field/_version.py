"""The package version, defined once (read by `pyproject.toml` and `fractal_field.__version__`)."""

__version__ = "0.1.0"
