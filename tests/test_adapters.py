"""Every registered adapter algorithm on every registered family, through the Adapter contract.

Proven here: the engine's prediction with an adapter equals the base model patched with the exported file by a
reference written from the LyCORIS/kohya format's definition below (and, for LoKr, by diffusers' own loader into
peft's LoKr); previews of the base are the base exactly; the initial adapter changes nothing and comes from its
seed alone; export → continue from the file (``adapter.init_from``) gives back the same weights, also from other
trainers' spellings of the names, and a file that does not fit is refused naming the setting to change; float8
and 4-bit bases train and match a float32 copy; convolutions (LoCon, LoHa, LoKr, DoRA, Tucker forms) round-trip;
a run killed with SIGKILL resumes exactly; a short run lowers the validation loss for each algorithm; and no
engine or node module names an algorithm. ``tests/host/test_comfyui_loads_export.py`` proves the same files in
stock ComfyUI.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraloom.loaders.dataset import Geometry
from loraloom.training import adapters
from loraloom.training.adapters import ALGORITHMS, WHOLE_MODEL
from loraloom.training.adapters.base import LAYERS
from loraloom.training.config import (
    MODEL_FILES,
    AdapterConfig,
    BlockSettings,
    ConfigError,
    TrainConfig,
    config_from_dict,
    to_toml,
)
from loraloom.training.export import adapter_file_state, read_adapter_file
from loraloom.training.families import FAMILIES
from loraloom.training.families.base import DENOISER
from loraloom.training.precision import store_float8
from loraloom.training.session import Session

REPO = Path(__file__).resolve().parents[1]
# Each algorithm, LoKr in its three layouts. The factor 4 splits the tiny widths so w2 is a rank product.
VARIANTS = {
    "lora": {"algorithm": "lora"},
    "locon": {"algorithm": "locon"},
    "loha": {"algorithm": "loha"},
    "lokr": {"algorithm": "lokr", "factor": 4},
    "lokr_full_matrix": {"algorithm": "lokr", "factor": 4, "full_matrix": True},
    "lokr_decompose_both": {"algorithm": "lokr", "factor": 4, "decompose_both": True, "rank": 1},
    "dora": {"algorithm": "dora"},
}
RANK, ALPHA = 4, 2.0  # alpha != rank, so a wrong scale shows


def settings(variant: str, **extra) -> AdapterConfig:
    values = {"rank": RANK, "alpha": ALPHA, **VARIANTS[variant], **extra}
    return AdapterConfig(**values)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def kit(request, tmp_path_factory):
    family = FAMILIES[request.param]
    tiny = family.tiny(seed=0, words=("zwx", "disc"))
    folder = tmp_path_factory.mktemp(request.param)
    files = family.write_tiny(tiny, folder, diffusers=False)
    return family, tiny, files, folder / "cache"


def widest_preset(family, model: torch.nn.Module) -> str:
    """The family's preset that adapts the most layers (convolutions too, where a preset has them)."""
    def count(pattern: str) -> int:
        return sum(isinstance(m, LAYERS) and bool(re.fullmatch(pattern, n)) for n, m in model.named_modules())
    return max(sorted(family.targets), key=lambda preset: count(family.targets[preset]))


def trained_like(model: torch.nn.Module, seed: int = 0, std: float = 0.2) -> None:
    """Every trainable tensor of ``model`` random and non-zero, as after training (DoRA's magnitude ±10% around
    its start, ‖W‖)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                noise = torch.randn(p.shape, generator=g)
                p.copy_(p * (1 + 0.1 * noise) if name.endswith("dora_scale") else noise * std)


def attached(family, tiny, variant: str, preset: str | None = None, **extra):
    """(the model with the adapter, an untouched copy of the base, the adapter); the base frozen, as loaded."""
    model = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    base = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    preset = preset or widest_preset(family, model)
    adapter = adapters.attach({DENOISER: model}, {DENOISER: family.targets[preset]}, settings(variant, **extra), 0)
    return model, base, adapter


def model_inputs(family, tiny, seed: int = 1):
    """x (1, C, 8, 8) in the model's latent format, t (1,), batched text and geometry for one 64 px picture."""
    g = torch.Generator().manual_seed(seed)
    noised = family.noised(torch.randn(1, family.latent_channels, 8, 8, generator=g),
                           family.resolve_train(TrainConfig()), g, t=torch.tensor([0.6]))
    size = 8 * 8
    return noised.inputs, noised.t, family.encode_text(tiny.text, ["zwx, a red circle"]), \
        [Geometry((size, size), (0, 0), (size, size))]


def predict(family, model, inputs) -> torch.Tensor:
    x, t, text, geometry = inputs
    with torch.no_grad():
        return family.predict(model.eval(), x, t, text, geometry, 1.0)


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


# ---------------------------------------------------------------- the format, from its definition


def reference_delta(tensors: dict[str, torch.Tensor], weight: torch.Tensor) -> torch.Tensor:
    """The change to ``weight`` (out, in[, k, k]) that one layer's LyCORIS/kohya tensors define at strength 1.

    lora: up (out, r[, 1, 1]) @ down (r, in[, k, k]); with a Tucker core mid (r, r, k, k) the down kernel is
    mid applied after a 1x1 down. loha: (w1a @ w1b) ⊙ (w2a @ w2b); with cores t (r, r, k, k) each half is
    t ×₁ wa ×₂ wb (wa (r, out), wb (r, in)). lokr: kron(w1, w2), each factor full or a product a @ b. The scale
    is alpha / rank where the file has an alpha and a rank (lokr: the rank of a decomposed factor, none when
    both are full), else 1. dora_scale m: the merged weight W + ΔW times m / ‖·‖, the norm per input column
    when m is (1, in, ...) and the base's per output row when m is (out, 1, ...).
    """
    t = {k: v.double() for k, v in tensors.items()}
    w = weight.double()
    rank = None
    if "lora_up.weight" in t:
        up, down = t["lora_up.weight"], t["lora_down.weight"]
        rank = down.shape[0]
        if "lora_mid.weight" in t:
            down = torch.einsum("j i k l, i c -> j c k l", t["lora_mid.weight"], down.flatten(1))
        delta = up.flatten(1) @ down.flatten(1)
    elif "hada_w1_a" in t:
        rank = t["hada_w1_b"].shape[0]

        def half(i: int) -> torch.Tensor:
            a, b = t[f"hada_w{i}_a"], t[f"hada_w{i}_b"]
            if f"hada_t{i}" in t:
                return torch.einsum("i j k l, i p, j q -> p q k l", t[f"hada_t{i}"], a, b)
            return a @ b
        delta = half(1) * half(2)
    else:
        w1 = t["lokr_w1"] if "lokr_w1" in t else t["lokr_w1_a"] @ t["lokr_w1_b"]
        w2 = t["lokr_w2"] if "lokr_w2" in t else t["lokr_w2_a"] @ t["lokr_w2_b"]
        rank = t["lokr_w2_b"].shape[0] if "lokr_w2_b" in t else t["lokr_w1_b"].shape[0] if "lokr_w1_b" in t else None
        if w2.dim() == 4:
            w1 = w1[:, :, None, None]
        delta = torch.kron(w1, w2)
    scale = float(t["alpha"]) / rank if "alpha" in t and rank is not None else 1.0
    delta = delta.reshape(w.shape) * scale
    if "dora_scale" in t:
        m = t["dora_scale"]
        merged = w + delta
        if m.shape[0] == w.shape[0]:
            norm = w.flatten(1).norm(dim=1).reshape(-1, *[1] * (w.dim() - 1))
        else:
            norm = merged.transpose(0, 1).flatten(1).norm(dim=1).reshape(1, -1, *[1] * (w.dim() - 2))
        delta = merged * m / (norm + torch.finfo(torch.float32).eps) - w
    return delta.to(weight.dtype)


def apply_file(model: torch.nn.Module, file: dict[str, torch.Tensor], names: dict[str, str],
               suffixes: dict[str, str]) -> int:
    """Patch ``model``'s weights with an adapter file whose layer names ``names`` maps to module names and whose
    suffix spellings ``suffixes`` maps to the kohya ones. Returns the number of layers patched."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in file.items():
        suffix = next(s for s in sorted(suffixes, key=len, reverse=True) if key.endswith(f".{s}"))
        groups.setdefault(names[key[:-len(suffix) - 1]], {})[suffixes[suffix]] = value
    with torch.no_grad():
        for module, tensors in groups.items():
            layer = model.get_submodule(module)
            layer.weight += reference_delta(tensors, layer.weight)
    return len(groups)


def family_names(family, model: torch.nn.Module) -> tuple[dict[str, str], dict[str, str]]:
    """The family's export names → module names, and its suffix spellings → the kohya suffixes."""
    names = {family.export_key(DENOISER, n): n for n, m in model.named_modules() if isinstance(m, LAYERS)}
    suffixes = {s: s for s in adapters.base.FILE_SUFFIXES} | {v: k for k, v in family.export_suffixes.items()}
    return names, suffixes


# ---------------------------------------------------------------- the algorithms


def test_every_algorithm_is_tested_and_documented():
    """Every delta algorithm runs through this file; whole-model ones (their files are the model and a patch over
    its native names) through tests/test_full.py."""
    assert {v["algorithm"] for v in VARIANTS.values()} == set(ALGORITHMS) - WHOLE_MODEL
    doc = {f.name: f.metadata["doc"] for f in dataclasses.fields(AdapterConfig)}["algorithm"]
    readme = (REPO / "README.md").read_text()
    for name in ALGORITHMS:
        assert re.search(rf"\b{name}\b", doc), name
        assert f"`{name}`" in readme, name


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_prediction_equals_the_base_patched_with_the_exported_file_and_off_is_the_base(kit, variant):
    """At the start the adapter changes nothing and comes from its seed alone; trained, the engine predicts what
    the base patched with its exported file predicts, and what the base with its update folded in (the merge)
    predicts; turned off (nested too) it predicts the base exactly."""
    family, tiny, _, _ = kit
    rng = torch.get_rng_state()
    model, base, adapter = attached(family, tiny, variant)
    assert torch.equal(torch.get_rng_state(), rng)  # the draws came from the seed, not the global RNG
    assert all(p.requires_grad and p.dtype == torch.float32 for ps in adapter.parameters().values() for p in ps)
    inputs = model_inputs(family, tiny)
    before = predict(family, base, inputs)
    assert relative(predict(family, model, inputs), before) < 1e-5  # DoRA's renormalisation rounds in float32
    state, same = adapter.state(), attached(family, tiny, variant)[2].state()
    assert state.keys() == same.keys() and all(torch.equal(state[k], same[k]) for k in state)

    trained_like(model)
    ours = predict(family, model, inputs)
    with adapter.disabled():
        assert torch.equal(predict(family, model, inputs), before)
        with adapter.disabled():
            assert torch.equal(predict(family, model, inputs), before)
    assert torch.equal(predict(family, model, inputs), ours)
    merged = copy.deepcopy(base)  # the update folded into the base weights (loraloom merge)
    with torch.no_grad():
        for name, weight in adapter.trained_weights().items():
            merged.get_submodule(name.split(".", 1)[1].removesuffix(".weight")).weight.copy_(weight)
    assert relative(predict(family, merged, inputs), ours) < 1e-4
    file = adapter_file_state(adapter.export(), family, torch.float32)
    assert apply_file(base, file, *family_names(family, base)) == len(adapter.targets)
    theirs = predict(family, base, inputs)
    assert relative(ours, before) > 1e-2  # the adapter matters, so agreement means something
    assert relative(theirs, ours) < 1e-4


@pytest.mark.parametrize("variant", [v for v in sorted(VARIANTS) if v.startswith("lokr")])
def test_diffusers_loader_reads_lokr_into_peft_and_predicts_the_same(kit, variant):
    from diffusers.loaders.lora_conversion_utils import _convert_non_diffusers_lokr_to_diffusers

    family, tiny, _, _ = kit
    model, base, adapter = attached(family, tiny, variant, preset="all_linear")  # diffusers reads linear LoKr only
    trained_like(model)
    inputs = model_inputs(family, tiny)
    # diffusers reads LyCORIS LoKr files whose names are the model's module paths (ai-toolkit's layout).
    state = {f"{name.split('.', 1)[1]}.{suffix}": value for name, tensors in adapter.export().items()
             for suffix, value in tensors.items()}
    base.load_lora_adapter(_convert_non_diffusers_lokr_to_diffusers(state), prefix="transformer")
    assert relative(predict(family, base, inputs), predict(family, model, inputs)) < 1e-4


def test_lokr_factor_rank_and_alpha_per_layer_from_adapter_blocks(kit):
    """As Kohaku XL: one factor for most layers, another for some; a file keeps them per layer."""
    family, tiny, _, _ = kit
    model = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    pattern = family.targets["attention"]
    names = [n for n, m in model.named_modules() if isinstance(m, LAYERS) and re.fullmatch(pattern, n)]
    first, second, third = (f"{DENOISER}.{n}" for n in names[:3])
    blocks = (BlockSettings(pattern=re.escape(first), factor=2), BlockSettings(pattern=re.escape(second), rank=1,
                                                                              alpha=0.5),
              BlockSettings(pattern=re.escape(third), rank=0))
    values = {"algorithm": "lokr", "rank": 2, "alpha": 4.0, "factor": 4, "targets": "attention"}
    adapter = adapters.attach({DENOISER: model}, {DENOISER: pattern}, AdapterConfig(**values, blocks=blocks), 0)
    assert third not in adapter.targets and len(adapter.targets) == len(names) - 1
    exported = adapter.export()
    w1 = {name: tuple(tensors["lokr_w1"].shape) for name, tensors in exported.items()}
    assert w1[first] == (2, 2) and all(shape == (4, 4) for name, shape in w1.items() if name != first)
    assert exported[second]["lokr_w2_b"].shape[0] == 1 and float(exported[second]["alpha"]) == 0.5
    assert all(t["lokr_w2_b"].shape[0] == 2 and float(t["alpha"]) == 4.0 for n, t in exported.items() if n != second)
    again = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    adapters.attach({DENOISER: again}, {DENOISER: pattern}, AdapterConfig(**values, blocks=blocks), 1
                    ).load_export(exported)
    other = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    plain = adapters.attach({DENOISER: other}, {DENOISER: pattern}, AdapterConfig(**values, blocks=blocks[1:]), 1)
    with pytest.raises(ValueError, match=rf"{re.escape(first)}: .*\(factor 2\), this run with w1 \(4, 4\) "
                                         r"\(factor 4\): set adapter\.factor = 2 \(or the factor of the "
                                         r"\[\[adapter\.blocks\]\] entry"):
        plain.load_export(exported)


@pytest.mark.parametrize("algorithm", ["locon", "lokr"])  # LoCon's own dropout module; LoHa's and LoKr's shared one
def test_dropout_draws_from_the_global_rng_in_training_only(kit, algorithm):
    """The session saves and restores torch's global RNG around each step: that covers these draws."""
    family, tiny, _, _ = kit
    model, _, _ = attached(family, tiny, algorithm, preset="attention", dropout=0.5)
    trained_like(model)
    x, t, text, geometry = model_inputs(family, tiny)

    def run(seed: int | None, training: bool) -> torch.Tensor:
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            return family.predict(model.train(training), x, t, text, geometry, 1.0)
    assert torch.equal(run(0, True), run(0, True))
    assert not torch.equal(run(0, True), run(1, True))
    assert torch.equal(run(0, False), run(1, False))


def test_options_an_algorithm_ignores_are_refused():
    for values, message in [({"algorithm": "loha", "full_matrix": True}, r"adapter\.full_matrix = True does not "
                             r"apply to adapter\.algorithm = 'loha'"),
                            ({"algorithm": "locon", "factor": 8}, r"adapter\.factor = 8 does not apply"),
                            ({"algorithm": "lora", "tucker": True}, r"adapter\.tucker = True does not apply"),
                            ({"algorithm": "loha", "blocks": (BlockSettings(pattern=".*", factor=4),)},
                             r"adapter\.blocks\[0\]\.factor does not apply"),
                            ({"algorithm": "dora", "dropout": 0.1}, r"adapter\.dropout must be 0 for"),
                            ({"algorithm": "lokr", "full_matrix": True, "decompose_both": True},
                             r"decompose_both has no effect with adapter\.full_matrix")]:
        with pytest.raises(ConfigError, match=message):
            adapters.check(AdapterConfig(**values))
    with pytest.raises(ConfigError, match=r"adapter\.factor must be -1 or at least 1"):
        config_from_dict({"adapter": {"algorithm": "lokr", "factor": 0}})


# ---------------------------------------------------------------- stored bases: float8, 4-bit


@pytest.mark.parametrize("storage", ["float8", "nf4"])
@pytest.mark.parametrize("variant", ["locon", "loha", "lokr", "dora"])
def test_quantized_bases_train_and_match_a_float32_copy_of_the_rounded_weights(kit, variant, storage):
    """LoCon/LoHa/LoKr run beside the stored layer (bypass); DoRA rebuilds from the dequantised weight."""
    family, tiny, _, _ = kit
    stored = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    if storage == "float8":
        store_float8(stored, convert=True)
    else:
        pytest.importorskip("bitsandbytes")
        from loraloom.training.precision import quantize_nf4

        quantize_nf4(stored, family.quantized, torch.float32, torch.device("cpu"))
    rounded = copy.deepcopy(tiny.denoiser).requires_grad_(False)
    from loraloom.training.adapters.lycoris import base_weight

    with torch.no_grad():
        for name, layer in stored.named_modules():
            if isinstance(layer, torch.nn.Linear) and type(layer) is not torch.nn.Linear:
                rounded.get_submodule(name).weight.copy_(base_weight(layer))
    preset = widest_preset(family, tiny.denoiser)
    pair = []
    for model in (stored, rounded):
        adapter = adapters.attach({DENOISER: model}, {DENOISER: family.targets[preset]}, settings(variant), 0)
        trained_like(model)
        pair.append(adapter)
    for a, b in zip(pair[0].parameters()[DENOISER], pair[1].parameters()[DENOISER]):
        assert torch.allclose(a, b, rtol=1e-6), "DoRA's magnitude starts from the dequantised weight"
    inputs = model_inputs(family, tiny)
    ours, reference = predict(family, stored, inputs), predict(family, rounded, inputs)
    assert relative(ours, reference) < 1e-4
    x, t, text, geometry = inputs
    family.predict(stored.train(), x, t, text, geometry, 1.0).square().mean().backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in pair[0].parameters()[DENOISER])


# ---------------------------------------------------------------- convolutions (families whose presets have them)


class ConvNet(torch.nn.Module):
    """A 3x3 and a 1x1 convolution and a linear layer: every layer kind LoCon/LoHa/LoKr/DoRA adapt."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 12, 3, padding=1)
        self.point = torch.nn.Conv2d(12, 12, 1)
        self.proj = torch.nn.Linear(12, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(self.point(self.conv(x)).permute(0, 2, 3, 1))


CONV_VARIANTS = [("locon", {}), ("locon", {"tucker": True}), ("loha", {}), ("loha", {"tucker": True}),
                 ("lokr", {"factor": 2, "rank": 2}), ("lokr", {"factor": 2, "rank": 2, "tucker": True}),
                 ("lokr", {"factor": 2, "full_matrix": True}), ("dora", {})]


@pytest.mark.parametrize(("variant", "extra"), CONV_VARIANTS, ids=[f"{v}-{'-'.join(e) or 'plain'}"
                                                                  for v, e in CONV_VARIANTS])
def test_convolutions_export_what_they_compute_and_continue_from_it(variant, extra):
    torch.manual_seed(0)
    net = ConvNet().requires_grad_(False)
    base = copy.deepcopy(net)
    adapter = adapters.attach({DENOISER: net}, {DENOISER: "conv|point|proj"}, settings(variant, **extra), 0)
    trained_like(net, std=0.3)
    x = torch.randn(2, 8, 6, 6)
    with torch.no_grad():
        ours, before = net(x), base(x)
    exported = adapter.export()
    assert "lokr_t2" not in {k for tensors in exported.values() for k in tensors}  # ComfyUI cannot apply it
    file = {f"{name.split('.', 1)[1]}.{k}": v for name, tensors in exported.items() for k, v in tensors.items()}
    names = {n: n for n in ("conv", "point", "proj")}
    assert apply_file(base, file, names, {s: s for s in adapters.base.FILE_SUFFIXES}) == 3
    with torch.no_grad():
        assert relative(ours, before) > 1e-2
        assert relative(base(x), ours) < 1e-5
    torch.manual_seed(0)
    again = ConvNet().requires_grad_(False)  # the same base, another adapter seed
    other = adapters.attach({DENOISER: again}, {DENOISER: "conv|point|proj"}, settings(variant, **extra), 1)
    other.load_export(exported)
    with torch.no_grad():
        assert relative(again(x), ours) < 1e-5


# ---------------------------------------------------------------- continue from a file


def session_config(kit, run_dir: Path, shapes_folder: Path, **sections):
    family, _, files, cache = kit
    data = {"model": {"family": family.name, **{s: str(files[s]) for s in MODEL_FILES if s in files},
                      "text_length": 16},
            "data": {"images": str(shapes_folder), "resolution": 64, "validation_images": 2,
                     "cache_dir": str(cache)},
            "optimizer": {"lr": 1e-2, "warmup_steps": 0, "scheduler": "constant"},
            "train": {"steps": 2, "batch_size": 2, "mixed_precision": "fp32", "gradient_checkpointing": False,
                      "checkpoint_every": 0, "validate_every": 0},
            "output": {"run_dir": str(run_dir)}}
    for name, values in sections.items():
        data[name] = {**data.get(name, {}), **values}
    return config_from_dict(data)


def adapter_section(variant: str, **extra) -> dict:
    return {"rank": RANK, "alpha": ALPHA, "targets": "attention", **VARIANTS[variant], **extra}


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_export_then_continue_from_the_file_gives_the_same_weights(kit, variant, tmp_path, shapes_folder):
    first = Session.open(session_config(kit, tmp_path / "first", shapes_folder, adapter=adapter_section(variant)))
    start = first.adapter.state()
    first.step(2)
    path = first.export(dtype="fp32")
    trained = first.adapter.state()
    second = Session.open(session_config(kit, tmp_path / "second", shapes_folder,
                                         adapter=adapter_section(variant, init_from=str(path))))
    again = second.adapter.state()
    assert again.keys() == trained.keys()
    assert all(torch.equal(again[k], trained[k]) for k in trained)
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # so the equality is the file's doing
    assert second.step(1)[0]["loss"] is not None  # and it trains on


# How other trainers name a module path: LyCORIS' wrapper and SimpleTuner, kohya, OneTrainer, diffusers / ai-toolkit.
SPELLINGS = {"lycoris_": "_", "lora_unet_": "_", "lora_transformer_": "_", "transformer.": ".",
             "diffusion_model.": ".", "unet.": "."}  # prefix -> what joins the path's parts
PEFT_SUFFIXES = {"lora_down.weight": "lora_A.weight", "lora_up.weight": "lora_B.weight"}


@pytest.mark.parametrize("variant", ["lora", "lokr", "dora"])
def test_files_of_other_trainers_are_read_under_their_names(kit, variant, tmp_path):
    family, tiny, _, _ = kit
    model, _, adapter = attached(family, tiny, variant)
    trained_like(model)
    exported = adapter.export()
    file = _saved(tmp_path / "ours.safetensors", adapter_file_state(exported, family, torch.float32))
    ours = read_adapter_file(file, family, adapter.targets)
    assert ours.keys() == adapter.targets.keys()
    for (prefix, joint), peft in itertools.product(SPELLINGS.items(), (False, True)):
        suffixes = PEFT_SUFFIXES if peft else {}
        renamed = {f"{prefix}{target.split('.', 1)[1].replace('.', joint)}.{suffixes.get(s, s)}": value
                   for target, tensors in exported.items() for s, value in tensors.items()}
        theirs = read_adapter_file(_saved(tmp_path / "theirs.safetensors", renamed), family, adapter.targets)
        assert theirs.keys() == ours.keys(), prefix
        assert all(theirs[n].keys() == ours[n].keys() and all(torch.equal(theirs[n][s], ours[n][s]) for s in ours[n])
                   for n in ours), (prefix, peft)


def _saved(path: Path, tensors: dict[str, torch.Tensor]) -> Path:
    save_file({k: v.contiguous() for k, v in tensors.items()}, path)
    return path


MISFITS = [  # (variant of the file, the run's adapter settings, the message)
    ("lora", {"rank": 8}, r"rank 4 in the file, 8 in this run: set adapter\.rank = 4"),
    ("lora", {"alpha": 4.0}, r"alpha 2 in the file, 4 in this run: set adapter\.alpha = 2"),
    ("loha", {"algorithm": "lokr", "factor": 4}, r"holds a loha adapter here, this run trains lokr: set "
                                                  r"adapter\.algorithm = 'loha'"),
    ("lora", {"algorithm": "dora"}, r"holds a lora adapter here, this run trains dora: set adapter\.algorithm = "
                                    r"'lora' or 'locon'"),
    ("lokr", {"factor": 8}, r"\(factor 4\), this run with w1 .* \(factor 8\): set adapter\.factor = 4"),
    ("lokr_full_matrix", {"full_matrix": False}, r"stores w2 as a full matrix, this run as a rank-4 product: set "
                                                 r"adapter\.full_matrix = true"),
    ("lokr_decompose_both", {"decompose_both": False}, r"stores w1 as a rank-r product, this run as a full "
                                                       r"matrix: set adapter\.decompose_both = true"),
    ("loha", {"rank": 2}, r"rank 4 in the file, 2 in this run: set adapter\.rank = 4"),
]


@pytest.mark.parametrize(("variant", "run", "message"), MISFITS, ids=[f"{v}-{'-'.join(r)}" for v, r, _ in MISFITS])
def test_a_file_that_does_not_fit_the_run_is_refused_naming_the_fix(kit, variant, run, message, tmp_path):
    family, tiny, _, _ = kit
    model, _, adapter = attached(family, tiny, variant, preset="attention")
    trained_like(model)
    path = _saved(tmp_path / "trained.safetensors", adapter_file_state(adapter.export(), family, torch.float32))
    _, _, other = attached(family, tiny, variant, preset="attention", **run)
    with pytest.raises(ValueError, match=message):
        other.load_export(read_adapter_file(path, family, other.targets))


def test_session_names_the_file_and_refuses_foreign_layers_and_output_axis_dora(kit, tmp_path, shapes_folder):
    family, tiny, _, _ = kit
    model, _, adapter = attached(family, tiny, "dora", preset="attention")
    trained_like(model)
    exported = adapter.export()
    file = adapter_file_state(exported, family, torch.float32)
    layer = family.export_key(DENOISER, next(iter(exported)).split(".", 1)[1])
    for tensors in exported.values():  # one magnitude per output row, as peft and LyCORIS' default train
        tensors["dora_scale"] = torch.ones(tensors["lora_up.weight"].shape[0], 1)
    run = {"adapter": adapter_section("dora", init_from=str(tmp_path / "f.safetensors"))}
    for tensors, message in [
            ({**file, f"{layer}_nothing_here.alpha": torch.tensor(1.0)},
             r"adapter\.init_from: .*f\.safetensors: .*_nothing_here names no layer this run adapts"),
            ({**file, f"{layer}.oft_blocks": torch.zeros(1)},
             r"adapter\.init_from: .*f\.safetensors: .*oft_blocks is not an adapter tensor"),
            (adapter_file_state(exported, family, torch.float32),
             r"adapter\.init_from = .*f\.safetensors: .*one per output row")]:
        _saved(tmp_path / "f.safetensors", tensors)
        with pytest.raises(ConfigError, match=message):
            Session.open(session_config(kit, tmp_path / "run", shapes_folder, **run))


def test_init_from_is_relative_to_the_config_and_read_when_a_run_starts_never_on_resume(kit, tmp_path,
                                                                                        shapes_folder):
    from loraloom.training.config import load_config

    first = Session.open(session_config(kit, tmp_path / "first", shapes_folder, adapter=adapter_section("lokr")))
    first.step(2)
    first.export(tmp_path / "start.safetensors", dtype="fp32")
    cfg = session_config(kit, tmp_path / "second", shapes_folder, adapter=adapter_section(
        "lokr", init_from="start.safetensors"), train={"steps": 3, "checkpoint_every": 1})
    (tmp_path / "second.toml").write_text(to_toml(cfg).replace(f'init_from = "{tmp_path}/', 'init_from = "'))
    cfg = load_config(tmp_path / "second.toml")
    assert cfg.adapter.init_from == str(tmp_path / "start.safetensors")
    second = Session.open(cfg)
    second.step(1)
    state = second.adapter.state()
    (tmp_path / "start.safetensors").unlink()  # a resume never reads it
    resumed = Session.open(cfg)
    assert resumed.state.step == 1
    assert all(torch.equal(v, resumed.adapter.state()[k]) for k, v in state.items())


@pytest.mark.parametrize("variant", ["lokr_full_matrix", "dora"])
def test_loraloom_merge_folds_the_exported_file_into_the_base(kit, variant, tmp_path, shapes_folder):
    from loraloom.training.tools import merge

    family, tiny, files, _ = kit
    session = Session.open(session_config(kit, tmp_path / "run", shapes_folder, adapter=adapter_section(variant)))
    trained_like(session.denoiser)
    out = merge(Path(files["diffusion_model"]), session.export(dtype="fp32"), tmp_path / "merged.safetensors",
                dtype="fp32")
    merged = family.load_denoiser(dataclasses.replace(session.cfg.model, diffusion_model=str(out)), torch.float32,
                                  keep_float8=False)
    x, t, text, geometry = inputs = model_inputs(family, tiny)
    ours = session.predict(x, t, text, 1.0, geometry=geometry)
    assert relative(ours, session.predict(x, t, text, 1.0, adapter=False, geometry=geometry)) > 1e-2
    assert relative(predict(family, merged, inputs), ours) < 1e-4


# ---------------------------------------------------------------- training


@pytest.mark.parametrize("algorithm", sorted(set(ALGORITHMS) - WHOLE_MODEL))
def test_a_short_run_lowers_the_validation_loss(kit, algorithm, tmp_path, shapes_folder):
    family = kit[0]
    # An epsilon loss is mostly noise that no model predicts at low noise levels, so a short memorisation shows
    # under v-prediction. LoKr starts with one Kronecker factor at zero and wants a higher lr (as LyCORIS advises).
    model = {"prediction": "v_prediction"} if family.noise_prediction else {}
    cfg = session_config(kit, tmp_path / "run", shapes_folder, model=model, adapter=adapter_section(
        algorithm, rank=8, alpha=8.0, targets="attention_mlp" if "attention_mlp" in family.targets else "attention"),
        optimizer={"lr": 1e-1 if algorithm == "lokr" else 3e-2}, train={"steps": 20 if model else 10})
    session = Session.open(cfg)
    before = session.validate()
    session.run()
    after = session.validate()
    assert after < 0.85 * before, (algorithm, before, after)


def test_a_lokr_run_with_dropout_killed_with_sigkill_resumes_exactly(kit, tmp_path, shapes_folder):
    import importlib.util

    spec = importlib.util.spec_from_file_location("resume_stress", REPO / "benchmarks" / "resume_stress.py")
    resume_stress = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(resume_stress)
    run = {"adapter": adapter_section("lokr", dropout=0.2, full_matrix=True),
           "train": {"steps": 8, "gradient_accumulation": 2, "checkpoint_every": 2, "keep_checkpoints": 2}}
    for name in ("straight", "killed"):
        cfg = session_config(kit, tmp_path / name, shapes_folder, **run)
        (tmp_path / f"{name}.toml").write_text(to_toml(cfg))
    resume_stress.run_to_end(tmp_path / "straight.toml")
    trials = resume_stress.train_with_kills(tmp_path / "killed.toml", kills=4, seed=1)
    assert len(trials) == 4
    result = resume_stress.compare_runs(tmp_path / "straight", tmp_path / "killed", step=8)
    assert result["adapter_max_abs_diff"] <= 1e-6 and result["loss_max_abs_diff"] <= 1e-6
    assert result["resumed_steps"] == result["reference_steps"] == list(range(1, 9))
    exported = load_file(tmp_path / "killed" / "lora.safetensors")
    assert any(k.endswith(".lokr_w2") for k in exported)


# ---------------------------------------------------------------- layering


ENGINE_MODULES = ["loraloom/training/session.py", "loraloom/training/export.py", "loraloom/training/checkpoint.py",
                  "loraloom/training/cli.py", "loraloom/training/encoders.py", "loraloom/training/data.py",
                  "loraloom/training/demo.py", *(str(p.relative_to(REPO))
                                                 for p in sorted((REPO / "loraloom" / "nodes").glob("*.py")))]


@pytest.mark.parametrize("name", sorted(set(ALGORITHMS) - {"lora", "full"}))
def test_no_engine_or_node_module_names_an_algorithm(name):
    """Session, export, checkpoints, CLI and nodes reach an algorithm only through the Adapter contract. ("lora"
    is also the product's name and what ComfyUI calls every adapter file, and "full" an ordinary word, so they are
    not searched for.) The file format's tensor names (lokr_w1, hada_w1_a) are not algorithm names."""
    cls = ALGORITHMS[name].split(":")[1].lower()
    for path in ENGINE_MODULES:
        text = (REPO / path).read_text().lower()
        found = [w for w in {name, cls} if re.search(rf"(?<![a-z0-9_]){w}(?![a-z0-9_])", text)]
        assert not found, f"{path} names {found}"
