"""Tests for `fractal_field.data`: loaders on small files written here, plus real MNIST/CIFAR."""

from __future__ import annotations

import gzip
import pickle
import socket
import sys
import tarfile
import threading
import time
import types
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from fractal_field import data
from fractal_field.data import (
    CIFAR10_CLASSES,
    ArrayDataset,
    DataFormatError,
    DataNotFoundError,
    augment,
    dataset as dataset_module,
    load_dataset,
    tfds_source,
)

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO / ".." / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Never touch the user's cache or data directory from tests."""
    monkeypatch.setenv(data.CACHE_ENV_VAR, str(tmp_path / "cache"))
    monkeypatch.delenv(data.DATA_ENV_VAR, raising=False)


def _rng(seed=0):
    return np.random.default_rng(seed)


# ----------------------------------------------------------------------------------------------
# File writers


def write_idx(path: Path, array: np.ndarray, *, gz: bool) -> Path:
    header = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        int(d).to_bytes(4, "big") for d in array.shape
    )
    raw = header + array.astype(np.uint8).tobytes()
    path.write_bytes(gzip.compress(raw) if gz else raw)
    return path


def write_mnist(d: Path, split: str, n: int, *, gz: bool, seed=0):
    d.mkdir(parents=True, exist_ok=True)
    prefix = {"train": "train", "test": "t10k"}[split]
    ext = ".gz" if gz else ""
    images = _rng(seed).integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = _rng(seed + 1).integers(0, 10, n).astype(np.uint8)
    write_idx(d / f"{prefix}-images-idx3-ubyte{ext}", images, gz=gz)
    write_idx(d / f"{prefix}-labels-idx1-ubyte{ext}", labels, gz=gz)
    return images, labels


def cifar_arrays(n: int, seed: int):
    images = _rng(seed).integers(0, 256, (n, 32, 32, 3), dtype=np.uint8)
    labels = _rng(seed + 100).integers(0, 10, n).astype(np.int32)
    return images, labels


def cifar_binary_bytes(images, labels) -> bytes:
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return np.concatenate([labels[:, None].astype(np.uint8), chw], axis=1).tobytes()


def cifar_pickle_bytes(images, labels) -> bytes:
    chw = images.transpose(0, 3, 1, 2).reshape(len(images), -1)
    return pickle.dumps({b"data": chw, b"labels": labels.tolist(), b"batch_label": b"x"})


def write_cifar(d: Path, split: str, fmt: str, n: int = 3):
    """Write official batches; returns the concatenated arrays they hold."""
    d.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{i}" for i in range(1, 6)] if split == "train" else ["test_batch"]
    parts = []
    for i, name in enumerate(names):
        images, labels = cifar_arrays(n, seed=i)
        parts.append((images, labels))
        if fmt == "bin":
            (d / f"{name}.bin").write_bytes(cifar_binary_bytes(images, labels))
        else:
            (d / name).write_bytes(cifar_pickle_bytes(images, labels))
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def write_folder(root: Path, split: str, classes, n_per_class: int, *, ext: str, mode="RGB"):
    """`<root>/<split>/<class>/<i>.<ext>`; returns images/labels in load order (sorted)."""
    images, labels = [], []
    for label, cls in enumerate(sorted(classes)):
        (root / split / cls).mkdir(parents=True, exist_ok=True)
        for i in range(n_per_class):
            shape = (8, 6, 3) if mode == "RGB" else (8, 6)
            array = _rng(label * 100 + i).integers(0, 256, shape, dtype=np.uint8)
            Image.fromarray(array, mode).save(root / split / cls / f"{i:03d}.{ext}")
            images.append(array.reshape(8, 6, -1))
            labels.append(label)
    return np.stack(images), np.asarray(labels, np.int32)


# ----------------------------------------------------------------------------------------------
# MNIST / IDX


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_idx_roundtrip(tmp_path, gz):
    images, labels = write_mnist(tmp_path / "mnist", "train", 7, gz=gz)
    write_mnist(tmp_path / "mnist", "test", 4, gz=gz, seed=5)
    ds = load_dataset("mnist", "train", data_dir=tmp_path, source="local")
    assert ds.images.shape == (7, 28, 28, 1) and ds.images.dtype == np.uint8
    assert ds.labels.dtype == np.int32
    np.testing.assert_array_equal(ds.images[..., 0], images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.num_classes == 10 and ds.image_shape == (1, 28, 28)
    assert len(load_dataset("mnist", "test", data_dir=tmp_path, source="local")) == 4


def test_mnist_in_data_dir_itself(tmp_path):
    images, _ = write_mnist(tmp_path, "test", 3, gz=False)
    ds = load_dataset("mnist", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(ds.images[..., 0], images)


def test_idx_truncated(tmp_path):
    write_mnist(tmp_path, "train", 5, gz=False)
    path = tmp_path / "train-images-idx3-ubyte"
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(DataFormatError, match="truncated") as e:
        load_dataset("mnist", "train", data_dir=tmp_path, source="local")
    assert str(path) in str(e.value)


def test_idx_truncated_gzip(tmp_path):
    write_mnist(tmp_path, "train", 5, gz=True)
    path = tmp_path / "train-images-idx3-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-30])
    with pytest.raises(DataFormatError, match="gzip") as e:
        data.read_idx(path)
    assert str(path) in str(e.value)


def test_idx_wrong_magic(tmp_path):
    _, labels = write_mnist(tmp_path, "train", 5, gz=False)
    wrong = write_idx(tmp_path / "labels-as-images", labels, gz=False)
    with pytest.raises(DataFormatError, match="magic") as e:
        data.load_mnist_idx(wrong, tmp_path / "train-labels-idx1-ubyte")
    assert str(wrong) in str(e.value)
    junk = tmp_path / "junk"
    junk.write_bytes(b"\x12\x34\x56\x78" + bytes(100))
    with pytest.raises(DataFormatError, match="magic"):
        data.read_idx(junk)


# ----------------------------------------------------------------------------------------------
# CIFAR-10


@pytest.mark.parametrize(
    "fmt,sub", [("bin", "cifar-10-batches-bin"), ("py", "cifar-10-batches-py"), ("bin", "")]
)
def test_cifar_batches_roundtrip(tmp_path, fmt, sub):
    d = tmp_path / "cifar10" / sub
    images, labels = write_cifar(d, "train", fmt)
    test_images, _ = write_cifar(d, "test", fmt, n=2)
    ds = load_dataset("cifar10", "train", data_dir=tmp_path, source="local")
    assert ds.images.shape == (15, 32, 32, 3)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == CIFAR10_CLASSES and ds.image_shape == (3, 32, 32)
    test = load_dataset("cifar10", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(test.images, test_images)


def test_cifar_official_archive(tmp_path):
    src = tmp_path / "src" / "cifar-10-batches-bin"
    images, labels = write_cifar(src, "test", "bin")
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar-10-binary.tar.gz", "w:gz") as tar:
        tar.add(src, arcname="cifar-10-batches-bin")
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)


def test_cifar_corrupt(tmp_path):
    d = tmp_path / "cifar-10-batches-bin"
    write_cifar(d, "test", "bin")
    (d / "test_batch.bin").write_bytes((d / "test_batch.bin").read_bytes()[:-1])
    with pytest.raises(DataFormatError, match="test_batch.bin"):
        load_dataset("cifar10", "test", data_dir=tmp_path, source="local")
    (d / "test_batch").write_bytes(b"not a pickle")
    with pytest.raises(DataFormatError, match="test_batch"):
        data.load_cifar10_pickle([d / "test_batch"])


# ----------------------------------------------------------------------------------------------
# Image folders


def test_folder_png_exact_roundtrip(tmp_path):
    images, labels = write_folder(tmp_path, "train", ["zebra", "ant", "cat"], 3, ext="png")
    write_folder(tmp_path, "test", ["zebra", "ant", "cat", "dog"], 1, ext="png")
    ds = load_dataset("folder", "train", data_dir=tmp_path)
    # Classes are the sorted union over splits, so train and test share one labelling.
    assert ds.class_names == ("ant", "cat", "dog", "zebra")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, np.array([0, 0, 0, 1, 1, 1, 3, 3, 3]))
    assert ds.image_shape == (3, 8, 6) and ds.mean == (0.5, 0.5, 0.5)


def test_folder_grayscale_and_class_list(tmp_path):
    images, _ = write_folder(tmp_path, "train", ["a", "b"], 2, ext="png", mode="L")
    ds = load_dataset("folder", "train", data_dir=tmp_path, classes=["b", "a"])
    assert ds.images.shape == (4, 8, 6, 1)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, [1, 1, 0, 0])
    with pytest.raises(DataFormatError, match="not in classes"):
        load_dataset("folder", "train", data_dir=tmp_path, classes=["a"])


def test_folder_jpg_and_resize(tmp_path):
    images, labels = write_folder(tmp_path, "train", ["x", "y"], 2, ext="jpg")
    ds = load_dataset("folder", "train", data_dir=tmp_path)
    assert ds.images.shape == images.shape
    np.testing.assert_array_equal(ds.labels, labels)
    small = load_dataset("folder", "train", data_dir=tmp_path, image_size=(4, 3))
    assert small.images.shape == (4, 4, 3, 3)


def test_folder_mixed_sizes_error(tmp_path):
    write_folder(tmp_path, "train", ["x"], 1, ext="png")
    Image.new("RGB", (5, 5)).save(tmp_path / "train" / "x" / "big.png")
    with pytest.raises(DataFormatError, match="big.png"):
        load_dataset("folder", "train", data_dir=tmp_path)


def test_folder_tar_gz_and_cache(tmp_path, monkeypatch):
    tree = tmp_path / "tree"
    images, labels = write_folder(tree / "mydata", "test", ["b", "a"], 2, ext="png")
    archive = tmp_path / "mydata.tar.gz"
    with tarfile.open(archive, "w:gz") as tar:
        tar.add(tree / "mydata", arcname="mydata")  # one wrapping folder is allowed
    ds = load_dataset("folder", "test", data_dir=archive)
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, labels)
    assert ds.class_names == ("a", "b")
    assert list((tmp_path / "cache").glob("mydata-test-*.npz"))

    def no_decoding(*args, **kwargs):
        raise AssertionError("second load should come from the cache")

    monkeypatch.setattr(data.formats, "decode_images", no_decoding)
    again = load_dataset("folder", "test", data_dir=archive)
    np.testing.assert_array_equal(again.images, images)
    assert again.class_names == ds.class_names


def test_cifar_folder_archive_uses_official_class_order(tmp_path):
    classes = list(CIFAR10_CLASSES)
    tree = tmp_path / "tree" / "cifar10-jpg"
    for label, cls in enumerate(classes):
        (tree / "test" / cls).mkdir(parents=True)
        Image.new("RGB", (32, 32), (label, 0, 0)).save(tree / "test" / cls / "0000.png")
    (tmp_path / "cifar10").mkdir()
    with tarfile.open(tmp_path / "cifar10" / "cifar10-jpg.tar.gz", "w:gz") as tar:
        tar.add(tree, arcname="cifar10-jpg")
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, source="local")
    np.testing.assert_array_equal(ds.labels, np.arange(10))
    np.testing.assert_array_equal(ds.images[:, 0, 0, 0], np.arange(10))


# ----------------------------------------------------------------------------------------------
# Data directories and errors


def test_missing_data_dir_lists_places(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("mnist", "train", data_dir=missing, source="local")
    msg = str(e.value)
    assert str(missing) in msg and "--data-dir" in msg and data.DATA_ENV_VAR in msg
    with pytest.raises(DataNotFoundError, match="nowhere"):
        data.resolve_data_dir(missing)


def _no_network_no_tfds(monkeypatch):
    """Fail the test on any tfds use or network connection."""

    def forbidden(*args, **kwargs):
        raise AssertionError("tensorflow_datasets or the network was used")

    monkeypatch.setattr(dataset_module, "load_tfds", forbidden)
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)  # importing it fails
    monkeypatch.setattr(socket, "create_connection", forbidden)
    monkeypatch.setattr(socket.socket, "connect", forbidden)


@pytest.mark.parametrize("kind", ["missing", "file", "empty", "other_dataset"])
def test_named_data_dir_without_data_fails_at_once(tmp_path, monkeypatch, kind):
    """A data directory the user named is the only place looked: no download fallback."""
    _no_network_no_tfds(monkeypatch)
    d = tmp_path / "dir"
    if kind == "file":
        d.write_text("not a directory")
    elif kind != "missing":
        d.mkdir()
    if kind == "other_dataset":
        write_mnist(d / "mnist", "train", 3, gz=False)
    expected = {
        "missing": "does not exist",
        "file": "is not a directory",
        "empty": "holds no cifar10 'train' data",
        "other_dataset": "holds no cifar10 'train' data",
    }[kind]
    with pytest.raises(DataNotFoundError, match=f"The data directory {d} {expected}") as e:
        load_dataset("cifar10", "train", data_dir=d)  # source="auto"
    assert "--data-dir" in str(e.value)


def test_auto_falls_back_to_tfds_only_without_a_data_dir(tmp_path, monkeypatch):
    """No data directory given and none of the default places holds the data: tfds, whose
    error is reported with every place looked."""

    def offline(*args, **kwargs):
        raise DataNotFoundError("no internet")

    monkeypatch.setattr(dataset_module, "load_tfds", offline)
    (tmp_path / "mnist").mkdir()
    monkeypatch.setattr(
        dataset_module, "candidate_data_dirs", lambda data_dir=None: [(tmp_path, "test dir")]
    )
    with pytest.raises(DataNotFoundError) as e:
        load_dataset("cifar10", "test")
    msg = str(e.value)
    assert "cifar10" in msg and "cifar-10-batches-bin" in msg
    assert "tensorflow_datasets: no internet" in msg and "internet" in msg


def _fake_tfds(monkeypatch, calls, root=None):
    """A `tensorflow_datasets` without prepared data; records `(function, download)` calls
    (a download would create `root`)."""

    def data_source(name, *, download, **kwargs):
        calls.append(("data_source", download))
        if download and root is not None:
            (root / "downloads").mkdir(parents=True)
        raise KeyError("splits is empty: the dataset has not been generated yet")

    def load(name, *, download, **kwargs):
        calls.append(("load", download))
        raise RuntimeError("no TensorFlow")

    fake = types.ModuleType("tensorflow_datasets")
    fake.data_source, fake.load = data_source, load
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_tfds_offline_fails_fast_without_download(tmp_path, monkeypatch):
    """Offline (the download server unreachable): prepared data only, no download attempt."""
    calls = []
    _fake_tfds(monkeypatch, calls)
    monkeypatch.setattr(tfds_source, "_unreachable", lambda name: "cannot reach it (test)")
    with pytest.raises(DataNotFoundError, match="no download: cannot reach it"):
        data.load_tfds("mnist", "train", data_dir=tmp_path / "tfds")
    assert calls == [("data_source", False)]


def test_failed_tfds_download_leaves_no_data_dir(tmp_path, monkeypatch):
    root = tmp_path / "tfds"
    calls = []
    _fake_tfds(monkeypatch, calls, root)
    monkeypatch.setattr(tfds_source, "_unreachable", lambda name: None)
    with pytest.raises(DataNotFoundError, match="could not load 'mnist'"):
        data.load_tfds("mnist", "train", data_dir=root)
    assert calls == [("data_source", False), ("data_source", True), ("load", True)]
    assert not root.exists()
    root.mkdir()  # a directory that was there before is kept
    with pytest.raises(DataNotFoundError):
        data.load_tfds("mnist", "train", data_dir=root)
    assert root.is_dir()


def test_download_server_probe_through_a_local_proxy(monkeypatch):
    """`_unreachable` connects to the HTTPS proxy when one is set (a local socket here)."""
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen(1)
        monkeypatch.setenv("https_proxy", f"http://127.0.0.1:{server.getsockname()[1]}")
        assert tfds_source._unreachable("mnist", timeout=5) is None
    with socket.socket() as closed:  # bound, not listening: the connection is refused
        closed.bind(("127.0.0.1", 0))
        monkeypatch.setenv("https_proxy", f"127.0.0.1:{closed.getsockname()[1]}")
        assert "cannot reach 127.0.0.1" in tfds_source._unreachable("mnist", timeout=5)


def test_data_dir_resolution_order(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    env = tmp_path / "env"
    monkeypatch.setenv(data.DATA_ENV_VAR, str(env))
    candidates = [p for p, _ in data.candidate_data_dirs()]
    assert candidates[:3] == [env, Path("data"), Path("../shared/data")]
    assert [p for p, _ in data.candidate_data_dirs("x")] == [Path("x")]
    (tmp_path / "data").mkdir()
    assert data.resolve_data_dir() == Path("data")  # env dir does not exist
    env.mkdir()
    assert data.resolve_data_dir() == env


def _fake_tfds_source(monkeypatch, images: np.ndarray, asked: list | None = None) -> None:
    """A fake `tensorflow_datasets` whose data source holds `images`, labelled by index
    (the keys read are appended to `asked`)."""

    class Source:
        dataset_info = types.SimpleNamespace(
            features={"label": types.SimpleNamespace(names=list("0123456789"))}
        )

        def __len__(self):
            return len(images)

        def __getitems__(self, keys):
            if asked is not None:
                asked.extend(keys)
            return [{"image": images[k], "label": np.int64(k)} for k in keys]

    fake = types.ModuleType("tensorflow_datasets")
    fake.data_source = lambda name, **kwargs: Source()
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", fake)


def test_tfds_data_source_conversion(monkeypatch):
    """The tfds path on a fake `tensorflow_datasets` (the real one needs internet)."""
    images = _rng().integers(0, 256, (5, 28, 28, 1), dtype=np.uint8)
    _fake_tfds_source(monkeypatch, images)
    ds = load_dataset("mnist", "test", source="tfds")
    np.testing.assert_array_equal(ds.images, images)
    np.testing.assert_array_equal(ds.labels, np.arange(5))
    assert ds.origin == "tfds"


# ----------------------------------------------------------------------------------------------
# Batching, normalisation, augmentation


def _toy(n=23) -> ArrayDataset:
    images = _rng().integers(0, 256, (n, 4, 4, 3), dtype=np.uint8)
    labels = (np.arange(n) % 3).astype(np.int32)
    return ArrayDataset(images, labels, ("a", "b", "c"), (0.5,) * 3, (0.25,) * 3)


def test_batches_deterministic_and_resumable():
    ds = _toy()
    epoch = [b[1] for b in ds.batches(4, seed=1, epoch=2)]
    assert len(epoch) == ds.num_batches(4) == 5
    again = [b[1] for b in ds.batches(4, seed=1, epoch=2)]
    resumed = [b[1] for b in ds.batches(4, seed=1, epoch=2, start_batch=3)]
    for a, b in zip(epoch, again, strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(epoch[3:], resumed, strict=True):
        np.testing.assert_array_equal(a, b)
    images = np.concatenate([b[0] for b in ds.batches(4, seed=1, epoch=3, drop_last=False)])
    assert len(images) == 23 and len(np.unique(images.reshape(23, -1), axis=0)) == 23
    other = np.concatenate([b[0] for b in ds.batches(4, seed=1, epoch=3, drop_last=False)])
    np.testing.assert_array_equal(images, other)
    first = next(ds.batches(4, seed=1, epoch=4))[0]
    assert not np.array_equal(first, next(ds.batches(4, seed=1, epoch=5))[0])
    plain = next(ds.batches(5, seed=0, epoch=0, shuffle=False))[0]
    np.testing.assert_array_equal(plain, ds.images[:5])


def test_normalize_and_subset():
    ds = _toy()
    x = ds.normalize(ds.images[:2])
    assert x.shape == (2, 3, 4, 4) and x.dtype == jnp.float32
    expected = (ds.images[:2].astype(np.float32) / 255 - 0.5) / 0.25
    np.testing.assert_allclose(np.asarray(x), expected.transpose(0, 3, 1, 2), atol=1e-6)
    assert ds.normalize(ds.images, channels_first=False).shape == (23, 4, 4, 3)
    assert len(ds.subset(5)) == 5 and len(ds.subset(5, seed=0)) == 5
    np.testing.assert_array_equal(ds.subset(5).images, ds.images[:5])


def test_augment_flip_and_crop():
    x = jnp.asarray(_rng().normal(size=(32, 3, 6, 5)), jnp.float32)
    out = augment(jax.random.key(0), x, padding=0)
    assert out.shape == x.shape and out.dtype == x.dtype
    same = jnp.all(out == x, axis=(1, 2, 3))
    flipped = jnp.all(out == x[..., ::-1], axis=(1, 2, 3))
    assert bool(jnp.all(same | flipped)) and 0 < int(flipped.sum()) < 32

    p = 2
    cropped = np.asarray(augment(jax.random.key(1), x, padding=p, flip=False))
    padded = np.pad(np.asarray(x), ((0, 0), (0, 0), (p, p), (p, p)))
    offsets = set()
    for i in range(32):
        matches = [
            (dy, dx)
            for dy in range(2 * p + 1)
            for dx in range(2 * p + 1)
            if np.array_equal(cropped[i], padded[i, :, dy : dy + 6, dx : dx + 5])
        ]
        assert matches, f"image {i} is not a crop of its padded input"
        offsets.add(matches[0])
    assert len(offsets) > 5

    u8 = jnp.asarray(_rng().integers(0, 256, (8, 32, 32, 3), dtype=np.uint8))
    key = jax.random.key(2)
    nhwc = augment(key, u8, channels_first=False)
    assert nhwc.shape == u8.shape and nhwc.dtype == jnp.uint8
    nchw = augment(key, jnp.moveaxis(u8, -1, 1))
    np.testing.assert_array_equal(np.asarray(nhwc), np.moveaxis(np.asarray(nchw), 1, -1))


# ----------------------------------------------------------------------------------------------
# Real data (present in CI at ../shared/data)


@pytest.mark.skipif(not (SHARED / "mnist").is_dir(), reason="no ../shared/data/mnist")
def test_real_mnist():
    train = load_dataset("mnist", "train", data_dir=SHARED, source="local")
    test = load_dataset("mnist", "test", data_dir=SHARED, source="local")
    assert len(train) == 60000 and len(test) == 10000
    np.testing.assert_array_equal(train.labels[:10], [5, 0, 4, 1, 9, 2, 1, 3, 1, 4])
    counts = np.bincount(train.images.ravel(), minlength=256)  # exact and fast
    values = np.arange(256) / 255
    mean = (counts * values).sum() / counts.sum()
    std = np.sqrt((counts * values**2).sum() / counts.sum() - mean**2)
    assert abs(mean - 0.1307) < 1e-4 and abs(std - 0.3081) < 1e-4


@pytest.mark.skipif(not (SHARED / "cifar10").is_dir(), reason="no ../shared/data/cifar10")
def test_real_cifar10_test_split():
    test = load_dataset("cifar10", "test", data_dir=SHARED, source="local")
    assert test.images.shape == (10000, 32, 32, 3) and test.class_names == CIFAR10_CLASSES
    np.testing.assert_array_equal(np.bincount(test.labels), [1000] * 10)
    mean = test.images.reshape(-1, 3).mean(0) / 255
    np.testing.assert_allclose(mean, data.CIFAR10_MEAN, atol=0.01)


# ----------------------------------------------------------------------------------------------
# Shards: each process loads only its own


def _holders(ds: ArrayDataset, num_shards: int, processes: int) -> list[data.ShardedDataset]:
    """Process p's `ShardedDataset` of `ds`, for each p (as `load_sharded` builds it)."""
    out = []
    for p in range(processes):
        first, count = data.process_shards(num_shards, p, processes)
        out.append(
            data.load_sharded(
                lambda select: ds.subset_of(select), num_shards=num_shards, first=first, count=count
            )
        )
    return out


@pytest.mark.parametrize(("n", "num_shards", "batch"), [(23, 2, 4), (50, 4, 8), (41, 4, 4)])
def test_shard_batches_are_the_same_global_batches_for_any_process_count(n, num_shards, batch):
    ds = _toy(n)
    (whole,) = _holders(ds, num_shards, 1)
    assert whole.num_batches(batch) == (n // num_shards) // (batch // num_shards)
    for epoch in (0, 1):
        glob = [b[0] for b in whole.batches(batch, seed=3, epoch=epoch)]
        assert len(glob) == whole.num_batches(batch)
        flat = np.concatenate(glob).reshape(len(glob) * batch, -1)
        assert len(np.unique(flat, axis=0)) == len(flat)  # no example twice in an epoch
        for b, x in enumerate(glob):  # slice j of every batch comes from shard j
            k = batch // num_shards
            for j in range(num_shards):
                rows = [
                    np.flatnonzero((ds.images == r).all(axis=(1, 2, 3)))[0]
                    for r in x[j * k : (j + 1) * k]
                ]
                assert all(r % num_shards == j for r in rows), (b, j, rows)
        for processes in [p for p in (2, 4) if num_shards % p == 0]:
            parts = _holders(ds, num_shards, processes)
            assert sum(len(h) for h in parts) == n  # each example held by one process
            local = [list(h.batches(batch, seed=3, epoch=epoch)) for h in parts]
            for b, x in enumerate(glob):
                np.testing.assert_array_equal(np.concatenate([lb[b][0] for lb in local]), x)
            resumed = list(parts[-1].batches(batch, seed=3, epoch=epoch, start_batch=1))
            np.testing.assert_array_equal(resumed[0][1], local[-1][1][1])
    # The order is a function of the seed and the epoch.
    a, b, c = (next(whole.batches(batch, seed=s, epoch=e))[1] for s, e in [(3, 0), (4, 0), (3, 1)])
    assert not np.array_equal(a, b) and not np.array_equal(a, c)


@pytest.mark.parametrize(
    ("n", "num_shards", "processes", "batch", "devices"), [(23, 2, 2, 5, 2), (41, 4, 2, 8, 4)]
)
def test_shard_evaluation_batches_cover_every_example_once(
    n, num_shards, processes, batch, devices
):
    ds = _toy(n)
    parts = _holders(ds, num_shards, processes)
    size = parts[0].eval_batch_size(batch, devices)
    assert size >= batch and size % num_shards == 0 and size % devices == 0
    seen = []
    for h in parts:
        for images, labels, mask in h.eval_batches(batch, devices):
            assert len(images) == size // processes
            seen += [img for img, m in zip(images, mask, strict=True) if m]
            assert not images[~mask].any() and not labels[~mask].any()
    seen = np.stack(seen).reshape(len(seen), -1)
    np.testing.assert_array_equal(
        np.unique(seen, axis=0), np.unique(ds.images.reshape(n, -1), axis=0)
    )
    assert len(seen) == n


def test_shard_bad_arguments():
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        data.process_shards(4, 0, 3)
    with pytest.raises(ValueError, match="positive integer"):
        data.process_shards(0, 0, 1)
    (whole,) = _holders(_toy(), 2, 1)
    with pytest.raises(
        ValueError, match="batch_size 5 must be a positive multiple of data.shards=2"
    ):
        whole.num_batches(5)
    with pytest.raises(ValueError, match="cannot fill data.shards=30"):
        _holders(_toy(), 30, 1)
    with pytest.raises(ValueError, match="increasing indices"):
        _toy().subset_of(lambda n: np.array([3, 1]))


@pytest.mark.parametrize("archive", [False, True])
def test_folder_select_decodes_only_the_selected_images(tmp_path, monkeypatch, archive):
    tree = tmp_path / "tree"
    images, labels = write_folder(tree / "mydata", "train", ["b", "a", "c"], 4, ext="png")
    root = tree / "mydata"
    if archive:
        root = tmp_path / "mydata.tar.gz"
        with tarfile.open(root, "w:gz") as tar:
            tar.add(tree / "mydata", arcname="mydata")
    decoded = []
    real = data.formats._decode_image
    monkeypatch.setattr(
        data.formats,
        "_decode_image",
        lambda src, name, *a: decoded.append(name) or real(src, name, *a),
    )
    pick = np.array([1, 4, 5, 11])
    ds = load_dataset("folder", "train", data_dir=root, select=lambda n: pick if n == 12 else None)
    np.testing.assert_array_equal(ds.images, images[pick])
    np.testing.assert_array_equal(ds.labels, labels[pick])
    assert ds.class_names == ("a", "b", "c")  # the whole split's labelling
    assert len(decoded) == len(pick) + 1  # (the first image is decoded once more for its shape)
    decoded.clear()
    again = load_dataset("folder", "train", data_dir=root, select=lambda n: pick)
    np.testing.assert_array_equal(again.images, images[pick])
    assert not decoded  # from the selection's own cache
    other = load_dataset("folder", "train", data_dir=root, select=lambda n: np.array([0, 2]))
    np.testing.assert_array_equal(other.images, images[[0, 2]])


@pytest.mark.parametrize("gz", [True, False])
def test_mnist_select_streams_the_selected_rows(tmp_path, gz):
    images, labels = write_mnist(tmp_path / "mnist", "test", 9000, gz=gz)  # > one 4096-row chunk
    pick = lambda n: np.r_[1:n:7, n - 1]  # noqa: E731
    ds = load_dataset("mnist", "test", data_dir=tmp_path, select=pick)
    np.testing.assert_array_equal(ds.images[..., 0], images[pick(9000)])
    np.testing.assert_array_equal(ds.labels, labels[pick(9000)])
    ext = ".gz" if gz else ""
    path = tmp_path / "mnist" / f"t10k-images-idx3-ubyte{ext}"
    write_idx(path, images[:-1], gz=gz)  # one image short of the labels
    with pytest.raises(DataFormatError, match="8999 images but .* 9000 labels"):
        load_dataset("mnist", "test", data_dir=tmp_path, select=pick)
    write_idx(path, images, gz=False)
    cut = path.read_bytes()[:5000]  # truncated inside the header's promised rows
    path.write_bytes(gzip.compress(cut) if gz else cut)
    with pytest.raises(DataFormatError, match="truncated"):
        load_dataset("mnist", "test", data_dir=tmp_path, select=pick)


def test_raw_formats_and_tfds_select(tmp_path, monkeypatch):
    images, labels = write_cifar(tmp_path / "cifar10", "test", "bin", n=9)
    ds = load_dataset("cifar10", "test", data_dir=tmp_path, select=lambda n: np.arange(1, n, 3))
    np.testing.assert_array_equal(ds.images, images[1::3])
    np.testing.assert_array_equal(ds.labels, labels[1::3])
    asked = []
    _fake_tfds_source(
        monkeypatch,
        np.arange(7, dtype=np.uint8)[:, None, None, None] + np.zeros((7, 28, 28, 1), np.uint8),
        asked,
    )
    ds = load_dataset("mnist", "test", source="tfds", select=lambda n: np.array([2, 6]))
    assert asked == [2, 6]  # only the selected records are read
    np.testing.assert_array_equal(ds.labels, [2, 6])


# prefetch


class _Source:
    """An iterator over `range(n)` (endless if `n` is None) that records how many items it
    drew, in which threads, and whether it was closed; drawing item `fail_at` raises."""

    def __init__(self, n=None, fail_at=None):
        self.n, self.fail_at = n, fail_at
        self.drawn, self.threads, self.closed = 0, set(), False

    def __iter__(self):
        return self

    def __next__(self):
        if self.n is not None and self.drawn >= self.n:
            raise StopIteration
        if self.drawn == self.fail_at:
            raise ValueError(f"bad item {self.drawn}")
        self.threads.add(threading.current_thread().name)
        self.drawn += 1
        return self.drawn - 1

    def close(self):
        self.closed = True


def _prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "prefetch" and t.is_alive()]


def _wait_for(condition, seconds=10.0):
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.001)
    return condition()


@pytest.mark.parametrize("size", [0, 1, 2, 7])
def test_prefetch_keeps_the_order(size):
    src = _Source(50)
    got = list(data.prefetch(map(lambda i: np.full(3, i), src), size))
    np.testing.assert_array_equal(np.stack(got), np.repeat(np.arange(50)[:, None], 3, 1))
    assert not _prefetch_threads()
    # Drawn in the background thread, or in the caller's with size 0.
    assert src.threads == {"prefetch" if size else threading.current_thread().name}


@pytest.mark.parametrize("size", [2, 3])
def test_prefetch_draws_size_items_ahead_and_no_more(size):
    src = _Source()
    feed = data.prefetch(src, size)
    assert next(feed) == 0
    # `size` items wait in the queue; the thread holds one more, waiting for room.
    assert _wait_for(lambda: src.drawn == size + 2), src.drawn
    time.sleep(0.05)
    assert src.drawn == size + 2
    assert [next(feed) for _ in range(3)] == [1, 2, 3]
    feed.close()
    assert src.closed and not _prefetch_threads()


@pytest.mark.parametrize("size", [0, 2])
def test_prefetch_raises_the_sources_error_at_its_item(size):
    feed = data.prefetch(_Source(10, fail_at=3), size)
    assert [next(feed) for _ in range(3)] == [0, 1, 2]
    with pytest.raises(ValueError, match="bad item 3"):
        next(feed)
    assert not _prefetch_threads()
    with pytest.raises(StopIteration):
        next(feed)


def _break_after(feed, n):
    for i in feed:
        if i == n:
            break  # `feed` is released when this function returns


@pytest.mark.parametrize("how", ["break", "close", "KeyboardInterrupt"])
def test_prefetch_stops_its_thread_when_the_loop_ends_early(how):
    src = _Source()  # endless: only a stop ends the thread
    if how == "break":
        _break_after(data.prefetch(src, 2), 3)
    elif how == "close":
        feed = data.prefetch(src, 2)
        assert next(feed) == 0
        feed.close()
    else:
        feed = data.prefetch(src, 2)
        with pytest.raises(KeyboardInterrupt):
            try:
                for i in feed:
                    if i == 5:
                        raise KeyboardInterrupt
            finally:
                feed.close()  # what `ff.train` does in its `finally`
    assert src.closed and not _prefetch_threads()
    drawn = src.drawn
    time.sleep(0.05)
    assert src.drawn == drawn <= 5 + 2 + 2


@pytest.mark.parametrize(
    "args, error, match",
    [
        ((range(3), -1), ValueError, "must be >= 0"),
        ((range(3), 1.5), TypeError, "must be an int"),
        ((range(3), True), TypeError, "must be an int"),
        ((3, 2), TypeError, "needs an iterable, got int"),
    ],
)
def test_prefetch_bad_arguments(args, error, match):
    with pytest.raises(error, match=match):
        data.prefetch(*args)
