"""In-memory datasets: [`load_dataset`][], [`ArrayDataset`][] and [`normalize`][].

Layout conventions:

- stored images are `uint8 (N, H, W, C)` on the host (compact, what every format decodes to);
- the **model input is channels-first `float32 (N, C, H, W)`**, produced on device by
  [`normalize`][]: `(x / 255 - mean) / std` per channel, then `NHWC -> NCHW`.

Typical training loop:

```python
train = load_dataset("cifar10", "train")
for images, labels in train.batches(128, seed=0, epoch=epoch, start_batch=resume_step):
    x = train.normalize(images)              # float32 (B, 3, 32, 32) on device
    x = augment(key, x)                     # random crop (pad 4) + flip, jit-able
```
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Literal

import numpy as np

from . import formats
from .errors import DataFormatError, DataNotFoundError
from .formats import Select, _check_selection
from .paths import HOW_TO_PROVIDE, candidate_data_dirs
from .tfds_source import load_tfds

MNIST_MEAN = (0.1307,)
MNIST_STD = (0.3081,)
MNIST_CLASSES = tuple(str(i) for i in range(10))
CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)
DEFAULT_MEAN_STD = 0.5  # for user image folders: maps [0, 1] to [-1, 1]

DatasetName = Literal["mnist", "cifar10", "folder"]
Source = Literal["auto", "local", "tfds"]


def normalize(images, mean: Sequence[float], std: Sequence[float], *, channels_first: bool = True):
    """`uint8 (..., H, W, C)` -> `float32` `(x / 255 - mean) / std`, as a JAX array.

    With `channels_first=True` (the model's layout) the result is `(..., C, H, W)`.
    Works on numpy or JAX arrays and inside `jax.jit`.
    """
    import jax.numpy as jnp

    x = jnp.asarray(images).astype(jnp.float32) / 255.0
    x = (x - jnp.asarray(mean, jnp.float32)) / jnp.asarray(std, jnp.float32)
    return jnp.moveaxis(x, -1, -3) if channels_first else x


def epoch_permutation(n: int, seed: int, epoch: int) -> np.ndarray:
    """The example order of an epoch: a deterministic function of `(seed, epoch)`."""
    return np.random.default_rng([seed, epoch]).permutation(n)


@dataclasses.dataclass(frozen=True, eq=False)
class ArrayDataset:
    """A labelled image dataset held in host memory.

    **Fields:**

    - `images`: `uint8 (N, H, W, C)`.
    - `labels`: `int32 (N,)`, in `[0, num_classes)`.
    - `class_names`: class names in label order.
    - `mean`, `std`: per-channel normalisation constants on the `[0, 1]` scale.
    - `name`, `split`, `origin`: descriptive (`origin` is the file, folder or `"tfds"`).
    """

    images: np.ndarray
    labels: np.ndarray
    class_names: tuple[str, ...]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    name: str = ""
    split: str = ""
    origin: str = ""

    def __post_init__(self):
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(
                f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}."
            )
        if self.labels.dtype != np.int32 or self.labels.shape != self.images.shape[:1]:
            raise ValueError(
                f"labels must be int32 (N,), got {self.labels.dtype} "
                f"{self.labels.shape} for {len(self.images)} images."
            )
        channels = self.images.shape[-1]
        if len(self.mean) != channels or len(self.std) != channels:
            raise ValueError(f"mean/std need {channels} entries, got {self.mean}, {self.std}.")
        if len(self.labels) and (self.labels.min() < 0 or self.labels.max() >= self.num_classes):
            raise ValueError(f"labels outside [0, {self.num_classes}) in {self.origin}.")

    def __len__(self) -> int:
        return len(self.labels)

    def __repr__(self) -> str:
        return (
            f"ArrayDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, "
            f"image_shape={self.image_shape}, num_classes={self.num_classes}, "
            f"origin={self.origin!r})"
        )

    @property
    def num_classes(self) -> int:
        return len(self.class_names)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """Shape `(C, H, W)` of one *model input* (after [`normalize`][]).

        The stored uint8 images are `images.shape[1:] == (H, W, C)`.
        """
        h, w, c = self.images.shape[1:]
        return c, h, w

    def normalize(self, images, *, channels_first: bool = True):
        """[`normalize`][] with this dataset's mean and std."""
        return normalize(images, self.mean, self.std, channels_first=channels_first)

    def num_batches(self, batch_size: int, *, drop_last: bool = True) -> int:
        """Number of batches per epoch."""
        return len(self) // batch_size if drop_last else -(-len(self) // batch_size)

    def batches(
        self,
        batch_size: int,
        *,
        seed: int,
        epoch: int,
        shuffle: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Yield `(uint8 (B, H, W, C), int32 (B,))` numpy batches of one epoch.

        The order is a deterministic function of `(seed, epoch)` (see
        [`epoch_permutation`][]), so a resumed run passes `start_batch` to skip the batches
        it already consumed and continues with exactly the same batches.
        """
        if batch_size <= 0:
            raise ValueError(f"batch_size must be positive, got {batch_size}.")
        order = epoch_permutation(len(self), seed, epoch) if shuffle else np.arange(len(self))
        for b in range(start_batch, self.num_batches(batch_size, drop_last=drop_last)):
            idx = order[b * batch_size : (b + 1) * batch_size]
            yield self.images[idx], self.labels[idx]

    def subset_of(self, select: Select) -> ArrayDataset:
        """The examples `select(len(self))` (increasing indices)."""
        idx = _check_selection(select, len(self), self.origin or self.name or "dataset")
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])

    def subset(self, n: int, *, seed: int | None = None) -> ArrayDataset:
        """The first `n` examples (or `n` random ones if `seed` is given), e.g. for smoke tests."""
        if seed is None:
            idx = np.arange(min(n, len(self)))
        else:
            idx = np.sort(np.random.default_rng(seed).permutation(len(self))[:n])
        return dataclasses.replace(self, images=self.images[idx], labels=self.labels[idx])


# ----------------------------------------------------------------------------------------------
# Local file discovery

Loaded = tuple[np.ndarray, np.ndarray, tuple[str, ...]]
# (description, loader); the loader takes a selection (or None for the whole split).
Found = tuple[str, Callable[[Select | None], Loaded]]


def _rows(load: Callable[[], Loaded], where: str) -> Callable[[Select | None], Loaded]:
    """A loader for formats that hold raw pixels: read the split, keep the selected rows."""

    def loader(select: Select | None) -> Loaded:
        images, labels, names = load()
        if select is not None:
            keep = _check_selection(select, len(labels), where)
            images, labels = images[keep], labels[keep]
        return images, labels, names

    return loader


def _find_mnist(base: Path, split: str, looked: list[str]) -> Found | None:
    prefix = {"train": "train", "test": "t10k"}[split]
    for sub in ("mnist", "MNIST/raw", "MNIST", ""):
        d = base / sub if sub else base
        looked.append(f"{d}/{prefix}-images-idx3-ubyte[.gz] (+ labels-idx1)")
        if not d.is_dir():
            continue
        for sep in ("-", "."):
            for ext in (".gz", ""):
                images = d / f"{prefix}-images{sep}idx3-ubyte{ext}"
                labels = [d / f"{prefix}-labels{sep}idx1-ubyte{e}" for e in (".gz", "")]
                labels = [p for p in labels if p.is_file()]
                if images.is_file() and labels:
                    lab = labels[0]
                    return str(images), lambda select, i=images, la=lab: (
                        *formats.load_mnist_idx(i, la, select=select),
                        MNIST_CLASSES,
                    )
    return None


def _find_cifar10(base: Path, split: str, looked: list[str]) -> Found | None:
    batches = formats.cifar10_batch_names(split)
    for sub in ("cifar10", "cifar-10", "CIFAR10", ""):
        d = base / sub if sub else base
        looked.append(
            f"{d}/[cifar-10-batches-bin/]{batches[0]}.bin, [cifar-10-batches-py/]{batches[0]}, "
            f"cifar-10-{{binary,python}}.tar.gz, {split}/<class>/*.jpg|png, *.tar.gz of those"
        )
        if not d.is_dir():
            continue
        for folder in (d / "cifar-10-batches-bin", d):
            paths = [folder / f"{b}.bin" for b in batches]
            if all(p.is_file() for p in paths):
                return str(folder), _rows(
                    lambda p=paths: (*formats.load_cifar10_binary(p), CIFAR10_CLASSES), str(folder)
                )
        for folder in (d / "cifar-10-batches-py", d):
            paths = [folder / b for b in batches]
            if all(p.is_file() for p in paths):
                return str(folder), _rows(
                    lambda p=paths: (*formats.load_cifar10_pickle(p), CIFAR10_CLASSES), str(folder)
                )
        for archive, parse, suffix in (
            (d / "cifar-10-binary.tar.gz", formats.parse_cifar10_binary, ".bin"),
            (d / "cifar-10-python.tar.gz", formats.parse_cifar10_pickle, ""),
        ):
            if archive.is_file():
                return str(archive), _rows(
                    lambda a=archive, f=parse, s=suffix: _cifar_archive(
                        a, f, [b + s for b in batches]
                    ),
                    str(archive),
                )
        roots = [d] + sorted(c for c in d.iterdir() if c.is_dir())
        for root in roots:
            if (root / split / CIFAR10_CLASSES[0]).is_dir():
                return str(root), lambda select, r=root: formats.load_image_folder(
                    r, split, classes=CIFAR10_CLASSES, select=select
                )
        archives = sorted(p for p in d.iterdir() if p.is_file() and formats.is_archive(p))
        if not sub:  # in the data dir itself, only archives that say they are CIFAR-10
            archives = [p for p in archives if "cifar10" in p.name.lower().replace("-", "")]
        if archives:
            return str(archives[0]), lambda select, a=archives[0]: formats.load_image_folder(
                a, split, classes=CIFAR10_CLASSES, select=select
            )
    return None


def _cifar_archive(archive: Path, parse, members: list[str]) -> Loaded:
    blobs = formats.read_archive_members(archive, members)
    parts = [parse(blobs[m], f"{archive}:{m}") for m in members]
    images = np.concatenate([p[0] for p in parts])
    return images, np.concatenate([p[1] for p in parts]), CIFAR10_CLASSES


_FINDERS = {"mnist": _find_mnist, "cifar10": _find_cifar10}
_STATS = {"mnist": (MNIST_MEAN, MNIST_STD), "cifar10": (CIFAR10_MEAN, CIFAR10_STD)}
_SHAPES = {"mnist": (28, 28, 1), "cifar10": (32, 32, 3)}


def find_local(
    name: Literal["mnist", "cifar10"], split: str, data_dir: str | os.PathLike | None = None
) -> tuple[Found | None, list[str]]:
    """Search the data directories for local files; returns `(found or None, places looked)`."""
    looked: list[str] = []
    for base, why in candidate_data_dirs(data_dir):
        if not base.is_dir():
            looked.append(f"{base.resolve()} ({why}): does not exist")
            continue
        found = _FINDERS[name](base.resolve(), split, looked)
        if found is not None:
            return found, looked
    return None, looked


def load_dataset(
    name: DatasetName,
    split: str = "train",
    *,
    data_dir: str | os.PathLike | None = None,
    source: Source = "auto",
    classes: Sequence[str] | None = None,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    mean: Sequence[float] | None = None,
    std: Sequence[float] | None = None,
    cache: bool = True,
    cache_dir: str | os.PathLike | None = None,
    tfds_data_dir: str | os.PathLike | None = None,
    select: Select | None = None,
) -> ArrayDataset:
    """Load a dataset split into an [`ArrayDataset`][].

    **Arguments:**

    - `name`: `"mnist"`, `"cifar10"`, or `"folder"` (your own images: `data_dir` is then the
      root `<root>/<split>/<class>/*.{png,jpg,jpeg}`, a directory or a `.tar.gz` of one).
    - `split`: `"train"` or `"test"` (any folder name for `"folder"`).
    - `data_dir`: where to look; default: see [`candidate_data_dirs`][].
    - `source`: `"local"` (files only), `"tfds"` (`tensorflow_datasets`), or `"auto"` (local
      files first, then tfds; with an explicit `data_dir`, that directory only: no download).
    - `classes`, `channels`, `image_size`, `cache`, `cache_dir`: for image folders, see
      [`load_image_folder`][].
    - `mean`, `std`: override the normalisation constants (default: the dataset's own; 0.5
      per channel for `"folder"`).
    - `tfds_data_dir`: TFDS's data directory.
    - `select`: `n -> increasing indices` into the split's `n` examples (in the order the
      whole split loads): load only those (image folders and archives decode only those;
      e.g. one process's shard, [`shard_indices`][]).

    **Raises:** `DataNotFoundError` listing every place looked and how to provide the data.
    """
    if name == "folder":
        if data_dir is None:
            raise ValueError('load_dataset("folder", ...) needs data_dir=<root or archive>.')
        images, labels, names = formats.load_image_folder(
            data_dir,
            split,
            classes=classes,
            channels=channels,
            image_size=image_size,
            cache=cache,
            cache_dir=cache_dir,
            select=select,
        )
        c = images.shape[-1]
        return ArrayDataset(
            images,
            labels,
            names,
            tuple(mean or (DEFAULT_MEAN_STD,) * c),
            tuple(std or (DEFAULT_MEAN_STD,) * c),
            name,
            split,
            str(data_dir),
        )
    if name not in _FINDERS:
        raise ValueError(f"Unknown dataset {name!r}; expected 'mnist', 'cifar10' or 'folder'.")
    if split not in ("train", "test"):
        raise ValueError(f"Unknown split {split!r} for {name}; expected 'train' or 'test'.")
    if source not in ("auto", "local", "tfds"):
        raise ValueError(f"Unknown source {source!r}; expected 'auto', 'local' or 'tfds'.")

    looked: list[str] = []
    loaded: Loaded | None = None
    origin = "tfds"
    if source in ("auto", "local"):
        found, looked = find_local(name, split, data_dir)
        if found is not None:
            origin, loader = found
            loaded = loader(select)
        elif data_dir is not None:
            # A directory the user named is the only place looked: no download fallback.
            d = Path(data_dir).expanduser()
            if not d.is_dir():
                what = "does not exist" if not d.exists() else "is not a directory"
                raise DataNotFoundError(f"The data directory {d} {what}.\n{HOW_TO_PROVIDE}")
            places = "\n".join(f"  - {p}" for p in looked)
            raise DataNotFoundError(
                f"The data directory {d} holds no {name} '{split}' data. Looked for:\n"
                f"{places}\n{HOW_TO_PROVIDE}"
            )
    if loaded is None and source in ("auto", "tfds"):
        try:
            loaded = load_tfds(name, split, data_dir=tfds_data_dir, select=select)
        except DataNotFoundError as e:
            looked.append(f"tensorflow_datasets: {e}")
    if loaded is None:
        places = "\n".join(f"  - {p}" for p in looked)
        raise DataNotFoundError(
            f"Could not find {name} '{split}' data (source={source!r}). Looked in:\n{places}\n"
            f"{HOW_TO_PROVIDE}"
        )
    images, labels, names = loaded
    if images.shape[1:] != _SHAPES[name]:
        raise DataFormatError(
            f"{origin}: {name} images should be {_SHAPES[name]}, got {images.shape[1:]}."
        )
    default_mean, default_std = _STATS[name]
    return ArrayDataset(
        images,
        labels,
        tuple(names),
        tuple(mean or default_mean),
        tuple(std or default_std),
        name,
        split,
        origin,
    )
