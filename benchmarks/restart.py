"""Restart cost of `scripts/train.py` with and without JAX's persistent compilation cache.

A resumed (or re-launched) run pays for the Python start-up, data loading, model building and
the compilation of its training step before its first step. With `JAX_COMPILATION_CACHE_DIR`
set, the second launch reads the compiled step from disk. Each round: a fresh cache folder, a
"cold" launch (compiles, fills the cache), then a "warm" one (reads it); each launch trains one
step in a fresh workdir (`--stop-after-steps 1`) and exits. Prints a table; writes JSON.

    python benchmarks/restart.py --rounds 3 --data-dir ../shared/data
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(HERE))

from batch_solve import write_results  # noqa: E402


def launch(config: str, workdir: Path, cache: Path, data_dir: str | None) -> float:
    """Seconds for one `scripts/train.py` process that trains one step and exits."""
    cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config]
    cmd += ["--workdir", str(workdir), "--stop-after-steps", "1"]
    if data_dir:
        cmd += ["--data-dir", data_dir]
    env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache))
    t = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    seconds = time.perf_counter() - t
    if proc.returncode != 0 or "done: epoch 0 step 1" not in proc.stdout:
        raise RuntimeError(f"{' '.join(cmd)} failed:\n{proc.stdout[-2000:]}{proc.stderr[-2000:]}")
    return seconds


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--configs", default="configs/mnist_nano.py:cpu_hour,configs/cifar10_small.py")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--out", default=str(HERE / "results" / "restart.json"))
    args = p.parse_args(argv)

    rows = []
    for config in args.configs.split(","):
        times: dict[str, list[float]] = {"cold": [], "warm": []}
        for r in range(args.rounds):
            with tempfile.TemporaryDirectory(prefix="ff-restart-") as tmp:
                for mode in ("cold", "warm"):  # same cache folder: cold fills it, warm reads it
                    workdir = Path(tmp) / f"run_{mode}"
                    times[mode].append(launch(config, workdir, Path(tmp) / "cache", args.data_dir))
            print(
                f"{config} round {r}: cold {times['cold'][-1]:.1f} s, "
                f"warm {times['warm'][-1]:.1f} s"
            )
        cold, warm = statistics.median(times["cold"]), statistics.median(times["warm"])
        rows.append(
            dict(
                config=config,
                cold_s=round(cold, 2),
                warm_s=round(warm, 2),
                saved_s=round(cold - warm, 2),
                ratio=round(cold / warm, 2),
                times_s={k: [round(t, 2) for t in v] for k, v in times.items()},
            )
        )

    write_results(
        args.out,
        cpu_count=os.cpu_count(),
        note="wall seconds of one `scripts/train.py ... --stop-after-steps 1` process in a fresh "
        "workdir (start-up, data, model, compilation, one step, checkpoint); medians over rounds; "
        "each round a fresh cache, cold launch then warm launch",
        rows=rows,
    )
    print(
        "\n| config | cold start s | with the cache s | saved s | ratio |\n"
        "|---|---:|---:|---:|---:|"
    )
    for r in rows:
        print(
            f"| {r['config']} | {r['cold_s']:.1f} | {r['warm_s']:.1f} | {r['saved_s']:.1f} | "
            f"{r['ratio']:.2f}x |"
        )


if __name__ == "__main__":
    main()
