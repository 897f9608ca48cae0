"""Browser test: ComfyUI's own front end shows the live loss chart and the previews of a training run.

Starts a real ComfyUI on CPU (127.0.0.1 only) with the pack installed and tiny real-width Flux files (the host
tests' ``comfy`` fixture), opens the UI in headless Chromium (Debian's ``chromium`` and ``chromium-driver``,
driven by Selenium), loads each example workflow (the Flux one first), sets its widgets as the host test does
for a CPU, queues it, and checks what a person would see: the chart draws while the run is live, validation
points and the preview picture appear, and a page reload redraws the chart from the run's metrics.
Screenshots are kept in ``build/browser-test/``; ``LORALOOM_BROWSER_STEPS=12`` made the README's.

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its environment,
default this one) and Chromium is installed; skips otherwise.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
import time
from collections.abc import Iterator
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "host"))
# The server with the pack and the tiny model files, and the example's settings for a CPU: one copy, the host test's.
from test_node_pack import EXAMPLES, comfy, example, point_at_tiny_models  # noqa: E402, F401

REPO = Path(__file__).resolve().parents[2]
ARTIFACTS = REPO / "build" / "browser-test"
STEPS = int(os.environ.get("LORALOOM_BROWSER_STEPS", "6"))
VALIDATE_EVERY = max(2, STEPS // 8)
LOSS_RGB = (0x58, 0xA6, 0xFF)  # COLORS.loss in web/loss_chart.js
VALIDATION_RGB = (0xF2, 0xCC, 0x60)  # COLORS.validation


@pytest.fixture(scope="module")
def browser() -> Iterator[object]:
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                     "--window-size=1800,1200", "--hide-scrollbars",
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


JS_LOAD_AND_SET = """
const [workflow, widgets, done] = [arguments[0], arguments[1], arguments[arguments.length - 1]];
window.app.loadGraphData(workflow).then(() => {
  const missing = [];
  for (const [id, values] of Object.entries(widgets)) {
    const node = window.app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(values)) {
      const widget = node?.widgets?.find((w) => w.name === name);
      if (widget) widget.value = value;
      else missing.push(`${name} on node ${id} (${node?.type}: ${node?.widgets?.map((w) => w.name)})`);
    }
  }
  done(missing);
});
"""

JS_QUEUE = """
const done = arguments[arguments.length - 1];
window.app.queuePrompt(0, 1).then(() => done(window.app.lastNodeErrors), (error) => done(String(error)));
"""

# The live view of the Train steps node of the graph on screen.
JS_VIEW_ELEMENT = "window.app.graph.nodes.find((n) => n.comfyClass === 'LoraLoomTrainSteps')?.loraloomView?.el"
JS_VIEW = f"""
const view = {JS_VIEW_ELEMENT};
if (!view) return null;
const canvas = view.querySelector('canvas');
const pixels = canvas.getContext('2d').getImageData(0, 0, canvas.width, canvas.height).data;
const count = (rgb) => {{
  let n = 0;
  for (let i = 0; i < pixels.length; i += 4) {{
    if (Math.abs(pixels[i] - rgb[0]) + Math.abs(pixels[i + 1] - rgb[1]) + Math.abs(pixels[i + 2] - rgb[2]) < 24) n++;
  }}
  return n;
}};
return {{
  ...view.dataset,
  status: view.querySelector('.loraloom-status').innerText,
  loss_pixels: count(arguments[0]),
  validation_pixels: count(arguments[1]),
  previews: [...view.querySelectorAll('.loraloom-previews img')].map((img) => [img.complete, img.naturalWidth]),
}};
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
"""
# Where the node of one type is on the page now (CSS pixels: left, top, right, bottom).
JS_NODE_BOX = """
const app = window.app, ds = app.canvas.ds, box = app.canvas.canvas.getBoundingClientRect();
const [x, y, w, h] = app.graph.nodes.find((n) => n.comfyClass === arguments[0]).boundingRect;
const [left, top] = ds.convertOffsetToCanvas([x, y]), [right, bottom] = ds.convertOffsetToCanvas([x + w, y + h]);
return [box.left + left, box.top + top, box.left + right, box.top + bottom];
"""
JS_VIEW_BOX = f"const r = {JS_VIEW_ELEMENT}.getBoundingClientRect(); return [r.x, r.y, r.right, r.bottom]"


def screenshot(driver, name: str, fit: str | None = None, only_view: bool = False, zoom: float = 0.9) -> Path:
    """Fit the canvas to ``fit``'s node (or the whole graph) and save a PNG of it, or of the live view alone."""
    driver.execute_script(JS_FIT, fit, zoom)
    time.sleep(1.5)  # the canvas and the DOM widgets redraw on the next animation frames
    picture = Image.open(io.BytesIO(driver.get_screenshot_as_png()))
    if fit:
        box = driver.execute_script(JS_VIEW_BOX if only_view else JS_NODE_BOX, fit)
        scale, margin = driver.execute_script("return devicePixelRatio"), 0 if only_view else 16
        left, top, right, bottom = (round(v * scale) for v in box)
        picture = picture.crop((max(0, left - margin), max(0, top - margin),
                                min(picture.width, right + margin), min(picture.height, bottom + margin)))
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    path = ARTIFACTS / f"{name}.png"
    picture.save(path)
    return path


def widget_changes(name: str, tokenizers: dict[str, str]) -> dict[str, dict]:
    """Per node id, the widget values the host test gives the example's API form, plus previews for the view."""
    api = example(name)
    tiny = point_at_tiny_models(api, tokenizers, total_steps=STEPS, steps_per_queue=STEPS,
                                validate_every=VALIDATE_EVERY, preview_every=STEPS // 2,
                                preview_prompt="zwx, a red circle on a blue background")
    return {node_id: {k: v for k, v in node["inputs"].items() if api[node_id]["inputs"].get(k) != v}
            for node_id, node in tiny.items()}


@pytest.mark.parametrize("name", ["flux_train_then_compare_on_dev", "queued_training_with_previews",
                                  "booru_tags_kohaku_captions"])
def test_live_chart_and_previews_in_comfyui(comfy, browser, name):  # noqa: F811 (the fixture imported above)
    comfy.post("/api/settings/Comfy.TutorialCompleted", True)  # else a first visit opens the template browser
    comfy.post("/api/settings/LiteGraph.Canvas.MinFontSizeForLOD", 1)  # text stays drawn in zoomed-out screenshots
    earlier = set(comfy.get("/history"))
    open_ui(browser, comfy.url)
    workflow = json.loads((EXAMPLES / f"{name}.json").read_text())
    missing = browser.execute_async_script(JS_LOAD_AND_SET, workflow, widget_changes(name, comfy.tokenizers))
    assert missing == [], f"the UI form of {name} lacks widgets its API form has: {missing}"
    node_errors = browser.execute_async_script(JS_QUEUE)
    assert not node_errors, f"ComfyUI refused the prompt: {node_errors}"

    def view():
        return browser.execute_script(JS_VIEW, LOSS_RGB, VALIDATION_RGB)

    def finished() -> dict:
        return {k: v["status"] for k, v in comfy.get("/history").items() if k not in earlier}

    def failed() -> list:
        return [status for status in finished().values() if status["status_str"] == "error"]

    started = time.monotonic()
    while (live := view())["state"] != "training" or int(live["points"]) <= STEPS // 2:  # past the preview
        assert live["state"] not in ("done", "error", "cancelled") and not failed(), (live, failed())
        assert time.monotonic() - started < 600, f"no training steps drawn in 600 s: {live}"
        time.sleep(0.5)
    assert live["loss_pixels"] > 50, live  # the chart draws while the run is live
    screenshot(browser, f"{name}-live-view", "LoraLoomTrainSteps", only_view=True)
    screenshot(browser, f"{name}-train-node-live", "LoraLoomTrainSteps")

    # The rest of the graph runs on (export; in the Flux example, sampling with and without the adapter).
    wait_for(finished, 900, "the prompt to finish")
    assert not failed(), (failed(), comfy.log_text()[-3000:])
    done = view()
    assert done["state"] == "done", done
    assert int(done["points"]) == STEPS, done
    assert int(done["validation"]) == STEPS // VALIDATE_EVERY, done
    assert done["loss_pixels"] > 100 and done["validation_pixels"] > 20, done
    assert f"step {STEPS} / {STEPS}" in done["status"], done
    done = wait_for(lambda: (v := view())["previews"] and all(ok and width for ok, width in v["previews"]) and v,
                    30, "the preview image")
    assert len(done["previews"]) == 1, done
    screenshot(browser, f"{name}-train-node-done", "LoraLoomTrainSteps")
    screenshot(browser, f"{name}-graph", zoom=0.95)

    # A reload keeps the workflow (the front end restores it) and redraws the run from its metrics log.
    open_ui(browser, comfy.url)
    reloaded = wait_for(lambda: (v := view()) and int(v["points"]) == STEPS and v, 60, "the history after a reload")
    assert int(reloaded["validation"]) == STEPS // VALIDATE_EVERY
    assert reloaded["loss_pixels"] > 100, reloaded
    wait_for(lambda: view()["previews"], 30, "the previews after a reload")
    screenshot(browser, f"{name}-train-node-reloaded", "LoraLoomTrainSteps")
