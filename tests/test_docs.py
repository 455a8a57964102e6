"""The documentation site's structure: nav pages exist and the API reference covers every public
name (the site itself is built by `mkdocs build --strict` in CI, not here)."""

import importlib
import importlib.util
import re
import shutil
import types
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DIRECTIVE = re.compile(r"^:::\s+(\S+)", re.MULTILINE)


def nav_pages() -> list[str]:
    """The page paths listed under `nav:` in mkdocs.yml (`Title: path.md` or `- path.md`)."""
    text = (ROOT / "mkdocs.yml").read_text()
    nav = text.split("\nnav:\n", 1)[1]
    pages = []
    for line in nav.splitlines():
        if line and not line.startswith((" ", "-")):
            break  # the next top-level key
        m = re.search(r"(?:^\s*-\s*|:\s+)([\w./-]+\.(?:md|ipynb))\s*$", line)
        if m:
            pages.append(m.group(1))
    return pages


def api_targets() -> set[str]:
    return {t for page in (DOCS / "api").glob("*.md") for t in DIRECTIVE.findall(page.read_text())}


def public_names(module: types.ModuleType) -> set[str]:
    names = getattr(module, "__all__", None)
    if names is None:
        names = [n for n in dir(module) if not n.startswith("_")]
    # Subpackages (`fractal_field.data`, `.viz`) have their own pages, checked on their own.
    return {n for n in names if not isinstance(getattr(module, n), types.ModuleType)}


def test_nav_pages_exist():
    pages = nav_pages()
    assert "index.md" in pages and any(p.startswith("api/") for p in pages)
    missing = [p for p in pages if not (DOCS / p).is_file()]
    assert not missing, f"mkdocs.yml's nav lists pages that do not exist under docs/: {missing}"
    assert len(set(pages)) == len(pages), "a page is listed twice in the nav"


def test_every_notebook_is_in_the_site():
    # The notebooks live in notebooks/ (executed by tests/test_notebooks.py); the site reads
    # them through links in docs/notebooks/.
    notebooks = sorted(p.name for p in (ROOT / "notebooks").glob("*.ipynb"))
    assert notebooks
    pages = nav_pages()
    for name in notebooks:
        assert f"notebooks/{name}" in pages, f"{name} is not in mkdocs.yml's nav"
        linked = DOCS / "notebooks" / name
        assert linked.resolve() == (ROOT / "notebooks" / name).resolve(), linked


@pytest.mark.parametrize(
    "module",
    [
        "fractal_field",
        "fractal_field.data",
        "fractal_field.viz",
        "fractal_field.fractal",
        "fractal_field.atlas",
    ],
)
def test_api_reference_covers_every_public_name(module):
    mod = importlib.import_module(module)
    names = public_names(mod)
    assert names
    documented = api_targets()
    missing = sorted(n for n in names if f"{module}.{n}" not in documented)
    assert not missing, f"public names of {module} missing from docs/api/*.md: {missing}"


def test_api_reference_targets_exist():
    for target in sorted(api_targets()):
        module, _, name = target.rpartition(".")
        assert hasattr(importlib.import_module(module), name), target


@pytest.mark.parametrize("page", sorted(p.name for p in DOCS.glob("*.md")))
def test_python_examples_are_valid_python(page):
    # Running the examples trains, loads checkpoints and reads data: too slow for the suite.
    # Here they must at least parse.
    text = (DOCS / page).read_text()
    for i, block in enumerate(re.findall(r"^```python\n(.*?)^```", text, re.S | re.M)):
        compile(block, f"{page}, python block {i}", "exec")


def _visualize_script():
    spec = importlib.util.spec_from_file_location("visualize", ROOT / "scripts" / "visualize.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_figure_titles_show_no_absolute_paths(tmp_path):
    # The docs' figures come from scripts/visualize.py, whose titles name the checkpoint file.
    ckpt = tmp_path / "deep" / "folder" / "mnist_nano.eqx"
    ckpt.parent.mkdir(parents=True)
    for suffix in ("", ".json"):
        shutil.copy(ROOT / "checkpoints" / ("mnist_nano.eqx" + suffix), str(ckpt) + suffix)
    _, _, note = _visualize_script().load_model_or_random(ckpt)
    assert note == "trained model mnist_nano.eqx"


def test_visualize_accepts_models_trained_on_synthetic_data():
    ds = _visualize_script().load_images("synthetic", None, image_size=8, channels=1)
    assert len(ds) == 200 and ds.image_shape == (1, 8, 8)


def test_visualize_stand_in_images_have_the_training_size(tmp_path, monkeypatch):
    """Without the test data, a CIFAR-10 model is shown synthetic 32x32 RGB images."""
    import fractal_field._train as train

    ckpt = tmp_path / "cifar.eqx"
    ckpt.write_bytes(b"")
    meta = {"config": {"data": {"name": "cifar10"}}}
    monkeypatch.setattr(train, "load_model", lambda path, with_meta: ("model", meta))
    script = _visualize_script()
    _, name, _, size = script._load(ckpt, "nano")
    assert (name, size) == ("cifar10", 32)
    ds = script.load_images(name, str(tmp_path), size, 3)  # no CIFAR-10 files there
    assert ds.image_shape == (3, 32, 32)
