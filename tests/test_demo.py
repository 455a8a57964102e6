"""The web demo (`scripts/demo.py`): preparing drawings and uploads as MNIST digits and
pictures as CIFAR-10 images, the solves behind it, and the app itself in a real (headless
Chromium) browser.

`python tests/test_demo.py --screenshot docs/images/demo.png` starts the app, draws a digit
in the browser, classifies it and saves a screenshot of the page;
`--checkpoint checkpoints/cifar10_small.eqx` picks a CIFAR-10 test image instead.
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import jax
import numpy as np
import pytest
from PIL import Image

import fractal_field as ff

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


def _load_demo():
    spec = importlib.util.spec_from_file_location("ff_demo_script", ROOT / "scripts" / "demo.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


demo = _load_demo()
DIGITS = demo.example_images()
SEVEN = DIGITS["test image 0 (label 7)"]
PHOTOS = demo.example_images(demo.DATASETS["cifar10"])
CHECKPOINTS = {"mnist": "mnist_nano.eqx", "cifar10": "cifar10_small.eqx"}


# ----------------------------------------------------------------------------------------------
# Preparing inputs


def _canvas(digit: np.ndarray, *, at=(40, 60), scale=6, size=280, mode="white") -> np.ndarray:
    """`digit` (white on black, uint8) drawn dark on a `size` canvas as RGBA, offset `at`:
    `mode="white"` an opaque white background, `"transparent"` a transparent one,
    `"black"` white strokes on an opaque black background."""
    big = np.kron(digit, np.ones((scale, scale), np.uint8))
    ink = np.zeros((size, size), np.uint8)
    ink[at[0] : at[0] + big.shape[0], at[1] : at[1] + big.shape[1]] = big
    rgba = np.zeros((size, size, 4), np.uint8)
    if mode == "white":
        rgba[..., :3] = (255 - ink)[..., None]
        rgba[..., 3] = 255
    elif mode == "transparent":  # black strokes, opacity = ink
        rgba[..., 3] = ink
    else:
        rgba[..., :3] = ink[..., None]
        rgba[..., 3] = 255
    return rgba


def _centre_of_mass(image: np.ndarray) -> tuple[float, float]:
    m = image.astype(np.float64)
    ys, xs = np.indices(m.shape)
    return float((m * ys).sum() / m.sum()), float((m * xs).sum() / m.sum())


@pytest.mark.parametrize("mode", ["white", "transparent", "black"])
def test_prepare_drawing_mnist_layout(mode):
    out = demo.prepare_drawing({"composite": _canvas(SEVEN, mode=mode), "layers": []})
    assert out.shape == (28, 28) and out.dtype == np.uint8
    assert out.max() == 255 and out[0].max() == out[-1].max() == 0  # white on black
    rows = np.flatnonzero((out > 0.1 * 255).any(1))
    cols = np.flatnonzero((out > 0.1 * 255).any(0))
    assert max(rows[-1] - rows[0], cols[-1] - cols[0]) + 1 in (19, 20, 21)  # the 20x20 box
    cy, cx = _centre_of_mass(out)
    assert abs(cy - 14) <= 0.5 and abs(cx - 14) <= 0.5  # centred by mass (to a pixel), as MNIST


def test_prepare_drawing_invariances():
    """Where a digit is drawn, and whether dark on light, light on dark or on a transparent
    canvas, does not change what the model sees."""
    ref = demo.prepare_drawing(_canvas(SEVEN))
    np.testing.assert_array_equal(demo.prepare_drawing(_canvas(SEVEN, at=(100, 5))), ref)
    np.testing.assert_array_equal(demo.prepare_drawing(_canvas(SEVEN, mode="black")), ref)
    np.testing.assert_array_equal(demo.prepare_drawing(_canvas(SEVEN, mode="transparent")), ref)
    # and the digit is the MNIST one, laid out again
    assert np.corrcoef(ref.ravel(), SEVEN.ravel())[0, 1] > 0.9


@pytest.mark.parametrize(
    "value",
    [
        None,
        {"composite": None, "layers": []},
        np.full((280, 280, 4), 255, np.uint8),  # white canvas
        np.zeros((280, 280, 4), np.uint8),  # transparent canvas
        np.full((50, 50), 0.3),  # one flat grey
    ],
    ids=["none", "no-composite", "white", "transparent", "flat-grey"],
)
def test_prepare_drawing_empty(value):
    with pytest.raises(demo.InputError, match="empty"):
        demo.prepare_drawing(value)


def test_prepare_drawing_not_an_image():
    with pytest.raises(demo.InputError, match=r"shape \(3, 4, 5, 6\)"):
        demo.prepare_drawing(np.zeros((3, 4, 5, 6)))


def test_prepare_upload_mnist_digit(tmp_path):
    """A 28x28 MNIST digit is taken as it is; dark on light (RGB) it is inverted back."""
    path = tmp_path / "seven.png"
    Image.fromarray(SEVEN).save(path)
    np.testing.assert_array_equal(demo.prepare_upload(path), SEVEN)
    Image.fromarray(np.stack([255 - SEVEN] * 3, -1)).save(path)
    np.testing.assert_array_equal(demo.prepare_upload(path), SEVEN)
    big = tmp_path / "big.png"
    Image.fromarray(_canvas(SEVEN)).save(big)
    np.testing.assert_array_equal(demo.prepare_upload(big), demo.prepare_drawing(_canvas(SEVEN)))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("none", None, "No file uploaded"),
        ("notes.txt", b"not an image", "is not an image file"),
        ("truncated.png", b"\x89PNG\r\n\x1a\n\x00\x00", "is not an image file"),
        ("small.png", (16, 20), r"is 20x16 pixels: upload a 28x28"),
        ("huge.png", (30, 5000), r"is 5000x30 pixels: images up to 4096"),
        ("blank.png", (64, 64), "empty"),
    ],
)
def test_prepare_upload_bad_input(tmp_path, name, content, match):
    path = None
    if content is not None:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.fromarray(np.full(content, 255, np.uint8)).save(path)
    with pytest.raises(demo.InputError, match=match):
        demo.prepare_upload(path)


@pytest.mark.parametrize("name, shape", [("mnist", (28, 28)), ("cifar10", (32, 32, 3))])
def test_example_images_shipped(name, shape):
    """One test image of each class ships with the demo (no download)."""
    dataset = demo.DATASETS[name]
    images = demo.example_images(dataset)
    labels = [key.split("(label ")[1][:-1] for key in images]
    assert sorted(labels) == sorted(dataset.classes)  # one of each class
    assert dataset.shape == shape
    assert all(x.shape == shape and x.dtype == np.uint8 and x.std() > 0 for x in images.values())


@pytest.mark.parametrize("name", ["mnist", "cifar10"])
def test_dataset_of_checkpoint_and_normalisation(name):
    """The shipped checkpoints' training configs name their datasets, whose normalisation is
    the training data's: `(x / 255 - mean) / std` per channel, channels first."""
    meta = json.loads((ROOT / "checkpoints" / (CHECKPOINTS[name] + ".json")).read_text())
    dataset = demo.dataset_of(meta)
    assert dataset is demo.DATASETS[name]
    image = next(iter(demo.example_images(dataset).values()))
    mean, std = {
        "mnist": ([0.1307], [0.3081]),
        "cifar10": ([0.4914, 0.4822, 0.4465], [0.2470, 0.2435, 0.2616]),
    }[name]
    hwc = image.reshape(*image.shape[:2], -1).astype(np.float64) / 255
    ref = np.moveaxis((hwc - mean) / np.asarray(std), -1, 0)
    np.testing.assert_allclose(dataset.normalize(image), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("meta", [{}, {"config": {"data": {"name": "folder"}}}])
def test_dataset_of_unknown(meta):
    with pytest.raises(ValueError, match="models trained on mnist or cifar10"):
        demo.dataset_of(meta)


def test_prepare_photo_keeps_a_cifar_image(tmp_path):
    """A 32x32 image is taken as it is, as RGB (a grayscale one in three equal channels)."""
    image = PHOTOS["test image 3000 (label cat)"]
    path = tmp_path / "cat.png"
    Image.fromarray(image).save(path)
    np.testing.assert_array_equal(demo.prepare_photo(path), image)
    Image.fromarray(image[..., 1]).save(path)
    np.testing.assert_array_equal(demo.prepare_photo(path), np.stack([image[..., 1]] * 3, -1))


def test_prepare_photo_scales_and_centre_crops(tmp_path):
    """A 192x64 picture (red, green, blue thirds) is scaled to 96x32 and its centre 32x32, the
    green third, kept; a transparent picture is composited onto white."""
    wide = np.zeros((64, 192, 3), np.uint8)
    wide[:, :64, 0] = wide[:, 64:128, 1] = wide[:, 128:, 2] = 255
    path = tmp_path / "wide.png"
    Image.fromarray(wide).save(path)
    out = demo.prepare_photo(path)
    assert out.shape == (32, 32, 3) and out.dtype == np.uint8
    inner = out[:, 3:-3].astype(int)  # away from the thirds' edges, where the filter mixes
    np.testing.assert_allclose(inner, np.broadcast_to([0, 255, 0], inner.shape), atol=2)
    clear = np.zeros((40, 50, 4), np.uint8)
    clear[..., 3] = 0  # fully transparent (black) pixels
    Image.fromarray(clear).save(path)
    np.testing.assert_array_equal(demo.prepare_photo(path), np.full((32, 32, 3), 255))


@pytest.mark.parametrize(
    "name, content, match",
    [
        ("none", None, "No file uploaded: choose an image file .* of one object"),
        ("notes.txt", b"not an image", "is not an image file"),
        ("small.png", (20, 40), r"is 40x20 pixels: upload a picture at least 32 pixels a side"),
        ("huge.png", (40, 5000), r"is 5000x40 pixels: images up to 4096"),
    ],
)
def test_prepare_photo_bad_input(tmp_path, name, content, match):
    path = None
    if content is not None:
        path = tmp_path / name
        if isinstance(content, bytes):
            path.write_bytes(content)
        else:
            Image.fromarray(np.full((*content, 3), 128, np.uint8)).save(path)
    with pytest.raises(demo.InputError, match=match):
        demo.prepare_photo(path)


# ----------------------------------------------------------------------------------------------
# The solves


@pytest.fixture(scope="module")
def field_demo():
    return demo.FieldDemo(ff.load_model(ROOT / "checkpoints" / "mnist_nano.eqx"), max_budget=40)


@pytest.mark.parametrize("solver, budget", [("Naive", 3), ("Multigrid", 40)])
def test_budget_equals_a_solve_with_max_steps(field_demo, solver, budget):
    """A budget read off the recorded solve equals solving with `max_steps=budget`."""
    run = field_demo.run(SEVEN, solver, budget)
    x = demo.normalize(SEVEN[None, :, :, None], demo.MNIST_MEAN, demo.MNIST_STD)[0]
    model = field_demo.model
    logits, sol = model(x, solver=field_demo.solvers[solver], max_steps=budget)
    np.testing.assert_allclose(run.probabilities, jax.nn.softmax(logits), atol=1e-5)
    assert run.steps == int(sol.stats.num_steps)
    assert run.converged == bool(sol.result == ff.RESULTS.successful)
    assert run.trajectory.shape[0] == run.residuals.shape[0] == run.steps + 1
    assert run.residuals[-1] == pytest.approx(float(sol.stats.residual), rel=1e-4)
    if budget == 40:  # Multigrid converges within 40 steps on this digit, to the right class
        assert run.converged and run.steps < budget and run.prediction == 7
        assert "converged" in demo.summary(run)
    else:
        assert not run.converged and run.steps == budget
        assert "stopped by the budget" in demo.summary(run)


@pytest.mark.parametrize(
    "image, solver, budget, match",
    [
        (SEVEN[:20], "Naive", 3, r"uint8 \(28, 28\)"),
        (SEVEN.astype(np.float32), "Naive", 3, r"uint8 \(28, 28\)"),
        (SEVEN, "Broyden", 3, "Unknown solver 'Broyden'"),
        (SEVEN, "Naive", 0, r"budget must be a whole number of steps in 1..40"),
        (SEVEN, "Naive", 41, r"in 1..40"),
        (SEVEN, "Naive", 2.5, r"in 1..40"),
    ],
)
def test_run_bad_arguments(field_demo, image, solver, budget, match):
    with pytest.raises(demo.InputError, match=match):
        field_demo.run(image, solver, budget)


def test_field_demo_needs_a_digit_classifier():
    with pytest.raises(TypeError, match="Expected a FieldClassifier"):
        demo.FieldDemo(object())
    model = ff.make_model("nano", in_channels=3, key=jax.random.PRNGKey(0))
    with pytest.raises(ValueError, match="1 input channel and 10 classes, got 3 and 10"):
        demo.FieldDemo(model)


@pytest.mark.parametrize(
    "dataset, channels, classes, match",
    [
        ("cifar10", 1, 10, "CIFAR-10 images: it needs a model with 3 input channels and 10 "),
        ("cifar10", 3, 100, "3 input channels and 10 classes, got 3 and 100"),
        ("mnist", 3, 100, "MNIST digits: it needs a model with 1 input channel and 10 classes"),
        ("svhn", 3, 10, r"Unknown dataset 'svhn': choose one of \['mnist', 'cifar10'\]"),
    ],
)
def test_field_demo_refuses_other_models(dataset, channels, classes, match):
    model = ff.make_model(
        "tiny", in_channels=channels, num_classes=classes, key=jax.random.PRNGKey(0)
    )
    with pytest.raises(ValueError, match=match):
        demo.FieldDemo(model, dataset)


@pytest.fixture(scope="module")
def cifar_demo():
    return demo.FieldDemo.from_checkpoint(ROOT / "checkpoints" / "cifar10_small.eqx", max_budget=4)


def test_cifar_run_agrees_with_the_batched_model(cifar_demo, tmp_path):
    """A shipped CIFAR-10 image: valid probabilities over the ten classes, equal to those of
    the model's own (planar) batch solve of the same input with the same budget; and the
    pictures of the run."""
    assert cifar_demo.dataset.name == "cifar10" and cifar_demo.model.batch_solve == "planar"
    image = PHOTOS["test image 8000 (label ship)"]
    run = cifar_demo.run(image, "Naive", 3)
    p = run.probabilities
    assert p.shape == (10,) and np.all(p >= 0) and p.sum() == pytest.approx(1, abs=1e-5)
    assert run.label == demo.CIFAR10_CLASSES[run.prediction]
    assert run.steps == 3 and not run.converged and run.trajectory.shape[0] == 4
    x = cifar_demo.dataset.normalize(image)
    logits, sol = cifar_demo.model.batched(x[None], solver=ff.Naive(), max_steps=3)
    np.testing.assert_allclose(p, jax.nn.softmax(logits[0]), atol=1e-5)
    assert int(sol.stats.num_steps[0]) == 3
    assert f"**Prediction: {run.label}**" in demo.summary(run)
    with pytest.raises(demo.InputError, match=r"uint8 \(32, 32, 3\) image, got uint8 \(28, 28\)"):
        cifar_demo.run(SEVEN, "Naive", 3)
    pics = demo.pictures(run, tmp_path)
    np.testing.assert_array_equal(pics["input"][::8, ::8], image)
    with Image.open(pics["animation"]) as gif:
        assert gif.n_frames == run.steps + 1


def test_pictures(field_demo, tmp_path):
    run = field_demo.run(SEVEN, "Naive", 3)
    pics = demo.pictures(run, tmp_path)
    np.testing.assert_array_equal(pics["input"][::8, ::8], SEVEN)
    with Image.open(pics["animation"]) as gif:
        assert gif.n_frames == run.steps + 1  # one frame per iterate z_0 .. z_3
    for key in ("evolution", "residual"):
        assert pics[key].ndim == 3 and pics[key].shape[-1] == 3 and pics[key].std() > 0


# ----------------------------------------------------------------------------------------------
# The app in a browser


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running_app(*args: str, timeout: float = 240.0):
    """Start `scripts/demo.py` on a free localhost port; yields its URL; always stops it."""
    port = _free_port()
    env = dict(os.environ, GRADIO_ANALYTICS_ENABLED="False", PYTHONPATH=str(ROOT))
    fd, name = tempfile.mkstemp(prefix="ff-demo-", suffix=".log")
    os.close(fd)
    log = Path(name)
    cmd = [sys.executable, str(ROOT / "scripts" / "demo.py"), "--port", str(port), *args]
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"The demo exited ({proc.returncode}):\n{log.read_text()}")
            try:
                with urllib.request.urlopen(url, timeout=5) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"The demo did not answer in {timeout} s:\n{log.read_text()}")
            time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.unlink(missing_ok=True)


@contextlib.contextmanager
def browser_page():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_FLAGS)
        try:
            yield browser.new_page(viewport={"width": 1400, "height": 1000})
        finally:
            browser.close()


def _status(page, text: str, timeout_ms: int = 180_000) -> str:
    page.wait_for_function(
        "t => document.querySelector('#status').innerText.includes(t)",
        arg=text,
        timeout=timeout_ms,
    )
    return page.locator("#status").inner_text()


def _draw_seven(page) -> None:
    """Select the brush and draw a 7 with the mouse: a bar, then a diagonal down."""
    page.locator("#sketch button[aria-label='Brush']").click()
    box = page.locator("#sketch canvas").last.bounding_box()

    def at(u, v):
        return box["x"] + u * box["width"], box["y"] + v * box["height"]

    page.mouse.move(*at(0.3, 0.25))
    page.mouse.down()
    page.mouse.move(*at(0.7, 0.25), steps=15)
    page.mouse.move(*at(0.45, 0.8), steps=15)
    page.mouse.up()


def _top_class(page, classes=demo.MNIST_CLASSES) -> str:
    """The class `gr.Label` shows in its heading (the first line that is a class name)."""
    lines = [t.strip() for t in page.locator("#probs").inner_text().split("\n")]
    return next(t for t in lines if t in classes)


def _wait_for_images(page) -> None:
    for frames in ("#model-input", "#animation", "#evolution", "#residual"):
        # Fails (times out) unless an image loads there; Gradio may swap the <img> element
        # (the animation's) after it loads, so the check is the wait itself.
        page.wait_for_function(
            "s => [...document.querySelectorAll(s + ' img')]"
            ".some(e => e.complete && e.naturalWidth > 0)",
            arg=frames,
            timeout=60_000,
        )


def _pick(page, name: str) -> None:
    page.get_by_role("tab", name="Test image").click()
    page.locator("#pick input").click()
    page.get_by_role("option", name=name).click()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_demo_in_browser(tmp_path):
    """Empty canvas -> a message; a drawn 7 -> its class probabilities and the field's frames;
    a test image picked from the list -> its class; another solver -> solved again; an
    uploaded file that is not an image -> a message."""
    with running_app("--max-budget", "30") as url, browser_page() as page:
        page.goto(url, timeout=120_000)
        page.wait_for_selector("#sketch canvas", timeout=120_000)

        page.locator("#classify-drawing").click()
        assert "The canvas is empty" in _status(page, "Cannot classify")
        assert "Traceback" not in page.content()

        _draw_seven(page)
        page.locator("#classify-drawing").click()
        status = _status(page, "Prediction")
        assert "Prediction: 7" in status and "Anderson solver" in status
        assert _top_class(page) == "7"
        assert page.locator("#probs").inner_text().count("%") == 10  # all ten classes shown
        _wait_for_images(page)

        _pick(page, "test image 1 (label 2)")
        assert "Prediction: 2" in _status(page, "Prediction: 2")
        assert _top_class(page) == "2"

        page.locator("#solver").get_by_text("Multigrid").click()
        assert "Prediction: 2" in _status(page, "Multigrid solver")

        page.get_by_role("tab", name="Upload").click()
        notes = tmp_path / "notes.txt"
        notes.write_text("not an image")
        page.locator("#upload input[type=file]").set_input_files(str(notes))
        assert "'notes.txt' is not an image file" in _status(page, "Cannot classify")
        assert "Traceback" not in page.content()


@pytest.mark.slow
@pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium")
def test_demo_cifar10_in_browser():
    """The CIFAR-10 model: no sketchpad; a picked test image -> a prediction among the ten
    CIFAR-10 classes, the same in the text and the probabilities, and the field's frames."""
    checkpoint = str(ROOT / "checkpoints" / "cifar10_small.eqx")
    with (
        running_app("--checkpoint", checkpoint, "--max-budget", "30") as url,
        browser_page() as page,
    ):
        page.goto(url, timeout=120_000)
        page.wait_for_selector("#pick", timeout=120_000)
        assert page.locator("#sketch").count() == 0
        assert "drawing is for digit models only" in page.content()
        _pick(page, "test image 8000 (label ship)")
        status = _status(page, "Prediction")
        top = _top_class(page, demo.CIFAR10_CLASSES)
        assert f"Prediction: {top}" in status and "Anderson solver" in status
        assert page.locator("#probs").inner_text().count("%") == 10
        _wait_for_images(page)
        assert "Traceback" not in page.content()


def _screenshot(path: str, checkpoint: str | None) -> None:
    args = () if checkpoint is None else ("--checkpoint", checkpoint)
    with running_app(*args) as url, browser_page() as page:
        page.goto(url, timeout=120_000)
        page.wait_for_selector("#status", timeout=120_000)
        if page.locator("#sketch").count():
            page.wait_for_selector("#sketch canvas", timeout=120_000)
            _draw_seven(page)
            page.locator("#classify-drawing").click()
        else:
            _pick(page, "test image 8000 (label ship)")
        _status(page, "Prediction")
        _wait_for_images(page)
        page.wait_for_timeout(3000)
        page.wait_for_function(  # every event done (a pick may fire twice)
            "() => !document.body.innerText.includes('processing')", timeout=120_000
        )
        _wait_for_images(page)
        page.wait_for_timeout(2000)
        page.screenshot(path=path, full_page=True)
    print(f"Wrote {path}")


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description="Screenshot of the web demo.")
    parser.add_argument("--screenshot", required=True, help="PNG file to write")
    parser.add_argument("--checkpoint", default=None, help="the demo's model (default MNIST)")
    args = parser.parse_args()
    _screenshot(args.screenshot, args.checkpoint)
