"""The README's API example runs as written (it is the first thing a user copies)."""

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _api_example() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## The API in brief", 1)
    assert len(section) == 2, "README.md has no 'The API in brief' section"
    blocks = re.findall(r"```python\n(.*?)```", section[1], flags=re.S)
    assert blocks, "README.md's API section has no python block"
    return blocks[0]


def test_readme_api_example_runs(monkeypatch, capsys):
    monkeypatch.chdir(ROOT)  # the example loads checkpoints/ relative to the repository
    namespace: dict = {}
    exec(compile(_api_example(), "README.md", "exec"), namespace)  # noqa: S102
    import fractal_field as ff

    sol = namespace["sol"]
    assert sol.result == ff.RESULTS.successful
    # f(z) = tanh(A z + b) with A the anti-diagonal 0.9: z* solves z = tanh(0.9 z + 1) (by symmetry)
    z = float(sol.value[0])
    assert z == pytest.approx(float(__import__("numpy").tanh(0.9 * z + 1.0)), abs=1e-5)
    assert namespace["logits"].shape == (2, 10)
    assert bool((namespace["field"].result == ff.RESULTS.successful).all())
    assert namespace["grad_A"].shape == (4, 4)
