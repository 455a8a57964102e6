"""Shared by the benchmarks that train with `scripts/train.py` and record each run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence

import fractal_field as ff
from fractal_field._provenance import provenance

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def train_runs(
    runs: Sequence[Sequence[str]],
    summarise: Callable[[str, str], dict],
    *,
    data_dir: str,
    prefix: Sequence[str] = ("nice", "-n", "10"),
    train: Callable[[str], bool] = lambda name: True,
    check: bool = True,
) -> list[dict]:
    """For each `(name, config spec, workdir)` plus its overrides (`(name, spec, workdir,
    *overrides)`): train it from the repository root under `prefix` (its output in
    `<workdir>.log`) where `train(name)`, then `summarise(name, workdir)` with the command."""
    rows = []
    for name, spec, workdir, *overrides in runs:
        cmd = [sys.executable, "scripts/train.py", "--config", spec, "--workdir", workdir]
        cmd += ["--data-dir", data_dir, *overrides]
        if train(name):
            start = time.time()
            os.makedirs(os.path.dirname(os.path.join(ROOT, workdir)), exist_ok=True)
            with open(os.path.join(ROOT, workdir + ".log"), "w") as log:
                subprocess.run(
                    [*prefix, *cmd], cwd=ROOT, check=check, stdout=log, stderr=subprocess.STDOUT
                )
            print(f"{name}: {time.time() - start:.0f}s", flush=True)
        row = summarise(name, workdir)
        row["command"] = " ".join(["python", *cmd[1:]])
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


def run_meta(script: str, argv: Sequence[str] | None, **extra) -> dict:
    """Where the runs came from (`ff`'s provenance: date, command, hardware, versions), the
    load average at the end (the runs share the machine) and `extra`."""
    meta = provenance(script, None if argv is None else list(argv))
    meta["hardware"] += " (shared with other jobs)"
    meta.update(
        fractal_field=ff.__version__,
        python=sys.version.split()[0],
        load_average=[round(x, 2) for x in os.getloadavg()],
    )
    meta.update(extra)
    return meta


def write_runs(out_dir: str, filename: str, meta: dict, runs: list[dict]) -> str:
    """`{"meta": meta, "runs": runs}` as `out_dir/filename`; returns the path."""
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, filename)
    with open(path, "w") as fh:
        json.dump(dict(meta=meta, runs=runs), fh, indent=1)
    print(f"wrote {path}")
    return path
