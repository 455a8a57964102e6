"""Readers for on-disk dataset formats.

Every loader returns numpy arrays `images: uint8 (N, H, W, C)` and `labels: int32 (N,)`:

- [`load_mnist_idx`][]: MNIST-style IDX files, gzipped or raw (also Fashion-MNIST, KMNIST...);
- [`load_cifar10_binary`][]: the official CIFAR-10 binary batches (`data_batch_1.bin`...);
- [`load_cifar10_pickle`][]: the official CIFAR-10 python batches (`data_batch_1`...);
- [`load_image_folder`][]: `<root>/<split>/<class>/*.{png,jpg,jpeg}` trees, from a directory or
  straight from a `.tar`/`.tar.gz` of one. Decoded arrays are cached as `.npz` so that only the
  first load pays for decoding.

Truncated or corrupt files raise [`DataFormatError`][] naming the file.
"""

from __future__ import annotations

import concurrent.futures
import gzip
import hashlib
import io
import json
import multiprocessing
import os
import pickle
import tarfile
import tempfile
import warnings
import zlib
from collections.abc import Callable, Sequence
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import DataFormatError, DataNotFoundError
from .paths import default_cache_dir

# `n -> increasing indices in [0, n)`: which of a split's `n` examples to load.
Select = Callable[[int], np.ndarray]

PathLike = str | os.PathLike
Arrays = tuple[np.ndarray, np.ndarray]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")
ARCHIVE_SUFFIXES = (".tar", ".tar.gz", ".tgz", ".tar.bz2", ".tar.xz")
_CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------
# Raw bytes


def read_bytes(path: PathLike) -> bytes:
    """Read a file, transparently gunzipping it if it starts with the gzip magic bytes."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            data = f.read()
        if data[:2] == b"\x1f\x8b":
            data = gzip.decompress(data)
    except FileNotFoundError as e:
        raise DataNotFoundError(f"File not found: {path}") from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: truncated or corrupt gzip file ({e}).") from e
    return data


def is_archive(path: PathLike) -> bool:
    """Whether `path` names a tar archive (by its suffix)."""
    return Path(path).name.lower().endswith(ARCHIVE_SUFFIXES)


def read_archive_members(archive: PathLike, basenames: Sequence[str]) -> dict[str, bytes]:
    """The contents of the members of `archive` with the given base names (at any depth)."""
    wanted = set(basenames)
    out: dict[str, bytes] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                name = PurePosixPath(member.name).name
                if member.isfile() and name in wanted and name not in out:
                    out[name] = tar.extractfile(member).read()
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataFormatError(f"{archive}: truncated or corrupt archive ({e}).") from e
    missing = [n for n in basenames if n not in out]
    if missing:
        raise DataNotFoundError(f"{archive}: no member(s) named {missing}.")
    return out


# ----------------------------------------------------------------------------------------------
# IDX (MNIST)

_IDX_DTYPES = {0x08: "u1", 0x09: "i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}
IDX_IMAGES_MAGIC = 0x00000803  # uint8, 3 dimensions
IDX_LABELS_MAGIC = 0x00000801  # uint8, 1 dimension


def parse_idx(data: bytes, name: str = "<bytes>", *, magic: int | None = None) -> np.ndarray:
    """Parse the bytes of an IDX file; `magic` optionally pins the expected magic number."""
    if len(data) < 4:
        raise DataFormatError(f"{name}: too short for an IDX file ({len(data)} bytes).")
    found = int.from_bytes(data[:4], "big")
    if magic is not None and found != magic:
        raise DataFormatError(
            f"{name}: wrong IDX magic number 0x{found:08x} (expected 0x{magic:08x}); "
            "is this the right file?"
        )
    code, ndim = data[2], data[3]
    if data[:2] != b"\x00\x00" or code not in _IDX_DTYPES or ndim == 0:
        raise DataFormatError(f"{name}: not an IDX file (magic number 0x{found:08x}).")
    header = 4 + 4 * ndim
    if len(data) < header:
        raise DataFormatError(f"{name}: truncated IDX header.")
    dims = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    dtype = np.dtype(_IDX_DTYPES[code])
    expected = header + int(np.prod(dims)) * dtype.itemsize
    if len(data) != expected:
        what = "truncated" if len(data) < expected else "has trailing bytes"
        raise DataFormatError(
            f"{name}: IDX file {what}: header says shape {dims} ({expected} bytes), "
            f"file has {len(data)} bytes."
        )
    array = np.frombuffer(data, dtype, offset=header).reshape(dims)
    return array.astype(dtype.newbyteorder("="))  # native byte order, writable copy


def read_idx(path: PathLike, *, magic: int | None = None) -> np.ndarray:
    """Read an IDX file (gzipped or raw) into a numpy array."""
    return parse_idx(read_bytes(path), str(path), magic=magic)


def _read_idx_rows(path: PathLike, select: Select, magic: int) -> np.ndarray:
    """The rows `select(n)` of a uint8 IDX file of `n` rows, streamed (gzipped or raw): only
    the selected rows are kept in memory."""
    path = Path(path)
    try:
        with open(path, "rb") as raw:
            gz = raw.read(2) == b"\x1f\x8b"
        with gzip.open(path, "rb") if gz else open(path, "rb") as f:
            head = f.read(4)
            ndim = head[3] if len(head) == 4 else 0
            head += f.read(4 * ndim)
            found = int.from_bytes(head[:4], "big") if len(head) >= 4 else None
            if found != magic or len(head) < 4 + 4 * ndim:
                return parse_idx(head, str(path), magic=magic)  # raises the precise error
            dims = [int.from_bytes(head[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim)]
            n, row = dims[0], int(np.prod(dims[1:]))
            rows = _check_selection(select, n, str(path))
            out = np.empty((len(rows), *dims[1:]), np.uint8)
            chunk, done = 4096, 0
            for start in range(0, n, chunk):
                size = min(chunk, n - start) * row
                block = f.read(size)
                if len(block) < size:
                    raise DataFormatError(
                        f"{path}: IDX file truncated: header says shape {tuple(dims)}."
                    )
                mine = rows[(rows >= start) & (rows < start + chunk)] - start
                block = np.frombuffer(block, np.uint8).reshape(-1, *dims[1:])
                out[done : done + len(mine)] = block[mine]
                done += len(mine)
            if f.read(1):
                raise DataFormatError(f"{path}: IDX file has trailing bytes after {tuple(dims)}.")
    except FileNotFoundError as e:
        raise DataNotFoundError(f"File not found: {path}") from e
    except (EOFError, gzip.BadGzipFile, zlib.error) as e:
        raise DataFormatError(f"{path}: truncated or corrupt gzip file ({e}).") from e
    return out


def load_mnist_idx(
    images_path: PathLike, labels_path: PathLike, *, select: Select | None = None
) -> Arrays:
    """Load an MNIST-style pair of IDX files as `(uint8 (N, H, W, 1), int32 (N,))`.

    `select` (`n -> increasing indices`) keeps only those examples; the images file is then
    streamed and only their rows are held in memory."""
    labels = read_idx(labels_path, magic=IDX_LABELS_MAGIC)
    if select is not None:
        rows = _check_selection(select, len(labels), str(labels_path))

        def same_rows(n: int) -> np.ndarray:
            if n != len(labels):
                raise DataFormatError(
                    f"{images_path} has {n} images but {labels_path} has {len(labels)} labels."
                )
            return rows

        images = _read_idx_rows(images_path, same_rows, IDX_IMAGES_MAGIC)
        return images[..., None], labels[rows].astype(np.int32)
    images = read_idx(images_path, magic=IDX_IMAGES_MAGIC)
    if len(images) != len(labels):
        raise DataFormatError(
            f"{images_path} has {len(images)} images but {labels_path} has {len(labels)} labels."
        )
    return images[..., None], labels.astype(np.int32)


# ----------------------------------------------------------------------------------------------
# CIFAR-10

CIFAR10_TRAIN_BATCHES = tuple(f"data_batch_{i}" for i in range(1, 6))
CIFAR10_TEST_BATCHES = ("test_batch",)
_CIFAR_RECORD = 1 + 3 * 32 * 32


def cifar10_batch_names(split: str) -> tuple[str, ...]:
    """Official batch names (without `.bin`) of a CIFAR-10 split."""
    if split == "train":
        return CIFAR10_TRAIN_BATCHES
    if split == "test":
        return CIFAR10_TEST_BATCHES
    raise ValueError(f"Unknown CIFAR-10 split {split!r}; expected 'train' or 'test'.")


def _chw_to_hwc(flat: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(flat.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1))


def parse_cifar10_binary(data: bytes, name: str = "<bytes>") -> Arrays:
    """Parse one CIFAR-10 binary batch: records of 1 label byte + 3072 CHW pixel bytes."""
    if len(data) == 0 or len(data) % _CIFAR_RECORD:
        raise DataFormatError(
            f"{name}: size {len(data)} is not a positive multiple of the CIFAR-10 record size "
            f"{_CIFAR_RECORD}; truncated or not a CIFAR-10 binary batch."
        )
    records = np.frombuffer(data, np.uint8).reshape(-1, _CIFAR_RECORD)
    labels = records[:, 0].astype(np.int32)
    if labels.max() > 9:
        raise DataFormatError(f"{name}: label {labels.max()} > 9; not a CIFAR-10 binary batch.")
    return _chw_to_hwc(records[:, 1:]), labels


class _NumpyUnpickler(pickle.Unpickler):
    """Unpickler that only builds numpy arrays and builtins (no arbitrary code)."""

    _ALLOWED = {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }

    def find_class(self, module: str, name: str):
        if (module, name) in self._ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refusing to load global {module}.{name}")


def parse_cifar10_pickle(data: bytes, name: str = "<bytes>") -> Arrays:
    """Parse one official CIFAR-10 python batch (a pickled dict with `data` and `labels`)."""
    try:
        batch = _NumpyUnpickler(io.BytesIO(data), encoding="bytes").load()
        flat = np.asarray(batch[b"data"], np.uint8)
        labels = np.asarray(batch[b"labels"], np.int32)
    except Exception as e:  # any failure means a bad file
        raise DataFormatError(f"{name}: not a valid CIFAR-10 python batch ({e!r}).") from e
    if flat.ndim != 2 or flat.shape[1] != 3072 or len(flat) != len(labels):
        raise DataFormatError(
            f"{name}: unexpected CIFAR-10 batch shapes data={flat.shape} labels={labels.shape}."
        )
    return _chw_to_hwc(flat), labels


def _concat(parts: list[Arrays]) -> Arrays:
    return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])


def load_cifar10_binary(paths: Sequence[PathLike]) -> Arrays:
    """Load and concatenate CIFAR-10 binary batch files."""
    return _concat([parse_cifar10_binary(read_bytes(p), str(p)) for p in paths])


def load_cifar10_pickle(paths: Sequence[PathLike]) -> Arrays:
    """Load and concatenate CIFAR-10 python (pickle) batch files."""
    return _concat([parse_cifar10_pickle(read_bytes(p), str(p)) for p in paths])


# ----------------------------------------------------------------------------------------------
# Image folders (directories or tar archives)


def _is_image(name: str) -> bool:
    return name.lower().endswith(IMAGE_EXTENSIONS)


def _decode_image(
    src: bytes | str, name: str, channels: int, size: tuple[int, int] | None
) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            mode = "L" if channels == 1 else "RGB"
            if im.mode != mode:
                im = im.convert(mode)
            if size is not None and im.size != (size[1], size[0]):
                im = im.resize((size[1], size[0]), Image.Resampling.BILINEAR)
            array = np.asarray(im, np.uint8)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise DataFormatError(f"{name}: cannot decode image ({e}).") from e
    return array.reshape(array.shape[0], array.shape[1], channels)


def _decode_chunk(
    items: Sequence[tuple[str, bytes | str]],
    channels: int,
    size: tuple[int, int] | None,
    shape: tuple[int, int],
) -> np.ndarray:
    """Decode images into one array; top level so that process pools can pickle it."""
    out = np.empty((len(items), *shape, channels), np.uint8)
    for i, (name, src) in enumerate(items):
        array = _decode_image(src, name, channels, size)
        if array.shape[:2] != shape:
            raise DataFormatError(
                f"{name}: image is {array.shape[1]}x{array.shape[0]} but the first image is "
                f"{shape[1]}x{shape[0]}; pass image_size=(H, W) to resize all images."
            )
        out[i] = array
    return out


def _infer_channels(name: str, src: bytes | str) -> int:
    from PIL import Image

    try:
        with Image.open(io.BytesIO(src) if isinstance(src, bytes) else src) as im:
            return 1 if im.mode in ("1", "L", "I", "I;16", "F") else 3
    except OSError as e:
        raise DataFormatError(f"{name}: cannot decode image ({e}).") from e


def decode_images(
    items: Sequence[tuple[str, bytes | str]],
    *,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    num_workers: int = 0,
) -> np.ndarray:
    """Decode `(name, bytes-or-path)` items to `uint8 (N, H, W, C)`.

    `channels` (1 or 3) defaults to that of the first image; all images must share the first
    one's size unless `image_size=(H, W)` is given.

    `num_workers > 1` decodes in a (spawned) process pool. The default, 0, decodes here:
    decoding a 32x32 JPEG is ~0.2 ms of GIL-bound work, so threads do not help, and on the
    2-core development machine a process pool was no faster (each spawned worker re-imports
    the package, ~2 s); decoded arrays are cached anyway. Like any spawn pool, it needs the
    calling script's top level to be guarded by `if __name__ == "__main__":`.
    """
    if not items:
        raise DataNotFoundError("No images to decode.")
    if channels is None:
        channels = _infer_channels(*items[0])
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}.")
    first = _decode_image(items[0][1], items[0][0], channels, image_size)
    shape = first.shape[:2]
    if num_workers > 1:
        chunk = -(-len(items) // (4 * num_workers))
        chunks = [items[i : i + chunk] for i in range(0, len(items), chunk)]
        context = multiprocessing.get_context("spawn")  # fork is unsafe once JAX has started
        try:
            with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as pool:
                args = (channels, image_size, shape)
                futures = [pool.submit(_decode_chunk, c, *args) for c in chunks]
                return np.concatenate([f.result() for f in futures])
        except concurrent.futures.BrokenExecutor as e:
            warnings.warn(f"Decoding pool failed ({e}); decoding serially.", stacklevel=2)
    return _decode_chunk(items, channels, image_size, shape)


def _name(entry: os.DirEntry) -> str:
    return entry.name


def _split_dir(root: Path, split: str | None) -> Path:
    if split is None:
        return root
    if (root / split).is_dir():
        return root / split
    wrappers = [c / split for c in sorted(root.iterdir()) if (c / split).is_dir()]
    if len(wrappers) == 1:
        return wrappers[0]
    raise DataNotFoundError(
        f"No '{split}' folder in {root} (looked for {root / split} and {root}/*/{split})."
    )


def _scan_directory(root: Path, split: str | None) -> tuple[list[tuple[str, str]], set[str], list]:
    """`(class, path)` image files of a split, all class names (over all splits), stat key."""
    base = _split_dir(root, split)
    files: list[tuple[str, str]] = []
    stats = []
    for class_dir in sorted(p for p in base.iterdir() if p.is_dir()):
        with os.scandir(class_dir) as it:
            entries = sorted((e for e in it if e.is_file() and _is_image(e.name)), key=_name)
        for e in entries:
            files.append((class_dir.name, e.path))
            st = e.stat()
            stats.append((class_dir.name, e.name, st.st_size, st.st_mtime_ns))
    siblings = [base] if split is None else [p for p in base.parent.iterdir() if p.is_dir()]
    classes = {c.name for s in siblings for c in s.iterdir() if c.is_dir()}
    return files, classes, stats


def _scan_archive(
    archive: Path, split: str | None, keep: set[str] | None = None
) -> tuple[list[tuple[str, str, bytes]], set[str]]:
    """`(class, member name, bytes)` image files of a split and all class names in `archive`.

    With `keep`, only the members named there are read and returned."""
    found: dict[tuple[str, ...], list[tuple[str, str, bytes]]] = {}
    classes: dict[tuple[str, ...], set[str]] = {}
    try:
        with tarfile.open(archive, "r:*") as tar:
            for member in tar:
                parts = PurePosixPath(member.name).parts
                if not member.isfile() or not _is_image(parts[-1]) or len(parts) < 2:
                    continue
                if split is None:
                    key = parts[:-2]
                else:
                    if len(parts) < 3:
                        continue
                    classes.setdefault(parts[:-3], set()).add(parts[-2])
                    if parts[-3] != split:
                        continue
                    key = parts[:-3]
                read = keep is None or member.name in keep
                data = tar.extractfile(member).read() if read else b""
                found.setdefault(key, []).append((parts[-2], member.name, data))
    except (tarfile.TarError, EOFError, zlib.error, OSError) as e:
        raise DataFormatError(f"{archive}: truncated or corrupt archive ({e}).") from e
    if not found:
        where = f"<prefix>/{split}/<class>/<image>" if split else "<prefix>/<class>/<image>"
        raise DataNotFoundError(f"{archive}: no images matching {where}.")
    if len(found) > 1:
        roots = ["/".join(k) or "." for k in found]
        raise DataFormatError(f"{archive}: several image trees {roots}; expected one.")
    (prefix, items) = next(iter(found.items()))
    items.sort(key=lambda t: (t[0], t[1]))
    all_classes = classes.get(prefix, {c for c, _, _ in items})
    if keep is not None:
        items = [t for t in items if t[1] in keep]
    return items, all_classes


def _listing_path(archive: Path, key: dict, cache_dir: PathLike | None) -> Path:
    base = _cache_file(Path(cache_dir or default_cache_dir()), archive, dict(key, listing=True))
    return base.with_suffix(".json")


def _archive_listing(
    archive: Path, key: dict, cache: bool, cache_dir: PathLike | None
) -> list[tuple[str, str]] | None:
    """The cached `(class, member name)` listing of a split's images in `archive` (load
    order), or `None` (no cache)."""
    if not cache:
        return None
    try:
        return [
            tuple(item) for item in json.loads(_listing_path(archive, key, cache_dir).read_text())
        ]
    except (OSError, ValueError):
        return None  # missing or unreadable: list again


def _save_listing(archive: Path, key: dict, cache_dir: PathLike | None, listed: list) -> None:
    path = _listing_path(archive, key, cache_dir)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(listed))
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"Could not write cache {path} ({e}); continuing.", stacklevel=3)


def _check_selection(select: Select, n: int, where: str) -> np.ndarray:
    """`select(n)` as sorted, unique int64 indices in `[0, n)`, or a ValueError."""
    idx = np.asarray(select(n))
    if idx.ndim != 1 or (idx.size and not np.issubdtype(idx.dtype, np.integer)):
        raise ValueError(f"{where}: select(n) must return 1-D integer indices, got {idx!r}.")
    idx = idx.astype(np.int64)
    if not idx.size:
        raise ValueError(f"{where}: select(n={n}) chose no examples.")
    if idx.min() < 0 or idx.max() >= n or np.any(np.diff(idx) <= 0):
        raise ValueError(
            f"{where}: select(n={n}) must return increasing indices in [0, {n}) "
            f"(got {idx.size} indices from {idx.min()} to {idx.max()})."
        )
    return idx


def _class_index(found: set[str], classes: Sequence[str] | None, where: str) -> tuple[str, ...]:
    if classes is None:
        return tuple(sorted(found))
    unknown = sorted(found - set(classes))
    if unknown:
        raise DataFormatError(f"{where}: class folders {unknown} are not in classes={classes}.")
    return tuple(classes)


def _cache_file(cache_dir: Path, source: Path, key: dict) -> Path:
    digest = hashlib.sha1(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    stem = source.name.split(".")[0] or "data"
    return cache_dir / f"{stem}-{key.get('split') or 'all'}-{digest}.npz"


def _load_cache(path: Path) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]] | None:
    try:
        with np.load(path) as z:
            return z["images"], z["labels"], tuple(str(c) for c in z["class_names"])
    except FileNotFoundError:
        return None
    except Exception as e:  # a bad cache is rebuilt
        warnings.warn(f"Ignoring unreadable cache {path} ({e!r}).", stacklevel=3)
        return None


def _save_cache(path: Path, images: np.ndarray, labels: np.ndarray, classes: Sequence[str]):
    """Write atomically (temp file + rename), so concurrent loaders never see partial files."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, suffix=".tmp")
        with os.fdopen(fd, "wb") as f:
            np.savez(f, images=images, labels=labels, class_names=np.asarray(classes, str))
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except OSError as e:
        warnings.warn(f"Could not write cache {path} ({e}); continuing.", stacklevel=3)


def load_image_folder(
    root: PathLike,
    split: str | None = None,
    *,
    classes: Sequence[str] | None = None,
    channels: int | None = None,
    image_size: tuple[int, int] | None = None,
    cache: bool = True,
    cache_dir: PathLike | None = None,
    num_workers: int = 0,
    select: Select | None = None,
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """Load `<root>/<split>/<class>/*.{png,jpg,jpeg}` as `(images, labels, class_names)`.

    **Arguments:**

    - `root`: a directory, or a tar archive (`.tar`, `.tar.gz`, `.tgz`...) of such a tree,
      read directly without extracting it. One wrapping folder (`<root>/<name>/<split>/...`)
      is allowed. With `split=None` the layout is `<root>/<class>/*`.
    - `classes`: class names in label order; default: the sorted class folders of all splits
      (so train and test share one labelling).
    - `channels`: 1 (grayscale) or 3 (RGB); default: that of the first image.
    - `image_size`: `(H, W)` to resize every image to; default: all must share one size.
    - `cache`, `cache_dir`: cache decoded arrays as `.npz` in `cache_dir` (default
      [`default_cache_dir`][]) keyed by the files' names, sizes and mtimes.
    - `num_workers`: decoding processes; see [`decode_images`][].
    - `select`: `n -> increasing indices` into the split's `n` images (sorted by class folder,
      then file name): only those images are read and decoded (e.g. one process's shard,
      [`shard_indices`][]); the labelling is still that of the whole split. Cached apart.
    """
    root = Path(root).expanduser()
    if not root.exists():
        raise DataNotFoundError(f"Image folder or archive not found: {root}")
    archive = root.is_file()
    if archive:
        st = root.stat()
        stat_key: object = (st.st_size, st.st_mtime_ns)
    else:
        files, found, stat_key = _scan_directory(root, split)
    key = {
        "version": _CACHE_VERSION,
        "source": str(root.resolve()),
        "stat": stat_key,
        "split": split,
        "classes": list(classes) if classes is not None else None,
        "channels": channels,
        "image_size": list(image_size) if image_size is not None else None,
    }
    chosen = scanned = None
    if select is not None:
        # The selection keys its own cache (the whole split's cache is not read). An archive's
        # listing is cached too; without it, one pass reads the archive (its compressed images
        # are small next to the decoded ones) and only the selection is decoded.
        listed = _archive_listing(root, key, cache, cache_dir) if archive else files
        if listed is None:
            scanned = _scan_archive(root, split)
            listed = [(c, n) for c, n, _ in scanned[0]]
            if cache:
                _save_listing(root, key, cache_dir, listed)
        chosen = _check_selection(select, len(listed), str(root))
        key["select"] = hashlib.sha1(chosen.tobytes()).hexdigest()
    cache_path = _cache_file(Path(cache_dir or default_cache_dir()), root, key)
    if cache and (hit := _load_cache(cache_path)) is not None:
        return hit
    if archive:
        if scanned is None:
            keep = None if chosen is None else {listed[i][1] for i in chosen}
            scanned = _scan_archive(root, split, keep)
        elif chosen is not None:
            scanned = ([scanned[0][i] for i in chosen], scanned[1])
        members, found = scanned
        labelled = [(c, n, d) for c, n, d in members]
    else:
        labelled = [(c, p, p) for c, p in files]
        if chosen is not None:
            labelled = [labelled[i] for i in chosen]
    if not labelled:
        raise DataNotFoundError(f"No {'/'.join(IMAGE_EXTENSIONS)} images under {root}.")
    class_names = _class_index(found, classes, str(root))
    index = {c: i for i, c in enumerate(class_names)}
    labels = np.asarray([index[c] for c, _, _ in labelled], np.int32)
    items = [(f"{root}:{n}" if archive else n, src) for _, n, src in labelled]
    images = decode_images(items, channels=channels, image_size=image_size, num_workers=num_workers)
    if cache:
        _save_cache(cache_path, images, labels, class_names)
    return images, labels, class_names
