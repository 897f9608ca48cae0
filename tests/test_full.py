"""Full fine-tune (adapter.algorithm = "full"): it memorises, exports the whole model in the family's native layout
and a diff patch that an independent reference applies to the same prediction, trains fp32 masters on a bf16
base with an 8-bit optimizer and gradient checkpointing, refuses float8 / 4-bit bases, and resumes exactly after
SIGKILLs with a moving average on."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraloom.training import adapters
from loraloom.training.config import AdapterConfig, BlockSettings, ConfigError, ModelConfig
from loraloom.training.export import COMFY_MODEL_PREFIX, companion, model_state
from loraloom.training.families import family
from loraloom.training.families.base import DENOISER, Geometry
from loraloom.training.session import Session

_spec = importlib.util.spec_from_file_location(
    "resume_stress", Path(__file__).parents[1] / "benchmarks" / "resume_stress.py")
resume_stress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_stress)

FLUX = family("flux")
FULL = {"adapter": {"algorithm": "full", "targets": "all_linear"}, "optimizer": {"lr": 1e-4}}


def _probe(session: Session, seed: int = 3) -> tuple[torch.Tensor, torch.Tensor, dict[str, torch.Tensor]]:
    """Model inputs, times and text of two validation images (scaled latents mixed with noise)."""
    g = torch.Generator().manual_seed(seed)
    items = session.val_items[:2]
    noised = session.family.noised(torch.stack([i.latent for i in items]), session.cfg.train, g)
    return noised.inputs, noised.t, {k: torch.stack([i.text[k] for i in items]) for k in items[0].text}


def _predict(model: torch.nn.Module, session: Session, probe) -> torch.Tensor:
    x, t, text = probe
    res = session.cfg.data.resolution
    with torch.no_grad():
        return FLUX.predict(model.eval(), x, t, text, [Geometry((res, res), (0, 0), (res, res))] * len(x), 1.0)


def _load(path: Path) -> torch.nn.Module:
    return FLUX.load_denoiser(ModelConfig(diffusion_model=str(path)), torch.float32, keep_float8=False)


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def test_the_registry_knows_which_algorithms_train_the_whole_model():
    for name in adapters.ALGORITHMS:
        assert adapters.algorithm(name).whole_model == (name in adapters.WHOLE_MODEL), name


def test_a_full_fine_tune_memorises_its_images_and_leaves_the_rest_frozen(make_config, tiny_files):
    session = Session.open(make_config(**FULL, data={"validation_images": 0}, train={"steps": 10}))
    before = session.validate()
    frozen = {k: v.clone() for k, v in session.denoiser.state_dict().items() if "norm_q" in k or "embedder" in k}
    session.run()
    assert session.validate() < before - 0.02  # scored on the training images: memorised
    trained = session.adapter.trained_weights()
    assert len(trained) == 2 * len(session.adapted_modules)  # every targeted layer's weight and bias
    assert sum(p.numel() for p in session.params) == sum(v.numel() for v in trained.values())
    state = session.denoiser.state_dict()
    assert all(torch.equal(state[k], v) for k, v in frozen.items())  # outside the preset: untouched
    # The base alone is the file's model, exactly (side-by-side previews compare against it).
    probe = _probe(session)
    x, t, text = probe
    assert torch.equal(session.predict(x, t, text, 1.0, adapter=False), _predict(_load(tiny_files["diffusion_model"]),
                                                                                  session, probe))
    assert not torch.equal(session.predict(x, t, text, 1.0), session.predict(x, t, text, 1.0, adapter=False))


def test_blocks_choose_which_layers_train(make_config):
    frozen = r"diffusion_model\.single_transformer_blocks\..*"
    blocks = (BlockSettings(pattern=frozen, rank=0),)
    session = Session.open(make_config(**{**FULL, "adapter": {**FULL["adapter"], "blocks": blocks}},
                                       train={"steps": 1}))
    before = {k: v.clone() for k, v in session.denoiser.state_dict().items()}
    session.run()
    assert session.adapted_modules and not any("single_transformer_blocks" in m for m in session.adapted_modules)
    after = session.denoiser.state_dict()
    changed = {k for k in after if not torch.equal(before[k], after[k])}
    assert changed == {k for m in session.adapted_modules for k in (f"{m.split('.', 1)[1]}.weight",
                                                                     f"{m.split('.', 1)[1]}.bias")}
    patch = load_file(session.run_dir / "lora.safetensors")
    assert patch and not any(".single_blocks." in k for k in patch)


def _apply_patch_by_definition(native: dict[str, torch.Tensor], patch: dict[str, torch.Tensor]
                               ) -> dict[str, torch.Tensor]:
    """ComfyUI's diff patch as its format defines it, written here independently of the engine: a key
    ``diffusion_model.<stem>.diff`` adds to the native tensor ``<stem>.weight``, ``.diff_b`` to ``<stem>.bias``,
    and ``diffusion_model.<key>.diff`` of any other tensor to ``<key>``. Every patch key must land."""
    out = {k: v.float().clone() for k, v in native.items()}
    for key, value in patch.items():
        assert key.startswith(COMFY_MODEL_PREFIX), key
        stem, kind = key[len(COMFY_MODEL_PREFIX):].rsplit(".", 1)
        name = {"diff": f"{stem}.weight", "diff_b": f"{stem}.bias"}[kind]
        name = name if name in out else stem
        assert out[name].shape == value.shape, key
        out[name] += value.float()
    return out


def test_exports_the_whole_model_natively_and_a_patch_that_reproduces_the_prediction(make_config, tiny_files,
                                                                                    tmp_path):
    from safetensors.torch import save_file

    session = Session.open(make_config(**FULL, train={"steps": 3}))
    session.run()
    patch_path = session.export(dtype="fp32")
    model_path = companion(patch_path, "model")
    # (1) The native single file loads back through the family's own loader and holds the trained weights.
    loaded = _load(model_path)
    trained = model_state(session.denoiser, session.adapter)
    assert loaded.state_dict().keys() == trained.keys()
    assert all(torch.equal(loaded.state_dict()[k], v.float()) for k, v in trained.items())
    # (2) The patch, applied to the base file by the format's definition, predicts what the engine predicts.
    patch = load_file(patch_path)
    assert {k.rsplit(".", 1)[1] for k in patch} == {"diff", "diff_b"}
    patched = tmp_path / "patched.safetensors"
    save_file(_apply_patch_by_definition(load_file(tiny_files["diffusion_model"]), patch), patched)
    probe = _probe(session)
    ours = session.predict(*probe, 1.0)
    assert _relative(ours, session.predict(*probe, 1.0, adapter=False)) > 1e-3  # the patch is not empty
    assert _relative(_predict(_load(patched), session, probe), ours) < 1e-4
    assert _relative(_predict(loaded, session, probe), ours) < 1e-6


def test_a_bf16_base_trains_float32_masters_with_an_8bit_optimizer_and_gradient_checkpointing(make_config):
    session = Session.open(make_config(**{**FULL, "optimizer": {"name": "adamw8bit", "lr": 1e-4}},
                                       train={"steps": 2, "mixed_precision": "bf16", "gradient_checkpointing": True}))
    before = session.adapter.state()
    records = session.step(2)
    assert all(r["loss"] is not None and r["loss"] > 0 for r in records)
    assert {p.dtype for p in session.params} == {torch.float32}
    assert session.denoiser.x_embedder.weight.dtype == torch.bfloat16  # the frozen rest stays in storage dtype
    after = session.adapter.state()
    assert all(not torch.equal(before[k], after[k]) for k in before if k.endswith(".weight"))
    assert type(session.optimizer).__name__ == "AdamW8bit"


def test_gradient_checkpointing_changes_no_result(make_config):
    states = []
    for run, checkpointing in (("plain", False), ("checkpointed", True)):
        session = Session.open(make_config(run, **FULL, train={"steps": 2, "gradient_checkpointing": checkpointing}))
        session.run()
        states.append(session.adapter.state())
    assert max((states[0][k] - states[1][k]).abs().max().item() for k in states[0]) <= 1e-6


def test_float8_and_4bit_bases_are_refused_with_the_key_and_the_fix(make_config, tiny_files):
    for precision in ("fp8", "nf4"):
        with pytest.raises(ConfigError, match=rf"model\.base_precision = '{precision}' stores the base in float8 / 4 "
                                              r"bits, which adapter\.algorithm = 'full' cannot train .* set "
                                              r"model\.base_precision = 'bf16'"):
            make_config(**FULL, model={"base_precision": precision})
    fp8_file = {"diffusion_model": str(tiny_files["diffusion_model_fp8"])}
    with pytest.raises(ConfigError, match=r"is stored in torch\.float8_e4m3fn \(a float8 or 4-bit base\).*set "
                                          r"model\.base_precision to the compute dtype \('bf16', or 'fp32' with "
                                          r"train\.mixed_precision = 'fp32'\) to train an upcast copy"):
        Session.open(make_config(**FULL, model=fp8_file))
    session = Session.open(make_config(**FULL, model={**fp8_file, "base_precision": "fp32"}, train={"steps": 1}))
    assert session.step(1)[0]["loss"] > 0


def test_sigkill_then_resume_of_a_full_fine_tune_with_a_moving_average_is_exact(make_config, tmp_path):
    run = {**FULL, "train": {"steps": 8, "batch_size": 2, "gradient_accumulation": 2, "checkpoint_every": 2,
                             "validate_every": 3}, "ema": {"decay": 0.9, "every": 2}}
    make_config("straight", **run)
    make_config("killed", **run)
    resume_stress.run_to_end(tmp_path / "straight.toml")
    trials = resume_stress.train_with_kills(tmp_path / "killed.toml", kills=5, seed=3)
    assert len(trials) == 5
    result = resume_stress.compare_runs(tmp_path / "straight", tmp_path / "killed", step=8)
    assert result["adapter_max_abs_diff"] <= 1e-6 and result["ema_max_abs_diff"] <= 1e-6
    assert result["loss_max_abs_diff"] <= 1e-6
    assert result["resumed_steps"] == result["reference_steps"] == list(range(1, 9))
    for name in ("lora.safetensors", "lora-model.safetensors", "lora-ema.safetensors", "lora-ema-model.safetensors"):
        a, b = load_file(tmp_path / "straight" / name), load_file(tmp_path / "killed" / name)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), name


def test_a_run_config_changing_the_algorithm_is_refused_on_resume(make_config):
    Session.open(make_config(train={"steps": 1})).run()
    with pytest.raises(ConfigError, match=r"adapter\.algorithm changed from 'lora' to 'full'"):
        Session.open(make_config(**FULL, train={"steps": 1}))


def test_the_session_names_no_algorithm():
    """Whole-model exports and EMA go through the contract (``Adapter.whole_model``), not by name."""
    root = Path(__file__).parents[1] / "loraloom" / "training"
    for path in ("session.py", "export.py", "tools.py", "ema.py", "cli.py"):
        text = (root / path).read_text()
        assert "algorithm ==" not in text and '"full"' not in text and "'full'" not in text, path


def test_export_of_a_frozen_rest_keeps_it_in_the_model_file(make_config):
    """The model file is the whole denoiser, the patch only what changed."""
    session = Session.open(make_config(**{**FULL, "adapter": {**FULL["adapter"], "targets": "attention"}},
                                       train={"steps": 1}))
    session.run()
    native = load_file(companion(session.export(dtype="fp32"), "model"))
    assert native.keys() == load_file(session.cfg.model.diffusion_model).keys()
    patch = load_file(session.run_dir / "lora.safetensors")
    layers = {k[len(COMFY_MODEL_PREFIX):].rsplit(".", 1)[0] for k in patch}
    attention = ("img_attn.qkv", "img_attn.proj", "txt_attn.qkv", "txt_attn.proj")  # no MLP or modulation layer
    assert layers == {f"double_blocks.{i}.{n}" for i in (0, 1) for n in attention} | {
        f"single_blocks.{i}.linear1" for i in (0, 1)}


def test_the_patch_groups_load_back_into_a_fresh_model(tiny_files):
    """``load_export`` is the inverse of ``export`` (continuing from a patch), and names a file of another kind."""
    def attach():
        return adapters.attach({DENOISER: _load(tiny_files["diffusion_model"])}, {DENOISER: FLUX.targets["attention"]},
                               AdapterConfig(algorithm="full", targets="attention"), seed=0)

    trained = attach()
    g = torch.Generator().manual_seed(2)
    with torch.no_grad():
        for p in trained.parameters()[DENOISER]:
            p.add_(torch.randn(p.shape, generator=g) * 0.01)
    fresh = attach()
    fresh.load_export(trained.export())
    a, b = trained.trained_weights(), fresh.trained_weights()
    assert a.keys() == b.keys() and max((a[k] - b[k]).abs().max().item() for k in a) <= 1e-6
    name = next(iter(trained.targets))
    with pytest.raises(ValueError, match=rf"{name}: not a full fine-tune's patch"):
        fresh.load_export({name: {"lora_down.weight": torch.zeros(1)}})
