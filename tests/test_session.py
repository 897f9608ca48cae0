"""The session end to end on tiny models: learning, exact resume, metrics, caches, fp8, guidance warning."""

from __future__ import annotations

import json
import re
import warnings

import pytest
import torch
from safetensors.torch import load_file

from loraloom.training.config import ConfigError
from loraloom.training.families import flux
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session


def test_training_lowers_the_held_out_validation_loss(make_config):
    cfg = make_config(train={"steps": 40, "batch_size": 2, "validate_every": 20}, optimizer={"lr": 3e-3},
                      adapter={"rank": 8, "alpha": 8.0})
    session = Session.open(cfg)
    before = session.validate()
    session.run()
    after = session.validate()
    assert after < 0.8 * before, (before, after)
    vals = [r["val_loss"] for r in read_metrics(cfg.output.run_dir) if r["type"] == "validation"]
    assert len(vals) == 4 and vals[0] == pytest.approx(before)  # before, step 20, step 40, after


def test_validation_loss_is_deterministic(make_config):
    session = Session.open(make_config())
    assert session.validate() == session.validate()


def test_resume_continues_exactly(make_config):
    """3 + 3 steps with a restart in between equal 6 uninterrupted steps, bit for bit (CPU fp32)."""
    straight = Session.open(make_config("straight", train={"steps": 6}, adapter={"dropout": 0.1}))
    straight.run()
    first = Session.open(make_config("split", train={"steps": 6}, adapter={"dropout": 0.1}))
    first.step(3)
    first.checkpoint()
    del first
    resumed = Session.open(make_config("split", train={"steps": 6}, adapter={"dropout": 0.1}))
    assert resumed.state.step == 3
    resumed.run()
    a, b = straight.adapter.state(), resumed.adapter.state()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    steps = [r["step"] for r in read_metrics(resumed.run_dir) if r["type"] == "step"]
    assert steps == [1, 2, 3, 4, 5, 6]  # every step exactly once


def test_resume_refuses_a_changed_adapter(make_config):
    session = Session.open(make_config(train={"steps": 2}))
    session.run()
    with pytest.raises(ConfigError, match=r"adapter\.rank changed"):
        Session.open(make_config(train={"steps": 4}, adapter={"rank": 8}))


def test_checkpoint_holds_what_resume_needs_and_keeps_the_newest(make_config):
    session = Session.open(make_config(train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 2}))
    session.run()
    folders = sorted((session.run_dir / "checkpoints").iterdir())
    assert [f.name for f in folders] == ["step-00000002", "step-00000003"]
    manifest = json.loads((folders[-1] / "manifest.json").read_text())
    assert set(manifest["files"]) >= {"adapter.safetensors", "optimizer.pt", "rng.safetensors", "state.json"}
    state = json.loads((folders[-1] / "state.json").read_text())
    assert (state["step"], state["samples_seen"], state["sampler"]) == (3, 6, {"epoch": 0, "batch": 3})


def test_metrics_log_records_loss_lr_time_and_memory(make_config):
    session = Session.open(make_config(train={"steps": 3}))
    session.run()
    steps = [r for r in read_metrics(session.run_dir) if r["type"] == "step"]
    assert [r["step"] for r in steps] == [1, 2, 3]
    for r in steps:
        assert r["loss"] > 0 and r["lr"] == pytest.approx(1e-3) and r["step_time"] > 0 and r["peak_memory_mb"] > 0


def test_gradient_accumulation_and_clipping_run(make_config):
    session = Session.open(make_config(train={"steps": 2, "gradient_accumulation": 2, "max_grad_norm": 1e-6}))
    before = {k: v.clone() for k, v in session.adapter.state().items()}
    records = session.step(2)
    assert all(r["grad_norm"] > 0 for r in records)
    after = session.adapter.state()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert session.state.samples_seen == 2 * 2 * 2  # steps x accumulation x batch


def test_second_open_hits_the_caches_and_a_changed_caption_misses_once(make_config, shapes_folder, tmp_path):
    import shutil
    images = tmp_path / "images"
    shutil.copytree(shapes_folder, images)
    cfg = make_config("a", data={"images": str(images), "cache_dir": str(tmp_path / "cache")})
    first = Session.open(cfg)
    assert first.encoding.text_cache.misses > 0 and first.encoding.latent_cache.misses == 8
    second = Session.open(make_config("b", data={"images": str(images), "cache_dir": str(tmp_path / "cache")}))
    assert second.encoding.text_cache.misses == 0 and second.encoding.latent_cache.misses == 0
    caption = sorted(images.glob("*.txt"))[0]
    caption.write_text("zwx, an entirely new caption")
    third = Session.open(make_config("c", data={"images": str(images), "cache_dir": str(tmp_path / "cache")}))
    assert third.encoding.text_cache.misses == 1 and third.encoding.latent_cache.misses == 0
    image = sorted(images.glob("*.png"))[1]
    from PIL import Image
    Image.new("RGB", (64, 64), (0, 0, 255)).save(image)
    fourth = Session.open(make_config("d", data={"images": str(images), "cache_dir": str(tmp_path / "cache")}))
    assert fourth.encoding.latent_cache.misses == 1 and fourth.encoding.text_cache.misses == 0


def test_fp8_base_stays_fp8_and_trains_in_bf16(make_config, tiny_files):
    cfg = make_config(model={"diffusion_model": str(tiny_files["diffusion_model_fp8"])},
                      train={"steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True})
    session = Session.open(cfg)
    base = session.denoiser.transformer_blocks[0].attn.to_q.base_layer.weight
    assert base.dtype == torch.float8_e4m3fn
    assert all(p.dtype == torch.float32 for p in session.params)
    records = session.step(2)
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records)
    assert base.dtype == torch.float8_e4m3fn


def test_nf4_base_is_four_bit_close_to_the_full_base_and_learns(make_config, tiny_files):
    bnb = pytest.importorskip("bitsandbytes")
    settings = dict(train={"steps": 40, "batch_size": 2}, optimizer={"lr": 3e-3}, adapter={"rank": 8, "alpha": 8.0})
    full = Session.open(make_config("full", **settings))
    nf4 = Session.open(make_config("nf4", model={"base_precision": "nf4"}, **settings))
    plain = flux.load_transformer(tiny_files["diffusion_model"], torch.float32, fp8_storage=False)
    in_blocks = [n for n, m in plain.named_modules()
                 if isinstance(m, torch.nn.Linear) and re.fullmatch(flux.TARGETS["all_linear"], n)]
    quantized = {n.removesuffix(".base_layer"): m for n, m in nf4.denoiser.named_modules()
                 if isinstance(m, bnb.nn.Linear4bit)}
    assert sorted(quantized) == sorted(in_blocks)
    for name, layer in quantized.items():  # half a byte per weight, plus one scale per 64
        weights = plain.get_submodule(name).weight.numel()
        assert layer.weight.dtype == torch.uint8 and layer.weight.numel() == weights // 2
    assert nf4.adapted_modules == full.adapted_modules
    before, exact = nf4.validate(), full.validate()
    assert before != exact and abs(before - exact) < 0.1 * exact  # quantised, yet the same model
    nf4.run()
    assert nf4.validate() < 0.8 * before


def test_guidance_warning_for_a_distilled_base(make_config):
    with pytest.warns(UserWarning, match="guidance-distilled"):
        Session.open(make_config(model={"guidance_distilled": True}, train={"guidance": 3.5}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        Session.open(make_config("b", model={"guidance_distilled": True}, train={"guidance": 1.0}))


def test_export_has_alpha_for_every_module_and_kohya_metadata(make_config):
    session = Session.open(make_config(train={"steps": 1}))
    session.run()
    path = session.export(dtype="fp32")
    sd = load_file(path)
    modules = {k.rsplit(".lora_", 1)[0] for k in sd if ".lora_" in k}
    assert modules and all(m.startswith("transformer.") for m in modules)
    assert {k[: -len(".alpha")] for k in sd if k.endswith(".alpha")} == modules
    assert all(sd[f"{m}.alpha"].item() == 8.0 for m in modules)
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    assert meta["ss_network_dim"] == "4" and meta["ss_network_alpha"] == "8.0" and meta["ss_steps"] == "1"
    assert meta["ss_base_model_version"] == "flux1" and json.loads(meta["loraloom_config"])["adapter"]["rank"] == 4
