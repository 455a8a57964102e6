"""Datasets for fractal-field: MNIST, CIFAR-10 and your own image folders.

```python
from fractal_field.data import load_dataset, augment

train = load_dataset("mnist", "train")            # local files first, then tfds
for images, labels in train.batches(128, seed=0, epoch=0):
    x = train.normalize(images)                    # float32 (B, C, H, W)
```

See [`load_dataset`][] for where data is looked for. `tensorflow_datasets` is imported
lazily, only when it is used.
"""

from __future__ import annotations

from .augment import augment
from .dataset import (
    CIFAR10_CLASSES,
    CIFAR10_MEAN,
    CIFAR10_STD,
    MNIST_CLASSES,
    MNIST_MEAN,
    MNIST_STD,
    ArrayDataset,
    epoch_permutation,
    find_local,
    load_dataset,
    normalize,
)
from .errors import DataFormatError, DataNotFoundError
from .formats import (
    decode_images,
    load_cifar10_binary,
    load_cifar10_pickle,
    load_image_folder,
    load_mnist_idx,
    read_idx,
)
from .paths import (
    CACHE_ENV_VAR,
    DATA_ENV_VAR,
    candidate_data_dirs,
    default_cache_dir,
    resolve_data_dir,
)
from .prefetch import prefetch
from .shards import ShardedDataset, load_sharded, process_shards, shard_indices
from .tfds_source import load_tfds

__all__ = [
    "CACHE_ENV_VAR",
    "CIFAR10_CLASSES",
    "CIFAR10_MEAN",
    "CIFAR10_STD",
    "DATA_ENV_VAR",
    "MNIST_CLASSES",
    "MNIST_MEAN",
    "MNIST_STD",
    "ArrayDataset",
    "ShardedDataset",
    "DataFormatError",
    "DataNotFoundError",
    "augment",
    "candidate_data_dirs",
    "decode_images",
    "default_cache_dir",
    "epoch_permutation",
    "find_local",
    "load_cifar10_binary",
    "load_cifar10_pickle",
    "load_dataset",
    "load_image_folder",
    "load_mnist_idx",
    "load_sharded",
    "load_tfds",
    "normalize",
    "process_shards",
    "prefetch",
    "read_idx",
    "resolve_data_dir",
    "shard_indices",
]
