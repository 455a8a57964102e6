"""fractal-field: deep-equilibrium fractal neural fields in JAX/Equinox."""
