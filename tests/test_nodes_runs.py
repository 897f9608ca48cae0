"""Run names, run folders, the metrics route's body and the progress payloads, without ComfyUI."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from loraloom.nodes.progress import ProgressReport
from loraloom.nodes.runs import LossHistory, RunNameError, check_run_name, metrics_response, run_dir


@pytest.mark.parametrize("name", ["a", "my-lora", "v1.2_final", "x" * 64, "-dash-first"])
def test_plain_run_names_are_accepted(name):
    assert check_run_name(name) == name


@pytest.mark.parametrize("name", ["", ".hidden", "..", "../x", "a/b", "a\\b", "x" * 65, "sp ace", "ü", "a\n"])
def test_names_that_are_not_plain_folders_are_refused(name):
    with pytest.raises(RunNameError, match="run name"):
        check_run_name(name)


def _write_run(output: Path, name: str, records: list[dict]) -> Path:
    folder = run_dir(output, name)
    folder.mkdir(parents=True)
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records) + '{"half": ')
    return folder


def test_metrics_response_returns_every_complete_record(tmp_path):
    records = [{"type": "step", "step": 1, "loss": 0.5, "lr": 1e-4}, {"type": "validation", "step": 1,
                                                                       "val_loss": 0.4}]
    _write_run(tmp_path, "run-a", records)
    assert metrics_response(tmp_path, "run-a") == {"run": "run-a", "events": records}


@pytest.mark.parametrize("name", ["missing", "..", "../../etc", "%2e%2e", ".", "cache/..", "/etc/passwd"])
def test_metrics_response_refuses_anything_but_an_existing_run(tmp_path, name):
    _write_run(tmp_path, "run-a", [])
    (tmp_path / "loraloom" / "secret").mkdir()
    assert metrics_response(tmp_path, name) is None


def test_a_link_out_of_the_runs_folder_is_not_a_run(tmp_path):
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    (outside / "metrics.jsonl").write_text('{"step": 1}\n')
    root = run_dir(tmp_path, "x").parent
    root.mkdir(parents=True)
    (root / "escape").symlink_to(outside, target_is_directory=True)
    assert metrics_response(tmp_path, "escape") is None


def test_loss_history_splits_train_and_validation_records():
    history = LossHistory.from_records([
        {"type": "dataset", "train": 3}, {"type": "step", "step": 1, "loss": 0.9, "lr": 1e-3},
        {"type": "step", "step": 2, "loss": 0.7, "lr": 1e-3}, {"type": "validation", "step": 2, "val_loss": 0.8}])
    assert history == LossHistory((1, 2), (0.9, 0.7), (2,), (0.8,))


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_payloads_follow_the_contract(tmp_path):
    sent, clock = [], Clock()
    report = ProgressReport("7", "run-a", total=10, output_dir=tmp_path, send=sent.append, clock=clock)
    report.state("loading")
    report.on_engine_event({"type": "resume", "step": 2, "path": "x"})
    for step, loss in ((3, 0.5), (4, 0.4), (5, 0.3)):
        report.on_engine_event({"type": "step", "step": step, "loss": loss, "lr": 1e-4})
        clock.now += 2.0
    preview = tmp_path / "loraloom" / "runs" / "run-a" / "samples" / "step-00000005.png"
    report.on_engine_event({"type": "validation", "step": 5, "val_loss": 0.35})
    report.on_engine_event({"type": "preview", "step": 5, "path": str(preview)})
    report.on_engine_event({"type": "checkpoint", "step": 5, "path": "x"})

    keys = {"node", "run", "state", "step", "total", "it_s", "eta_s", "points", "validation", "images", "message"}
    assert all(set(p) == keys and p["node"] == "7" and p["run"] == "run-a" and p["total"] == 10 for p in sent)
    assert [p["state"] for p in sent] == ["loading", "loading", "training", "training", "training", "training",
                                         "training"]
    assert "step 2" in sent[1]["message"]
    assert [p["points"] for p in sent[2:5]] == [[{"step": s, "loss": v, "lr": 1e-4}] for s, v in
                                                ((3, 0.5), (4, 0.4), (5, 0.3))]
    assert sent[2]["it_s"] is None  # the first step of an execution includes warm-up: no rate yet
    assert sent[4]["it_s"] == pytest.approx(0.5) and sent[4]["eta_s"] == pytest.approx(10.0)
    assert sent[5]["validation"] == [{"step": 5, "val_loss": 0.35}] and sent[5]["points"] == []
    assert sent[6]["images"] == [{"filename": "step-00000005.png", "subfolder": "loraloom/runs/run-a/samples",
                                  "type": "output"}]
    assert report.saved_step == 5
    json.dumps(sent)  # the server sends them as JSON


def test_node_package_imports_without_comfyui():
    code = ("import sys, loraloom.nodes; bad = sorted(m for m in sys.modules if m.split('.')[0] in "
            "{'comfy', 'comfy_api', 'folder_paths', 'server', 'nodes', 'execution'}); assert not bad, bad; "
            "assert all(k.startswith('LoraLoom') for k in loraloom.nodes.NODE_CLASS_MAPPINGS)")
    subprocess.run([sys.executable, "-c", code], check=True)
