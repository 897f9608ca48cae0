"""``loraloom merge`` and ``loraloom extract``: a merged model predicts what base + adapter predicts; an extracted
LoRA reproduces a fine-tune's difference at full rank, and its error falls with the rank."""

from __future__ import annotations

import itertools
import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from loraloom.training.cli import main
from loraloom.training.config import ModelConfig
from loraloom.training.export import COMFY_MODEL_PREFIX, write_model
from loraloom.training.families import family
from loraloom.training.families.base import Geometry
from loraloom.training.session import Session
from loraloom.training.tools import extract, low_rank

FLUX = family("flux")
PREFIX = "transformer."  # Flux LoRA files name diffusers modules under it (the family's export_key)


def _load(path: Path) -> torch.nn.Module:
    return FLUX.load_denoiser(ModelConfig(diffusion_model=str(path)), torch.float32, keep_float8=False).eval()


def _inputs(seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 16, 8, 8, generator=g)
    text = {"t5": torch.randn(2, 16, 64, generator=g), "pooled": torch.randn(2, 64, generator=g)}
    return x, torch.tensor([0.3, 0.8]), text


def _predict(model: torch.nn.Module, inputs) -> torch.Tensor:
    x, t, text = inputs
    with torch.no_grad():
        return FLUX.predict(model, x, t, text, [Geometry((128, 128), (0, 0), (128, 128))] * 2, 1.0)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_a_merged_model_predicts_what_the_base_with_its_lora_predicts(make_config, tiny_files, tmp_path, capsys):
    session = Session.open(make_config(train={"steps": 1}, adapter={"targets": "all_linear"}))
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():  # as after a long training: A and B both far from their start
        for p in session.params:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)
    lora = session.export(dtype="fp32")
    inputs = _inputs()
    with_lora = session.predict(*inputs, 1.0)
    base = session.predict(*inputs, 1.0, adapter=False)
    out = tmp_path / "merged.safetensors"
    assert main(["merge", str(tiny_files["diffusion_model"]), str(lora), str(out), "--dtype", "fp32"]) == 0
    assert f"merged model: {out}" in capsys.readouterr().out
    merged = _predict(_load(out), inputs)
    assert _relative(with_lora, base) > 1e-2  # the LoRA matters
    assert _relative(merged, with_lora) < 1e-4
    assert load_file(out).keys() == load_file(tiny_files["diffusion_model"]).keys()  # the native layout


def test_merge_names_what_it_cannot_merge(make_config, tiny_files, tmp_path, capsys):
    foreign = tmp_path / "foreign.safetensors"
    save_file({"transformer.x_embedder.lora_A.weight": torch.zeros(4, 64)}, foreign)
    assert main(["merge", str(tiny_files["diffusion_model"]), str(foreign), str(tmp_path / "m.safetensors")]) == 2
    assert "has no loraloom_config metadata (it was not exported by LoRA Loom): pass --config" in \
        capsys.readouterr().err
    full = Session.open(make_config(adapter={"algorithm": "full"}, train={"steps": 1}))
    full.run()
    assert main(["merge", str(tiny_files["diffusion_model"]), str(full.run_dir / "lora.safetensors"),
                 str(tmp_path / "m.safetensors")]) == 2
    assert "is a full fine-tune's patch: the run already wrote the merged model beside it (lora-model.safetensors)" \
        in capsys.readouterr().err


def _tuned_files(tiny_files, tmp_path) -> tuple[Path, torch.nn.Module, torch.nn.Module]:
    """The tiny base and a fine-tune of it: every all_linear weight and bias moved by a full-rank random step,
    and one norm scale (outside any preset) moved too."""
    base = _load(tiny_files["diffusion_model"])
    tuned = _load(tiny_files["diffusion_model"])
    g = torch.Generator().manual_seed(7)
    with torch.no_grad():
        for name, module in tuned.named_modules():
            if isinstance(module, torch.nn.Linear) and name.startswith(("transformer_blocks", "single_")):
                module.weight.add_(torch.randn(module.weight.shape, generator=g) * 0.01)
                module.bias.add_(torch.randn(module.bias.shape, generator=g) * 0.01)
        tuned.transformer_blocks[0].attn.norm_q.weight.mul_(1.1)
    path = write_model(tmp_path / "tuned.safetensors", tuned.state_dict(), FLUX, torch.float32, {})
    return path, base, tuned


def _apply_lora_by_definition(model: torch.nn.Module, lora: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A LoRA file as its format defines it, written here independently of the engine: each layer's weight gains
    (alpha / r) · up @ down; bias patches (diff_b over native names) are checked separately. Returns the
    model's state dict after it; every LoRA key must land."""
    state = {k: v.clone() for k, v in model.state_dict().items()}
    used = set()
    for name, _ in model.named_modules():
        key = PREFIX + name
        if f"{key}.lora_A.weight" not in lora:
            continue
        down, up, alpha = lora[f"{key}.lora_A.weight"], lora[f"{key}.lora_B.weight"], lora[f"{key}.alpha"]
        state[f"{name}.weight"] += (alpha / down.shape[0]) * up @ down
        used |= {f"{key}.lora_A.weight", f"{key}.lora_B.weight", f"{key}.alpha"}
    assert used == {k for k in lora if k.startswith(PREFIX)}
    return state


def test_extract_at_full_rank_reproduces_the_fine_tune_and_the_error_falls_with_rank(tiny_files, tmp_path,
                                                                                      capsys):
    tuned_path, base, tuned = _tuned_files(tiny_files, tmp_path)
    out = tmp_path / "full-rank.safetensors"
    assert main(["extract", str(tiny_files["diffusion_model"]), str(tuned_path), str(out), "--rank", "512",
                 "--dtype", "fp32"]) == 0
    printed = capsys.readouterr().out
    assert f"LoRA: {out}  layers 40" in printed and "transformer_blocks.0.attn.norm_q.weight" in printed
    lora = load_file(out)
    state = _apply_lora_by_definition(base, lora)
    want = tuned.state_dict()
    for name, _ in base.named_modules():
        if f"{PREFIX}{name}.lora_A.weight" in lora:
            delta = want[f"{name}.weight"] - base.state_dict()[f"{name}.weight"]
            assert (state[f"{name}.weight"] - want[f"{name}.weight"]).norm() <= 1e-4 * delta.norm(), name
    # Bias differences ride along as diff_b patches over the native layout: the fused qkv biases load too.
    bias = {k for k in lora if k.endswith(".diff_b")}
    assert bias and all(k.startswith(COMFY_MODEL_PREFIX) for k in bias)
    assert f"{COMFY_MODEL_PREFIX}double_blocks.0.img_attn.qkv.diff_b" in bias
    with safe_open(str(out), "pt") as f:
        assert json.loads(f.metadata()["loraloom_extracted"])["rank"] == 512

    errors = [extract(tiny_files["diffusion_model"], tuned_path, tmp_path / f"r{r}.safetensors", r, "flux",
                      dtype="fp32", biases=False).relative_error for r in (1, 4, 16, 64)]
    assert all(a > b for a, b in itertools.pairwise(errors)), errors
    assert errors[0] > 0.5 and errors[-1] < 1e-5  # 64 is the tiny model's full width
    assert not any(k.endswith(".diff_b") for k in load_file(tmp_path / "r4.safetensors"))


def test_low_rank_is_the_truncated_svd():
    g = torch.Generator().manual_seed(0)
    delta = torch.randn(12, 5, generator=g) @ torch.randn(5, 9, generator=g)
    up, down = low_rank(delta, 5)
    assert up.shape == (12, 5) and down.shape == (5, 9) and torch.allclose(up @ down, delta, atol=1e-5)
    up, down = low_rank(delta, 2)
    s = torch.linalg.svdvals(delta)
    assert abs((delta - up @ down).norm().item() - s[2:].norm().item()) < 1e-4  # Eckart-Young


def test_extract_refuses_bad_arguments(tiny_files, tmp_path, capsys):
    args = ["extract", str(tiny_files["diffusion_model"]), str(tiny_files["diffusion_model"]),
            str(tmp_path / "x.safetensors")]
    assert main([*args, "--rank", "0"]) == 2
    assert "--rank 0 must be at least 1" in capsys.readouterr().err
    assert main([*args, "--targets", "everything"]) == 2
    assert "--targets 'everything' is not one of" in capsys.readouterr().err


def test_an_unchanged_model_gives_an_empty_lora(tiny_files, tmp_path):
    done = extract(tiny_files["diffusion_model"], tiny_files["diffusion_model"], tmp_path / "e.safetensors", 3, "flux")
    assert done.targets == 0 and done.untargeted == [] and done.relative_error == 0.0
