"""Loading through `tensorflow_datasets` (the path for users with internet access).

`tensorflow_datasets` is imported lazily. We first try `tfds.data_source` (array_record
files, no TensorFlow needed), then fall back to `tfds.load(..., batch_size=-1)`, which
needs TensorFlow.
"""

from __future__ import annotations

import os

import numpy as np

from .errors import DataNotFoundError


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or broken optional dependencies
        raise DataNotFoundError(
            f"tensorflow_datasets is not usable ({type(e).__name__}: {e}); "
            "`pip install tensorflow-datasets`."
        ) from e
    return tfds


def _from_data_source(tfds, name: str, split: str, data_dir, download: bool):
    source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )
    n = len(source)
    images, labels = [], []
    for start in range(0, n, 4096):
        keys = list(range(start, min(start + 4096, n)))
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else None
        if records is None:
            records = [source[k] for k in keys]
        images.extend(np.asarray(r["image"], np.uint8) for r in records)
        labels.extend(int(r["label"]) for r in records)
    names = tuple(source.dataset_info.features["label"].names)
    return np.stack(images), np.asarray(labels, np.int32), names


def _from_tf_load(tfds, name: str, split: str, data_dir, download: bool):
    ds, info = tfds.load(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        batch_size=-1,
        as_supervised=True,
        with_info=True,
    )
    images, labels = tfds.as_numpy(ds)
    names = tuple(info.features["label"].names)
    return np.asarray(images, np.uint8), np.asarray(labels, np.int32), names


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Load a TFDS image-classification dataset as `(uint8 NHWC, int32 labels, class names)`.

    `data_dir` is TFDS's own data directory (default `~/tensorflow_datasets` or
    `$TFDS_DATA_DIR`). **Raises:** `DataNotFoundError` with both attempts' errors.
    """
    tfds = _import_tfds()
    errors = []
    for attempt in (_from_data_source, _from_tf_load):
        try:
            images, labels, names = attempt(tfds, name, split, data_dir, download)
        except Exception as e:  # reported below
            errors.append(f"{attempt.__name__}: {type(e).__name__}: {e}")
            continue
        if images.ndim == 3:
            images = images[..., None]
        return images, labels, names
    raise DataNotFoundError(
        f"tensorflow_datasets could not load {name!r} split {split!r}:\n    "
        + "\n    ".join(errors)
    )
