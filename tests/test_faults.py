"""Faults a long run meets: a full disk, NaN/inf losses, and (for security) no network at run time."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraloom.loaders.files import WriteError
from loraloom.training import checkpoint
from loraloom.training.checkpoint import CheckpointWriteError
from loraloom.training.metrics import read_metrics
from loraloom.training.session import NonFiniteError, Session


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB tmpfs: writes past it fail with ENOSPC, as on a full disk."""
    mount = tmp_path / "disk"
    mount.mkdir()
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here (needs root): {done.stderr.strip()}")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def _fill(folder: Path, leave: int) -> Path:
    """Fill the file system of ``folder`` up, then free ``leave`` bytes."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, filler.stat().st_size - leave)
    return filler


def test_disk_full_while_checkpointing_and_exporting_keeps_the_previous_files_then_resumes(
        make_config, small_disk):
    run = {"train": {"steps": 4, "checkpoint_every": 2}, "output": {"run_dir": str(small_disk / "run")}}
    straight = Session.open(make_config("straight", train={"steps": 4}))
    straight.run()
    session = Session.open(make_config("full", **run))
    session.step(2)
    export = session.export(dtype="fp32")
    exported = export.read_bytes()
    filler = _fill(small_disk, leave=16 * 1024)  # room for metrics lines, not for a checkpoint or an export

    with pytest.raises(CheckpointWriteError) as e:
        session.step(2)
    message = str(e.value)
    assert "could not write the checkpoint of step 4" in message and "No space left on device" in message
    assert "the previous checkpoint (step-00000002) is intact" in message
    root = checkpoint.checkpoint_dir(small_disk / "run")
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]  # no half-written folder left
    assert checkpoint.verified_files(root / "step-00000002") is not None

    with pytest.raises(WriteError, match=r"lora\.safetensors: could not be written \(No space left on device\); "
                                         r"the previous file, if any, is unchanged"):
        session.export(dtype="fp32")
    assert export.read_bytes() == exported
    assert [p.name for p in export.parent.iterdir() if p.name.startswith(".")] == []  # no temporary file left

    filler.unlink()  # space is back: the same config resumes from step 2 and ends where an uninterrupted run does
    resumed = Session.open(make_config("full", **run))
    assert resumed.state.step == 2
    resumed.run()
    a, b = straight.adapter.state(), resumed.adapter.state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert [r["step"] for r in read_metrics(resumed.run_dir) if r["type"] == "step"] == [1, 2, 3, 4]


def _poison(session: Session, bad_calls: set[int] | None) -> None:
    """Make the model's output NaN on the given forward calls (1-based; None: every call from now on)."""
    calls = 0

    def hook(module, args, output):
        nonlocal calls
        calls += 1
        return output * float("nan") if bad_calls is None or calls in bad_calls else output

    session.denoiser.proj_out.register_forward_hook(hook)


def test_a_nan_step_is_skipped_and_counted_and_training_goes_on(make_config):
    session = Session.open(make_config(train={"steps": 4}))
    _poison(session, {2})
    session.step(1)
    after_first = session.adapter.state()
    session.step(1)
    unchanged = session.adapter.state()
    assert all(torch.equal(after_first[k], unchanged[k]) for k in after_first)  # the bad step updated nothing
    session.run()
    assert session.state.skipped_steps == 1 and session.state.nonfinite_streak == 0
    records = {r["step"]: r for r in read_metrics(session.run_dir) if r["type"] == "step"}
    assert sorted(records) == [1, 2, 3, 4]
    assert records[2]["skipped"] == "non-finite loss" and records[2]["loss"] is None
    assert all(records[s]["loss"] > 0 and "skipped" not in records[s] for s in (1, 3, 4))
    final = session.adapter.state()
    assert any(not torch.equal(unchanged[k], final[k]) for k in final)


def test_nan_steps_in_a_row_stop_the_run_with_its_last_checkpoint_intact(make_config):
    session = Session.open(make_config(train={"steps": 10, "checkpoint_every": 2, "nonfinite_patience": 3}))
    session.step(2)
    good = session.adapter.state()
    _poison(session, None)
    with pytest.raises(NonFiniteError, match=r"3 steps in a row \(up to step 5\) had a NaN/inf loss or gradient "
                                             r"and were skipped; stopping\. The last checkpoint in .* is intact"):
        session.step(10)
    found = checkpoint.newest_valid_checkpoint(session.run_dir)
    assert found is not None and found[0].name == "step-00000004"
    resumed = Session.open(make_config(train={"steps": 10, "checkpoint_every": 2, "nonfinite_patience": 3}))
    restored = resumed.adapter.state()
    assert all(torch.equal(good[k], restored[k]) for k in good)  # skipped steps never touched the weights


NO_NETWORK = """
import json, sys
events = []
sys.addaudithook(lambda event, args: events.append([event, repr(args[1:])]) if event.startswith("socket.") else None)
from loraloom.training.config import load_config
from loraloom.training.session import Session
session = Session.open(load_config(sys.argv[1]))
session.run()
session.preview()
print("SOCKET_EVENTS", json.dumps(events))
"""
# urllib3 probes IPv6 support at import by binding a socket to ::1 (loopback, no traffic); anything else
# (connect, name lookups, sends, other binds) is network access.
LOOPBACK_PROBE = [["socket.__new__", "(10, 1, 0)"], ["socket.bind", "(('::1', 0),)"]]


def test_a_run_makes_no_network_access(make_config, tmp_path):
    """Load (text encoders included: a fresh cache), train, checkpoint, export and preview in a fresh
    interpreter without any offline switch set; an audit hook records every socket operation."""
    make_config(train={"steps": 2, "checkpoint_every": 1}, data={"cache_dir": str(tmp_path / "fresh-cache")},
                sample={"prompts": ["zwx, a red disc"], "steps": 2})
    env = {k: v for k, v in os.environ.items() if not k.endswith("_OFFLINE")}
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parents[1]), env.get("PYTHONPATH", "")])
    done = subprocess.run([sys.executable, "-c", NO_NETWORK, str(tmp_path / "run.toml")], env=env,
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    line = next(x for x in done.stdout.splitlines() if x.startswith("SOCKET_EVENTS"))
    events = json.loads(line.split(" ", 1)[1])
    assert [e for e in events if e not in LOOPBACK_PROBE] == []
    assert (tmp_path / "run" / "lora.safetensors").is_file()
    # bitsandbytes' offline kernel lookup misses quietly (it falls back to its own kernel).
    assert "gemm_4bit_forward" not in done.stderr and "publisher trust" not in done.stderr, done.stderr[-3000:]
