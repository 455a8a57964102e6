"""Train several configs side by side on this machine, under one time limit.

    python scripts/sweep.py --workdir runs/sweep --time-limit 540 \\
        single=configs/cifar10_small.py expanded=configs/cifar10_small.py:expanded \\
        "gamma2=configs/cifar10_small.py model.gamma=2.0" --all epochs=40

Each run is `scripts/train.py --config SPEC --workdir WORKDIR/NAME [its overrides] [--all
overrides]` in its own process. Accelerator memory is allocated on demand (no preallocation),
so the runs share one GPU. At the time limit every run gets SIGTERM, saves a checkpoint and
stops; the same command later resumes them all. Then prints each run's per-epoch test
accuracy and writes `WORKDIR/summary.json` (`ff.run_summary` of each run).
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import fractal_field as ff  # noqa: E402


def parse_runs(specs: list[str]) -> dict[str, list[str]]:
    """`NAME=CONFIG[:variant] [overrides...]` -> {NAME: [CONFIG, overrides...]}."""
    runs = {}
    for spec in specs:
        name, sep, rest = spec.partition("=")
        words = shlex.split(rest)
        if not sep or not name or not words or not name.replace("_", "").replace("-", "").isalnum():
            raise SystemExit(f"Bad run {spec!r}: expected NAME=CONFIG[:variant] [overrides...].")
        if name in runs:
            raise SystemExit(f"Run name {name!r} given twice.")
        runs[name] = words
    return runs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", help='"NAME=CONFIG[:variant] [overrides...]"')
    p.add_argument("--workdir", required=True, help="each run goes to WORKDIR/NAME")
    p.add_argument("--time-limit", type=float, default=None, help="seconds; then stop all")
    p.add_argument("--data-dir", default=None, help="data directory (or $FRACTAL_FIELD_DATA)")
    p.add_argument("--all", nargs="*", default=[], help="overrides applied to every run")
    args = p.parse_args(argv)
    runs = parse_runs(args.runs)
    workdir = Path(args.workdir)
    workdir.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, XLA_PYTHON_CLIENT_PREALLOCATE="false", PYTHONUNBUFFERED="1")
    procs = {}
    for name, (config, *overrides) in runs.items():
        cmd = [sys.executable, str(ROOT / "scripts" / "train.py"), "--config", config]
        cmd += ["--workdir", str(workdir / name)]
        if args.data_dir:
            cmd += ["--data-dir", args.data_dir]
        cmd += overrides + args.all
        log = open(workdir / f"{name}.log", "a")  # noqa: SIM115
        print(f"[{name}] {shlex.join(cmd)}", flush=True)
        procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env), log)
    deadline = None if args.time_limit is None else time.monotonic() + args.time_limit
    interrupted = False
    try:
        while any(proc.poll() is None for proc, _ in procs.values()):
            if deadline is not None and time.monotonic() > deadline:
                print("time limit reached: stopping every run (they checkpoint first)", flush=True)
                break
            time.sleep(1)
    except KeyboardInterrupt:
        # The runs got the Ctrl-C too (same process group) and stop after checkpointing.
        print("interrupted: stopping every run (they checkpoint first)", flush=True)
        interrupted = True
    finally:
        for proc, _ in procs.values():
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for proc, log in procs.values():
            proc.wait()
            log.close()
    # 130: a run stopped by Ctrl-C (it saved a checkpoint), not a failure.
    failed = {n: p.returncode for n, (p, _) in procs.items() if p.returncode not in (0, 130)}
    summary = {}
    for name in runs:
        try:
            summary[name] = ff.run_summary(workdir / name)
        except FileNotFoundError as e:
            summary[name] = dict(error=str(e))
    (workdir / "summary.json").write_text(json.dumps(summary, indent=1) + "\n")
    for name, s in summary.items():
        if "error" in s:
            print(f"{name}: {s['error']} (see {workdir / name}.log)")
            continue
        accs = " ".join(f"{100 * e['accuracy']:.2f}%" for e in s["epochs"]) or "no evaluation yet"
        print(f"{name} ({s['params']:,} params): {accs}")
    for name, code in failed.items():
        print(f"{name} exited with code {code}; see {workdir / name}.log")
    print(f"wrote {workdir / 'summary.json'}")
    return 1 if failed else 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
