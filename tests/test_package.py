"""Package metadata: one version, reported the same way everywhere."""

import importlib.metadata
import re

import pytest

import fractal_field as ff
from fractal_field.__main__ import main


def test_version_single_source(capsys):
    assert re.fullmatch(r"\d+\.\d+\.\d+", ff.__version__)
    assert importlib.metadata.version("fractal-field") == ff.__version__
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    assert capsys.readouterr().out.strip() == f"fractal-field {ff.__version__}"


def test_changelog_lists_this_version():
    from pathlib import Path

    changelog = Path(__file__).resolve().parents[1] / "CHANGELOG.md"
    assert f"## [{ff.__version__}]" in changelog.read_text()


@pytest.mark.parametrize(
    "path, load",
    [
        ("checkpoints/mnist_nano.eqx", ff.load_model),
        ("checkpoints/cifar10_small.eqx", ff.load_model),
        ("checkpoints/inpaint_field.eqx", ff.load_inpaint),
    ],
)
def test_shipped_checkpoints_load(path, load):
    """A new field in a module that models hold (a solver's hyperparameter) must not change the
    layout of the shipped checkpoints."""
    model = load(path)
    assert model is not None
