"""The front end's pure parts (run state, tick values, durations) under Node.js; skips when ``node`` is absent.

The drawing and the ComfyUI wiring are proven in a real browser by ``test_live_view.py``.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(not NODE, reason="no Node.js to run the web modules with")
WEB = Path(__file__).resolve().parents[2] / "web"

SCRIPT = """
const { RunState, formatDuration } = await import(process.argv[1] + "/run_state.js");
const { niceTicks } = await import(process.argv[1] + "/loss_chart.js");
const live = new RunState("r1");
live.applyProgress({ state: "training", step: 2, total: 4, it_s: 0.5, eta_s: 4, message: null,
  points: [{ step: 1, loss: 1.0, lr: 1e-4 }, { step: 2, loss: 0.9, lr: 1e-4 }],
  validation: [{ step: 2, val_loss: 0.95 }],
  images: [{ filename: "a.png", subfolder: "loraloom/runs/r1/samples", type: "output" }] });
live.applyProgress({ state: "training", step: 2, total: 4, points: [], validation: [], images: [] });
// A resumed run re-does step 2: the point is replaced, not drawn twice.
live.applyProgress({ state: "training", step: 2, total: 4, points: [{ step: 2, loss: 0.7, lr: 1e-4 }],
  validation: [], images: [] });
const reloaded = new RunState("r1");
reloaded.applyRecords([
  { type: "dataset", train: 3 },
  { type: "step", step: 1, loss: 1.0, lr: 1e-4 },
  { type: "validation", step: 1, val_loss: 0.9 },
  { type: "step", step: 2, loss: 0.8, lr: 1e-4 },
  { type: "preview", step: 2, path: "/out/loraloom/runs/r1/samples/step-00000002.png" },
  { type: "checkpoint", step: 2, path: "/out/loraloom/runs/r1/checkpoints/step-00000002" },
]);
console.log(JSON.stringify({
  live: { points: live.points, validation: live.validationPoints, images: live.images, status: live.status },
  reloaded: { points: reloaded.points, validation: reloaded.validationPoints, images: reloaded.images,
              status: reloaded.status },
  ticks: [niceTicks(1.36, 1.42, 4), niceTicks(0, 12, 5, 1), niceTicks(0, 1, 5, 1), niceTicks(2, 2, 4)],
  durations: [formatDuration(65), formatDuration(3725), formatDuration(null), formatDuration(-1)],
}));
"""


@pytest.fixture(scope="module")
def result() -> dict:
    out = subprocess.run([NODE, "--input-type=module", "-e", SCRIPT, str(WEB)], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_live_events_merge_by_step_and_keep_the_latest_previews(result):
    live = result["live"]
    assert live["points"] == [{"step": 1, "loss": 1.0, "lr": 1e-4}, {"step": 2, "loss": 0.7, "lr": 1e-4}]
    assert live["validation"] == [{"step": 2, "val_loss": 0.95}]
    assert live["images"] == [{"filename": "a.png", "subfolder": "loraloom/runs/r1/samples", "type": "output"}]
    assert live["status"]["state"] == "training" and live["status"]["total"] == 4


def test_metrics_records_rebuild_the_history_after_a_reload(result):
    reloaded = result["reloaded"]
    assert [p["step"] for p in reloaded["points"]] == [1, 2]
    assert reloaded["validation"] == [{"step": 1, "val_loss": 0.9}]
    assert reloaded["images"] == [{"filename": "step-00000002.png", "subfolder": "loraloom/runs/r1/samples",
                                   "type": "output"}]
    assert reloaded["status"]["state"] == "idle" and reloaded["status"]["step"] == 2


def test_ticks_are_round_and_cover_the_range(result):
    close_losses, steps, one_step, flat = result["ticks"]
    assert close_losses == [1.36, 1.38, 1.4, 1.42]
    assert steps == [0, 5, 10, 15]  # the chart keeps those <= the last step
    assert one_step == [0, 1]  # steps never get fractional ticks
    assert flat[0] < 2 < flat[-1]  # a constant loss still gets an axis around it
    assert result["durations"] == ["1:05", "1:02:05", "", ""]
