"""Evaluate a trained checkpoint: accuracy, solver steps/residual, confusion matrix.

python scripts/evaluate.py --checkpoint checkpoints/mnist_nano.eqx [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import json

import numpy as np

import fractal_field as ff
from fractal_field.data import DataFormatError, load_dataset


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a .eqx checkpoint or a workdir")
    parser.add_argument("--data-dir", default=None, help="data directory (or $FRACTAL_FIELD_DATA)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=0, help="evaluate the first N examples")
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument(
        "--no-progress", action="store_true", help="no progress bar (on stderr) while evaluating"
    )
    args = parser.parse_args(argv)

    try:
        model, meta = ff.load_model(args.checkpoint, with_meta=True)
        data = meta["config"]["data"]
        name = data["name"]
        ds = load_dataset(name, args.split, data_dir=args.data_dir or data.get("data_dir"))
    except (FileNotFoundError, DataFormatError, ff.CheckpointError) as e:
        # A missing or corrupt checkpoint, no data: the message says it all.
        raise SystemExit(f"error: {e}") from None
    if args.limit:
        ds = ds.subset(args.limit)
    print(
        f"Evaluating {args.checkpoint} ({ff.count_params(model):,} real parameters) on "
        f"{len(ds)} {name} {args.split} images from {ds.origin}",
        flush=True,
    )
    res = ff.evaluate(model, ds, batch_size=args.batch_size, progress=not args.no_progress)
    print(f"{name} {args.split}: accuracy {res['accuracy']:.4f} on {res['n']} images")
    print(
        f"forward solver: mean steps {res['mean_steps']:.2f}, mean relative residual "
        f"{res['mean_residual']:.2e}, not converged {res['failed']}"
    )
    print("confusion matrix (rows: true, columns: predicted):")
    conf = np.array(res["confusion"])
    print("      " + " ".join(f"{c[:5]:>5}" for c in ds.class_names))
    for name_, row in zip(ds.class_names, conf, strict=True):
        print(f"{name_[:5]:>5} " + " ".join(f"{v:5d}" for v in row))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(res, checkpoint=str(args.checkpoint)), f, indent=2)


if __name__ == "__main__":
    main()
