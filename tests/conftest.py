"""Settings for the whole test run.

The suite compiles hundreds of small XLA programs and runs each a few times, so on a CPU its
time is mostly LLVM's optimisation of code that hardly runs. `--xla_backend_optimization_level=0`
skips that (about half the CPU time of `tests/test_cell.py` on a 2-core CPU); it changes how
fast compiled code runs, not what it computes. Set here, before JAX starts its backend, and
inherited by the subprocesses the tests launch. An `XLA_FLAGS` that already names the option
is left as it is.
"""

import os

_FLAG = "--xla_backend_optimization_level"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {_FLAG}=0".strip()
