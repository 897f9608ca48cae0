"""Exact resume: processes killed with SIGKILL at random points, a corrupt newest checkpoint, retention,
changed config, base or dataset, and a step interrupted by Cancel."""

from __future__ import annotations

import importlib.util
import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraloom.training import checkpoint
from loraloom.training.config import ConfigError
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session

_spec = importlib.util.spec_from_file_location(
    "resume_stress", Path(__file__).parents[1] / "benchmarks" / "resume_stress.py")
resume_stress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_stress)

# Dropout and accumulation make every RNG and the data position matter; checkpoints every 2 steps make
# some kills re-do steps; keep-every-4 exercises the retention policy under kills.
RUN = {"train": {"steps": 16, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 2,
                 "keep_checkpoints": 2, "keep_checkpoint_every": 4, "validate_every": 5},
       "adapter": {"dropout": 0.1}}


@pytest.mark.parametrize("family_name", ["flux", "lumina2"])
def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(make_config, tmp_path, family_name):
    make_config("straight", family_name, **RUN)
    make_config("killed", family_name, **RUN)
    resume_stress.run_to_end(tmp_path / "straight.toml")
    trials = resume_stress.train_with_kills(tmp_path / "killed.toml", kills=12, seed=0)
    assert len(trials) == 12
    assert {t["killed"].split(" step")[0] for t in trials} >= {"after", "at checkpoint.file-written"}
    result = resume_stress.compare_runs(tmp_path / "straight", tmp_path / "killed", step=16)
    assert result["adapter_max_abs_diff"] <= 1e-6
    assert result["loss_max_abs_diff"] <= 1e-6
    assert result["resumed_steps"] == result["reference_steps"] == list(range(1, 17))  # every step once
    kept = sorted(p.name for p in (tmp_path / "killed" / "checkpoints").iterdir())
    assert kept == ["step-00000004", "step-00000008", "step-00000012", "step-00000014", "step-00000016"]
    exported = load_file(tmp_path / "killed" / "lora.safetensors")
    assert exported.keys() == load_file(tmp_path / "straight" / "lora.safetensors").keys()


def _adapter(session: Session) -> dict[str, torch.Tensor]:
    return session.adapter.state()


def test_corrupt_newest_checkpoint_falls_back_to_the_one_before(make_config, caplog):
    cfg = make_config(train={"steps": 6, "checkpoint_every": 2, "keep_checkpoints": 3})
    first = Session.open(cfg)
    first.run()
    reference = _adapter(first)
    newest = first.run_dir / "checkpoints" / "step-00000006"
    data = bytearray((newest / "adapter.safetensors").read_bytes())
    data[-1] ^= 0xFF  # one flipped bit in the weights: the manifest hash no longer matches
    (newest / "adapter.safetensors").write_bytes(bytes(data))
    with caplog.at_level(logging.WARNING, logger="loraloom.training.checkpoint"):
        resumed = Session.open(cfg)
    assert "step-00000006 is incomplete or corrupt" in caplog.text and "falling back" in caplog.text
    assert resumed.state.step == 4
    resumed.run()  # re-does steps 5 and 6 and rewrites the corrupt checkpoint
    after = _adapter(resumed)
    assert all(torch.equal(reference[k], after[k]) for k in reference)
    assert checkpoint.verified_files(newest) is not None
    assert [r["step"] for r in read_metrics(cfg.output.run_dir) if r["type"] == "step"] == [1, 2, 3, 4, 5, 6]


def test_a_crash_between_the_renames_of_a_rewritten_step_loses_nothing(tmp_path):
    files = {"a.bin": b"first"}
    checkpoint.write_checkpoint(tmp_path, 2, files, keep=1)
    root = checkpoint.checkpoint_dir(tmp_path)
    # What a kill between "move the old folder aside" and "rename the new one in" leaves behind:
    (root / "step-00000002").rename(root / ".replaced-step-00000002")
    (root / ".tmp-step-00000002-99").mkdir()
    folder, found = checkpoint.newest_valid_checkpoint(tmp_path)
    assert folder.name == "step-00000002" and found["a.bin"] == b"first"
    assert sorted(p.name for p in root.iterdir()) == ["step-00000002"]


def test_retention_keeps_the_newest_and_every_mth(tmp_path):
    for step in range(1, 11):
        checkpoint.write_checkpoint(tmp_path, step, {"x": str(step).encode()}, keep=2, keep_every=3)
    names = sorted(p.name for p in checkpoint.checkpoint_dir(tmp_path).iterdir())
    assert names == ["step-00000003", "step-00000006", "step-00000009", "step-00000010"]


def test_resume_may_change_steps_and_logging_but_names_any_other_changed_key(make_config):
    Session.open(make_config(train={"steps": 2})).run()
    session = Session.open(make_config(train={"steps": 3, "log_every": 2, "validate_every": 1},
                                       sample={"steps": 4}))
    assert session.state.step == 2
    for changes, key in [({"train": {"batch_size": 1}}, "train.batch_size"),
                         ({"optimizer": {"lr": 5e-4}}, "optimizer.lr"),
                         ({"adapter": {"targets": "attention"}}, "adapter.targets"),
                         ({"data": {"resolution": 32}}, "data.resolution")]:
        with pytest.raises(ConfigError, match=rf"{key} changed from .* since the checkpoint .*step-00000002"):
            Session.open(make_config(**{"train": {"steps": 3}, **changes}))


def test_resume_refuses_a_changed_dataset_or_a_swapped_base_file(make_config, shapes_folder, tiny_files, tmp_path):
    images = tmp_path / "images"
    shutil.copytree(shapes_folder, images)
    base = tmp_path / "base.safetensors"
    shutil.copy(tiny_files["diffusion_model"], base)
    make = lambda: make_config(data={"images": str(images)}, model={"diffusion_model": str(base)},  # noqa: E731
                               train={"steps": 2})
    Session.open(make()).run()
    moved = tmp_path / "moved"
    images.rename(moved)  # the same content in another folder resumes
    assert Session.open(make_config(data={"images": str(moved)}, model={"diffusion_model": str(base)},
                                    train={"steps": 2})).state.step == 2
    moved.rename(images)
    caption = sorted(images.glob("*.txt"))[0]
    caption.write_text(caption.read_text() + ", edited")
    with pytest.raises(ConfigError, match=r"data\.images: the content changed since the checkpoint"):
        Session.open(make())
    caption.write_text(caption.read_text().removesuffix(", edited"))
    shutil.copy(tiny_files["diffusion_model_fp8"], base)  # another base model under the same name
    with pytest.raises(ConfigError, match=r"model\.diffusion_model: the content changed since the checkpoint"):
        Session.open(make())


def test_model_files_are_compared_by_content_not_by_path(make_config, tiny_files, tmp_path):
    models = tiny_files["diffusion_model"].parent
    names = ("diffusion_model", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae")

    def model_paths(root: Path) -> dict[str, str]:
        return {name: str(root / tiny_files[name].relative_to(models)) for name in names}

    home = tmp_path / "home"
    shutil.copytree(models, home)
    Session.open(make_config(model=model_paths(home), train={"steps": 2})).run()
    moved = tmp_path / "moved"
    home.rename(moved)  # the same models elsewhere (a run folder copied with its models) resume
    assert Session.open(make_config(model=model_paths(moved), train={"steps": 3})).state.step == 2
    other_vae = {**model_paths(moved), "vae": str(tiny_files["diffusers"] / "vae")}  # another file: refused
    with pytest.raises(ConfigError, match=r"model\.vae: the content changed since the checkpoint"):
        Session.open(make_config(model=other_vae, train={"steps": 3}))


def test_cancel_mid_step_then_checkpoint_resumes_exactly(make_config):
    """ComfyUI Cancel raises inside a step; the step is undone, so a checkpoint taken then is exact."""
    run = {"train": {"steps": 4, "gradient_accumulation": 2}, "adapter": {"dropout": 0.1}}
    straight = Session.open(make_config("straight", **run))
    straight.run()
    session = Session.open(make_config("cancelled", **run))
    session.step(2)
    calls = 0

    def cancel_on_second_forward(module, args, output):
        nonlocal calls
        calls += 1
        if calls == 2:  # the second micro-batch forward of step 3: data and noise already drawn
            raise KeyboardInterrupt("cancelled")

    hook = session.denoiser.register_forward_hook(cancel_on_second_forward)
    with pytest.raises(KeyboardInterrupt):
        session.step(1)
    hook.remove()
    assert session.state.step == 2 and session.state.samples_seen == 2 * 2 * 2  # steps x accumulation x batch
    session.checkpoint()
    resumed = Session.open(make_config("cancelled", **run))
    assert resumed.state.step == 2
    resumed.run()
    a, b = _adapter(straight), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(resumed.run_dir) if r["type"] == "step"]
    assert steps == [1, 2, 3, 4]


def test_checkpoint_records_every_rng_and_the_content_fingerprints(make_config):
    session = Session.open(make_config(train={"steps": 1}))
    session.checkpoint()  # on demand before any step (a node asked to save right away)
    session.run()
    assert Session.open(make_config(train={"steps": 1})).state.step == 1
    files = checkpoint.verified_files(session.run_dir / "checkpoints" / "step-00000001")
    assert {"adapter.safetensors", "optimizer.pt", "rng.safetensors", "host_rng.json", "state.json",
            "config.json", "fingerprints.json"} <= files.keys()
    host = json.loads(files["host_rng.json"])
    assert host.keys() == {"python", "numpy"}
    assert json.loads(files["fingerprints.json"]).keys() == {
        "model.diffusion_model", "model.text_encoder", "model.text_encoder_2", "model.tokenizer", "model.tokenizer_2",
        "model.vae", "data.images"}


def test_python_and_numpy_randomness_inside_a_step_resumes_exactly_and_leaves_the_callers_alone(make_config):
    """Code inside a step that draws from ``random`` or numpy's global RNG (e.g. caption shuffling) still
    resumes exactly, and the caller's own RNG sequence is not disturbed by training."""
    import random

    import numpy as np

    def jitter(session: Session) -> None:
        session.denoiser.proj_out.register_forward_hook(
            lambda module, args, output: output * (1 + 0.05 * (random.random() + np.random.rand())))

    straight = Session.open(make_config("straight", train={"steps": 4}))
    jitter(straight)
    random.seed(7)
    straight.run()
    assert random.random() == random.Random(7).random()  # the host's sequence went on untouched
    first = Session.open(make_config("split", train={"steps": 4}))
    jitter(first)
    first.step(2)
    first.checkpoint()
    resumed = Session.open(make_config("split", train={"steps": 4}))
    jitter(resumed)
    np.random.seed(99)  # whatever the host does with its RNGs, the run's own states are restored
    resumed.run()
    a, b = _adapter(straight), _adapter(resumed)
    assert all(torch.equal(a[k], b[k]) for k in a)
