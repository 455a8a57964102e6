"""Memory and load time of one process's data when each process loads only its shards.

For `P` processes and `data.shards=S`, process 0 loads shards `0 .. S/P - 1` of the training
split through `ff.data.load_sharded` (what `ff.train` does with `data.shards=S`), in a fresh
Python process; `P = 1` is the whole split, and `plain` the whole split without selection
(`load_dataset`). "cold": an empty decoded-array cache (image folders are decoded), "warm":
a second load with the cache the cold one wrote. Peak resident memory (`ru_maxrss`) is that
of the whole process; `import` is a process that imports the package and loads nothing.

    python benchmarks/sharded_loading.py --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

CHILD = r"""
import functools, json, resource, sys, time
import numpy as np
from fractal_field.data import load_dataset, load_sharded, process_shards
name, split, data_dir, shards, procs = sys.argv[1:]
shards, procs = int(shards), int(procs)
t = time.perf_counter()
held = nbytes = 0
if procs >= 0:
    load = functools.partial(load_dataset, name, split, data_dir=data_dir, source="local")
    if procs == 0:
        ds = load()
        images = ds.images
    else:
        first, count = process_shards(shards, 0, procs)
        ds = load_sharded(load, num_shards=shards, first=first, count=count)
        images = ds.data.images
    held, nbytes = len(images), images.nbytes
seconds = time.perf_counter() - t
rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
print(json.dumps(dict(seconds=seconds, held=held, mb=nbytes / 2**20, peak_rss_mb=rss)))
"""


def _child(args: list[str], cache: Path) -> dict:
    env = dict(os.environ, FRACTAL_FIELD_CACHE=str(cache), JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, *args], cwd=ROOT, env=env, capture_output=True, text=True
    )
    if proc.returncode:
        raise RuntimeError(proc.stderr[-3000:])
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data-dir", required=True)
    p.add_argument("--datasets", default="cifar10,mnist")
    p.add_argument("--shards", type=int, default=4)
    p.add_argument("--processes", default="1,2,4")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--out", default=str(HERE / "results" / "sharded_loading.json"))
    args = p.parse_args(argv)
    from fractal_field.data import CACHE_ENV_VAR

    assert CACHE_ENV_VAR == "FRACTAL_FIELD_CACHE", CACHE_ENV_VAR
    cases = [("import", -1), ("plain", 0)] + [
        (f"{n} processes", int(n)) for n in args.processes.split(",")
    ]
    rows = []
    for name in args.datasets.split(","):
        runs: dict[str, dict[str, list[dict]]] = {c: {"cold": [], "warm": []} for c, _ in cases}
        for _ in range(args.rounds):  # round-robin: the machine's load spreads over all cases
            for case, procs in cases:
                with tempfile.TemporaryDirectory(prefix="ff-shards-") as tmp:
                    for mode in ("cold", "warm"):  # the warm load reads what the cold one wrote
                        a = [name, "train", args.data_dir, str(args.shards), str(procs)]
                        runs[case][mode].append(_child(a, Path(tmp)))
        for case, _ in cases:
            for mode in ("cold", "warm"):
                rs = runs[case][mode]
                row = dict(
                    dataset=name,
                    case=case,
                    mode=mode,
                    held=rs[0]["held"],
                    array_mb=round(rs[0]["mb"], 1),
                    seconds_median=round(statistics.median(r["seconds"] for r in rs), 3),
                    peak_rss_mb_median=round(statistics.median(r["peak_rss_mb"] for r in rs), 1),
                    rounds=len(rs),
                )
                rows.append(row)
                print(json.dumps(row), flush=True)
    out = dict(
        what="One process's training data with data.shards: load time and peak memory",
        date=datetime.date.today().isoformat(),
        command="python benchmarks/sharded_loading.py " + " ".join(argv or sys.argv[1:]),
        hardware=f"{os.cpu_count()}-core CPU",
        platform=platform.platform(),
        shards=args.shards,
        rows=rows,
    )
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
