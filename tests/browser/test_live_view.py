"""Browser test: ComfyUI's own front end shows the live loss chart and the previews of a training run.

Starts a real ComfyUI on CPU (127.0.0.1 only) with the pack linked into its ``custom_nodes``, opens the UI in
headless Chromium (Debian's ``chromium`` and ``chromium-driver``, driven by Selenium), loads the Flux example
workflow, points its model widgets at tiny files, queues it, and checks what a person would see: the chart
draws, validation points and the preview picture appear, and a page reload redraws the chart from the run's
metrics. Screenshots are kept in ``build/browser-test/`` (``LORALOOM_BROWSER_STEPS=40`` trains longer, for
the README's pictures).

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its environment,
default this one) and Chromium is installed; skips otherwise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
CHROMIUM = shutil.which("chromium")
CHROMEDRIVER = shutil.which("chromedriver")
pytestmark = [
    pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against"),
    pytest.mark.skipif(not (CHROMIUM and CHROMEDRIVER),
                       reason="no Chromium: apt-get install chromium chromium-driver"),
]
webdriver = pytest.importorskip("selenium.webdriver", reason="selenium not installed (pip install -e '.[dev]')")

from PIL import Image  # noqa: E402

from loraloom.training.demo_data import write_shapes_dataset  # noqa: E402
from loraloom.training.tiny_models import TINY, build_flux, write_flux_files  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "browser-test"
RUN = "browser-test"
STEPS = int(os.environ.get("LORALOOM_BROWSER_STEPS", "6"))
VALIDATE_EVERY = max(2, STEPS // 8)
LOSS_RGB = (0x58, 0xA6, 0xFF)  # COLORS.loss in web/loss_chart.js
VALIDATION_RGB = (0xF2, 0xCC, 0x60)  # COLORS.validation


@dataclass(frozen=True)
class Server:
    url: str
    base: Path  # ComfyUI's --base-directory: custom_nodes/, models/, input/, output/


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, data: object = None) -> object:
    body = None if data is None else json.dumps(data).encode()
    with urllib.request.urlopen(urllib.request.Request(url, data=body), timeout=30) as response:
        return json.loads(response.read() or b"null")


def prepare_base(base: Path) -> dict[str, str]:
    """Tiny Flux files in ComfyUI's model folders, a captioned dataset in its input folder, the pack linked in.

    Returns the widget values that point the example's nodes at them.
    """
    files = write_flux_files(build_flux(TINY, seed=0, extra_words=("zwx",)), base / "tiny", diffusers=False)
    for role, folder in (("transformer", "diffusion_models"), ("text_encoder", "text_encoders"),
                         ("text_encoder_2", "text_encoders"), ("vae", "vae")):
        (base / "models" / folder).mkdir(parents=True, exist_ok=True)
        shutil.copy(files[role], base / "models" / folder / files[role].name)
    write_shapes_dataset(base / "input" / "shapes", count=6, size=64, seed=0, trigger="zwx")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "lora-loom").symlink_to(REPO, target_is_directory=True)
    return {"transformer": files["transformer"].name, "clip_l": files["text_encoder"].name,
            "t5": files["text_encoder_2"].name, "vae": files["vae"].name,
            "clip_tokenizer": str(files["tokenizer"]), "t5_tokenizer": str(files["tokenizer_2"])}


@pytest.fixture(scope="module")
def tiny_models_base(tmp_path_factory) -> tuple[Path, dict[str, str]]:
    base = tmp_path_factory.mktemp("comfyui")
    return base, prepare_base(base)


@pytest.fixture(scope="module")
def server(tiny_models_base) -> Iterator[Server]:
    base, _ = tiny_models_base
    port = free_port()
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "HF_HUB_OFFLINE": "1"}
    log = open(base / "comfyui.log", "w")  # noqa: SIM115 (closed at teardown)
    process = subprocess.Popen(
        [python, str(Path(__file__).with_name("run_comfyui.py")), COMFYUI_PATH, "--cpu", "--listen", "127.0.0.1",
         "--port", str(port), "--disable-auto-launch", "--base-directory", str(base),
         "--database-url", "sqlite:///:memory:"], env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            assert process.poll() is None, f"ComfyUI exited: {(base / 'comfyui.log').read_text()[-3000:]}"
            try:
                get_json(f"{url}/object_info/LoraLoomTrainSteps")
                break
            except (urllib.error.URLError, ConnectionError):
                assert time.monotonic() < deadline, "ComfyUI did not start in 300 s"
                time.sleep(1)
        # A first visit opens the template browser over the graph; this user has seen it.
        get_json(f"{url}/api/settings/Comfy.TutorialCompleted", True)
        yield Server(url, base)
    finally:
        process.terminate()
        try:
            process.wait(30)
        except subprocess.TimeoutExpired:  # a training step in flight does not stop for SIGTERM
            process.kill()
            process.wait()
        log.close()


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1600,1100", "--hide-scrollbars",
                     # The UI asks the internet for release notes; only 127.0.0.1 resolves.
                     "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1"):
        options.add_argument(argument)
    driver = webdriver.Chrome(service=webdriver.ChromeService(CHROMEDRIVER), options=options)
    driver.set_script_timeout(60)
    yield driver
    driver.quit()


def open_ui(driver, url: str) -> None:
    driver.get(url)
    wait_for(lambda: driver.execute_script("return !!(window.app?.graph && window.LiteGraph)"), 120, "the UI")


def wait_for(condition, timeout: float, what: str):
    deadline = time.monotonic() + timeout
    while not (value := condition()):
        assert time.monotonic() < deadline, f"waited {timeout} s for {what}"
        time.sleep(0.5)
    return value


JS_LOAD_AND_POINT = """
const [workflow, overrides, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
window.app.loadGraphData(workflow).then(() => {
  const missing = [];
  for (const [type, values] of Object.entries(overrides)) {
    const nodes = window.app.graph.nodes.filter((n) => n.comfyClass === type);
    if (!nodes.length) missing.push(type);
    for (const node of nodes) {
      for (const [name, value] of Object.entries(values)) {
        const widget = node.widgets?.find((w) => w.name === name);
        if (widget) widget.value = value; else missing.push(`${type}.${name}`);
      }
    }
  }
  done(missing);
});
"""

JS_VIEW = """
const view = document.querySelector('.loraloom-view');
if (!view) return null;
const canvas = view.querySelector('canvas');
const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const count = (rgb) => {
  let n = 0;
  for (let i = 0; i < pixels.length; i += 4) {
    if (Math.abs(pixels[i] - rgb[0]) + Math.abs(pixels[i + 1] - rgb[1]) + Math.abs(pixels[i + 2] - rgb[2]) < 24) n++;
  }
  return n;
};
return {
  ...view.dataset,
  status: view.querySelector('.loraloom-status').innerText,
  loss_pixels: count(arguments[0]),
  validation_pixels: count(arguments[1]),
  previews: [...view.querySelectorAll('.loraloom-previews img')].map((img) => [img.complete, img.naturalWidth]),
};
"""

# Fit the canvas view to the nodes of one type, or to the whole graph, so that screenshots show them whole.
JS_FIT = """
const app = window.app;
const nodes = arguments[0] ? app.graph.nodes.filter((n) => n.comfyClass === arguments[0]) : app.graph.nodes;
const rects = nodes.map((n) => n.boundingRect);
const [x0, y0] = [Math.min(...rects.map((r) => r[0])), Math.min(...rects.map((r) => r[1]))];
const x1 = Math.max(...rects.map((r) => r[0] + r[2]));
const y1 = Math.max(...rects.map((r) => r[1] + r[3]));
app.canvas.ds.fitToBounds([x0, y0, x1 - x0, y1 - y0], {zoom: arguments[1]});
app.canvas.setDirty(true, true);
const ds = app.canvas.ds, box = app.canvas.canvas.getBoundingClientRect();
const [left, top] = ds.convertOffsetToCanvas([x0, y0]), [right, bottom] = ds.convertOffsetToCanvas([x1, y1]);
return [box.left + left, box.top + top, box.left + right, box.top + bottom];
"""
JS_RECT = "const r = document.querySelector(arguments[0]).getBoundingClientRect(); return [r.x, r.y, r.right, r.bottom]"


def screenshot(driver, name: str, fit: str | None = None, crop: str | None = None, zoom: float = 0.9) -> Path:
    """Fit the view to ``fit``'s node (or the whole graph) and save a PNG, cropped to that node or to ``crop``."""
    box = driver.execute_script(JS_FIT, fit, zoom)
    time.sleep(1.5)  # the canvas and the DOM widgets redraw on the next animation frames
    if crop:
        box = driver.execute_script(JS_RECT, crop)
    picture = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    if fit or crop:
        scale, margin = driver.execute_script("return devicePixelRatio"), 0 if crop else 24
        left, top, right, bottom = (round(v * scale) for v in box)
        picture = picture.crop((max(0, left - margin), max(0, top - margin),
                                min(picture.width, right + margin), min(picture.height, bottom + margin)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    picture.save(path)
    return path


def flux_example() -> dict:
    candidates = sorted((REPO / "example_workflows").glob("*flux*.json"))
    assert candidates, "no Flux example in example_workflows/"
    return json.loads(candidates[0].read_text())


def test_live_chart_and_previews_in_comfyui(server: Server, browser, tiny_models_base):
    _, model_widgets = tiny_models_base
    overrides = {
        "LoraLoomModel": {**model_widgets, "precision": "fp32", "t5_max_length": 16},
        "LoraLoomDatasetFolder": {"folder": "shapes", "trigger": "zwx", "resolution": 64, "validation_images": 2},
        "LoraLoomAdapter": {"rank": 4},
        "LoraLoomTrainSteps": {"run_name": RUN, "total_steps": STEPS, "steps_per_queue": STEPS, "batch_size": 2,
                               "mixed_precision": "fp32", "gradient_checkpointing": False,
                               "validate_every": VALIDATE_EVERY, "preview_every": STEPS // 2, "preview_steps": 2},
    }
    open_ui(browser, server.url)
    missing = browser.execute_async_script(JS_LOAD_AND_POINT, flux_example(), overrides)
    assert missing == [], f"the Flux example lacks nodes or widgets the test sets: {missing}"
    browser.execute_script("window.app.queuePrompt(0, 1)")

    def finished():
        view = browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB)
        return view if view and view["state"] in ("done", "error", "cancelled") else None

    started = time.monotonic()
    while (view := browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB))["state"] != "training" or \
            int(view["points"]) < STEPS // 2:
        assert view["state"] not in ("done", "error", "cancelled"), view
        assert time.monotonic() - started < 600, f"no training steps drawn in 600 s: {view}"
        time.sleep(0.5)
    assert view["loss_pixels"] > 50, view  # the chart draws while the run is live
    screenshot(browser, "live-view", "LoraLoomTrainSteps", crop=".loraloom-view", zoom=0.8)
    screenshot(browser, "train-node-live", "LoraLoomTrainSteps")

    view = wait_for(finished, 900, "the run to finish")
    assert view["state"] == "done", view
    assert int(view["points"]) == STEPS, view
    assert int(view["validation"]) == STEPS // VALIDATE_EVERY, view
    assert view["loss_pixels"] > 100 and view["validation_pixels"] > 20, view
    assert f"step {STEPS} / {STEPS}" in view["status"], view
    view = wait_for(lambda: (v := browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB))["previews"]
                    and all(ok and width > 0 for ok, width in v["previews"]) and v, 30, "the preview images")
    assert len(view["previews"]) == 1, view
    screenshot(browser, "train-node-done", "LoraLoomTrainSteps")
    screenshot(browser, "flux-example-graph", zoom=0.95)

    # A reload keeps the workflow (the front end restores it) and redraws the run from its metrics log.
    open_ui(browser, server.url)
    reloaded = wait_for(lambda: (v := browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB))
                        and int(v["points"]) == STEPS and v, 60, "the history after a reload")
    assert int(reloaded["validation"]) == STEPS // VALIDATE_EVERY
    assert reloaded["loss_pixels"] > 100, reloaded
    wait_for(lambda: browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB)["previews"], 30, "reloaded previews")
    screenshot(browser, "train-node-reloaded", "LoraLoomTrainSteps")
