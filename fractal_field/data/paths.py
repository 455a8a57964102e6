"""Where data lives: data-directory resolution and the decoded-array cache directory.

Search order of [`candidate_data_dirs`][]:

1. the explicit `data_dir` argument (e.g. from a `--data-dir` flag); if given, *only* it;
2. the environment variable `FRACTAL_FIELD_DATA`;
3. `./data` (relative to the current directory);
4. `../shared/data` relative to the current directory;
5. `data/` and `../shared/data` relative to the repository root (for a source checkout), so
   the project's scripts and tests find shared data from any working directory.
"""

from __future__ import annotations

import os
from pathlib import Path

from .errors import DataNotFoundError

DATA_ENV_VAR = "FRACTAL_FIELD_DATA"
CACHE_ENV_VAR = "FRACTAL_FIELD_CACHE"

HOW_TO_PROVIDE = (
    "Provide the data in one of these ways:\n"
    "  - pass `--data-dir DIR` to the scripts (or `data_dir=DIR` in Python);\n"
    f"  - set the environment variable {DATA_ENV_VAR}=DIR;\n"
    "  - put it under ./data or ../shared/data;\n"
    "  - or, with internet access, give no data directory (source='auto', the default) or\n"
    "    use source='tfds', so that tensorflow_datasets downloads it."
)


def repo_root() -> Path | None:
    """The root of the source checkout this package lives in, or `None` if installed."""
    root = Path(__file__).resolve().parents[2]
    return root if (root / "pyproject.toml").is_file() else None


def candidate_data_dirs(data_dir: str | os.PathLike | None = None) -> list[tuple[Path, str]]:
    """All data directories to search, in priority order, as `(path, why)` pairs.

    Paths need not exist. An explicit `data_dir` is the only candidate.
    """
    if data_dir is not None:
        return [(Path(data_dir).expanduser(), "data_dir argument")]
    out: list[tuple[Path, str]] = []
    env = os.environ.get(DATA_ENV_VAR)
    if env:
        out.append((Path(env).expanduser(), f"${DATA_ENV_VAR}"))
    out.append((Path("data"), "./data"))
    out.append((Path("..") / "shared" / "data", "../shared/data (from the current directory)"))
    root = repo_root()
    if root is not None:
        out.append((root / "data", "data/ (from the repository root)"))
        out.append((root.parent / "shared" / "data", "../shared/data (from the repository root)"))
    seen: set[Path] = set()
    unique = []
    for path, why in out:
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            unique.append((path, why))
    return unique


def resolve_data_dir(data_dir: str | os.PathLike | None = None) -> Path:
    """The first existing directory of [`candidate_data_dirs`][].

    **Raises:** `DataNotFoundError` listing every place looked if none exists.
    """
    candidates = candidate_data_dirs(data_dir)
    for path, _ in candidates:
        if path.is_dir():
            return path
    looked = "\n".join(f"  - {p.resolve()}  ({why})" for p, why in candidates)
    raise DataNotFoundError(f"No data directory found. Looked in:\n{looked}\n{HOW_TO_PROVIDE}")


def default_cache_dir() -> Path:
    """Directory for decoded-array caches.

    `$FRACTAL_FIELD_CACHE`, else `$XDG_CACHE_HOME/fractal_field`, else `~/.cache/fractal_field`.
    """
    env = os.environ.get(CACHE_ENV_VAR)
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    base = Path(xdg).expanduser() if xdg else Path.home() / ".cache"
    return base / "fractal_field"
