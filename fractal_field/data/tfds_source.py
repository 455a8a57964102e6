"""Loading through `tensorflow_datasets` (the path for users with internet access).

`tensorflow_datasets` is imported lazily. We first try `tfds.data_source` (array_record
files, no TensorFlow needed), then fall back to `tfds.load(..., batch_size=-1)`, which
needs TensorFlow. Data tfds has already prepared is used without a download; otherwise a
download is only tried when the download server is reachable, so an offline machine fails
at once (tfds itself retries for minutes).
"""

from __future__ import annotations

import os
import shutil
import socket
import urllib.parse
from pathlib import Path

import numpy as np

from .errors import DataNotFoundError
from .formats import Select, _check_selection


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except Exception as e:  # ImportError, or broken optional dependencies
        raise DataNotFoundError(
            f"tensorflow_datasets is not usable ({type(e).__name__}: {e}); "
            "`pip install tensorflow-datasets`."
        ) from e
    return tfds


def _from_data_source(tfds, name: str, split: str, data_dir, download: bool, select=None):
    source = tfds.data_source(
        name,
        split=split,
        data_dir=data_dir,
        download=download,
        builder_kwargs={"file_format": "array_record"},
    )
    wanted = (
        np.arange(len(source)) if select is None else _check_selection(select, len(source), name)
    )
    images, labels = [], []
    for start in range(0, len(wanted), 4096):
        keys = [int(k) for k in wanted[start : start + 4096]]
        records = source.__getitems__(keys) if hasattr(source, "__getitems__") else None
        if records is None:
            records = [source[k] for k in keys]
        images.extend(np.asarray(r["image"], np.uint8) for r in records)
        labels.extend(int(r["label"]) for r in records)
    names = tuple(source.dataset_info.features["label"].names)
    return np.stack(images), np.asarray(labels, np.int32), names


def _from_tf_load(tfds, name: str, split: str, data_dir, download: bool, select=None):
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
    if select is not None:  # the whole split is read (batch_size=-1), then cut
        keep = _check_selection(select, len(labels), name)
        images, labels = images[keep], labels[keep]
    return np.asarray(images, np.uint8), np.asarray(labels, np.int32), names


# Where tfds downloads each dataset from (a reachability probe before a download).
_DOWNLOAD_HOSTS = {"mnist": "storage.googleapis.com", "cifar10": "www.cs.toronto.edu"}


def _unreachable(name: str, timeout: float = 3.0) -> str | None:
    """`None` if `name`'s download server (or the HTTPS proxy) accepts a connection, else why."""
    proxy = os.environ.get("https_proxy") or os.environ.get("HTTPS_PROXY")
    if proxy:
        url = urllib.parse.urlsplit(proxy if "://" in proxy else f"http://{proxy}")
        host, port = url.hostname or "", url.port or 80
    else:
        host, port = _DOWNLOAD_HOSTS.get(name, "storage.googleapis.com"), 443
    try:
        socket.create_connection((host, port), timeout=timeout).close()
    except OSError as e:
        return f"cannot reach {host}:{port} ({type(e).__name__}: {e})"
    return None


def _tfds_root(data_dir) -> Path:
    return Path(data_dir or os.environ.get("TFDS_DATA_DIR") or "~/tensorflow_datasets").expanduser()


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str | os.PathLike | None = None,
    download: bool = True,
    select: Select | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Load a TFDS image-classification dataset as `(uint8 NHWC, int32 labels, class names)`.

    `data_dir` is TFDS's own data directory (default `~/tensorflow_datasets` or
    `$TFDS_DATA_DIR`). `select` (`n -> increasing indices`) keeps those examples only (read
    one by one from array_record files). **Raises:** `DataNotFoundError` with both
    attempts' errors.
    """
    tfds = _import_tfds()
    errors = []
    # Already prepared data first (no network).
    attempts = [(_from_data_source, False)]
    if download:
        offline = _unreachable(name)
        if offline is None:
            attempts += [(_from_data_source, True), (_from_tf_load, True)]
        else:
            errors.append(f"no download: {offline}")
    else:
        attempts.append((_from_tf_load, False))
    root = _tfds_root(data_dir)
    existed = root.exists()
    for attempt, dl in attempts:
        try:
            images, labels, names = attempt(tfds, name, split, data_dir, dl, select)
        except Exception as e:  # reported below
            errors.append(f"{attempt.__name__}(download={dl}): {type(e).__name__}: {e}")
            continue
        if images.ndim == 3:
            images = images[..., None]
        return images, labels, names
    if not existed:
        shutil.rmtree(root, ignore_errors=True)  # what a failed download left behind
    raise DataNotFoundError(
        f"tensorflow_datasets could not load {name!r} split {split!r}:\n    "
        + "\n    ".join(errors)
    )
