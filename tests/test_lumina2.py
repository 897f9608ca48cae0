"""Lumina 2 beyond the family contract: every file layout, the fused qkv against diffusers' own model and pipeline,
the time direction, Gemma's hidden layer, padding, export names, ComfyUI's CLIP object, learning and the demo.

The independent references: diffusers' ``Lumina2Transformer2DModel`` (split q/k/v, its own attention processor)
read from the diffusers folder by diffusers itself, diffusers' ``Lumina2Pipeline`` sampling loop, transformers'
whole ``Gemma2Model``. ComfyUI's side is in tests/host/test_lumina2_host.py.
"""

from __future__ import annotations

import dataclasses
import re

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraloom.loaders.files import ModelFileError
from loraloom.training import demo
from loraloom.training.cli import main
from loraloom.training.config import ConfigError, TrainConfig, config_from_dict
from loraloom.training.families import family, flux_vae, lumina2
from loraloom.training.families.base import DENOISER
from loraloom.training.families.lumina2_layout import transformer_from_native, transformer_to_native
from loraloom.training.session import Session

FAMILY = family("lumina2")
CAPTIONS = ["zwx, a red circle on a yellow background", "a blue square"]


@pytest.fixture(scope="module")
def tiny():
    return FAMILY.tiny(seed=0, words=("zwx", "disc"))  # the weights family_files("lumina2") wrote


@pytest.fixture(scope="module")
def files(family_files):
    return family_files("lumina2")


def model_config(files, **model):
    return config_from_dict({"model": {"family": "lumina2", "diffusion_model": str(files["diffusion_model"]),
                                       "text_encoder": str(files["text_encoder"]), "vae": str(files["vae"]),
                                       **model}}).model


def states_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].float(), sb[k].float()) for k in sa)


# ---------------------------------------------------------------- layouts


def test_every_transformer_layout_loads_the_same_fused_model(tiny, files, tmp_path):
    native = lumina2.load_transformer(files["diffusion_model"], torch.float32)
    assert "layers.0.attn.to_qkv.weight" in native.state_dict() and not hasattr(native.layers[0].attn, "to_q")
    for key in ("diffusion_model_prefixed", "checkpoint"):  # bare diffusion_model., model.diffusion_model.
        assert states_equal(lumina2.load_transformer(files[key], torch.float32), native), key
    # The diffusers folder holds fp32 split q/k/v, the native files bf16: the folder gives the tiny model exactly.
    folder = lumina2.load_transformer(files["diffusers"], torch.float32)
    assert states_equal(folder, tiny.denoiser)
    split = load_file(files["diffusers"] / "transformer" / "diffusion_pytorch_model.safetensors")
    save_file(split, tmp_path / "diffusers-keys.safetensors")  # a diffusers-keyed single file: config from shapes
    assert states_equal(lumina2.load_transformer(tmp_path / "diffusers-keys.safetensors", torch.float32), folder)
    fp8 = lumina2.load_transformer(files["diffusion_model_fp8"], torch.float32, fp8_storage=True)
    assert fp8.layers[0].attn.to_qkv.weight.dtype == torch.float8_e4m3fn
    assert fp8.layers[0].attn.norm_q.weight.dtype == torch.float32


def test_native_and_diffusers_layouts_round_trip_and_refuse_unknown_keys(tiny):
    sd = tiny.denoiser.state_dict()
    native = transformer_to_native(sd)
    assert native["layers.0.attention.qkv.weight"].shape == (64 + 32 + 32, 64)  # grouped-query: q | k | v
    assert torch.equal(native["norm_final.weight"], torch.ones(64))  # unused by NextDiT, present for ComfyUI
    back = transformer_from_native(native)
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)
    split = transformer_from_native(native, fused_qkv=False)
    assert split["layers.0.attn.to_q.weight"].shape == (64, 64) and split["layers.0.attn.to_k.weight"].shape == (32, 64)
    assert transformer_to_native(split).keys() == native.keys()
    with pytest.raises(ValueError, match=r"not in the native Lumina 2 layout.*stray"):
        transformer_from_native({**native, "stray.weight": torch.zeros(1)})
    prefixed = transformer_to_native(sd, prefix="model.diffusion_model.")
    assert all(k.startswith("model.diffusion_model.") for k in prefixed) and len(prefixed) == len(native)


def test_files_of_other_models_are_refused_with_the_key_and_the_fix(files, family_files):
    flux_files = family_files("flux")
    with pytest.raises(ModelFileError, match=r"is not a Lumina 2 transformer: expected keys like 'cap_embedder"):
        lumina2.load_transformer(flux_files["diffusion_model"], torch.float32)
    with pytest.raises(ModelFileError, match=r"is not a Gemma 2 text encoder.*gemma_2_2b"):
        FAMILY.load_text_encoder(model_config(files, text_encoder=str(flux_files["text_encoder_2"])), torch.float32)
    with pytest.raises(ModelFileError, match=r"no Gemma tokenizer .*set model.tokenizer to a folder"):
        FAMILY.load_text_encoder(model_config(files, text_encoder=str(files["text_encoder_hf"])), torch.float32)


# ---------------------------------------------------------------- the fused model against diffusers' own


def test_the_fused_model_predicts_what_diffusers_own_model_predicts(files, tiny):
    """diffusers reads its folder into its split-qkv model with its own attention processor; the engine reads the
    same folder into the fused model. Two captions of different lengths, padded: the masks are exercised too."""
    from diffusers import Lumina2Transformer2DModel

    theirs = Lumina2Transformer2DModel.from_pretrained(files["diffusers"] / "transformer").eval()
    ours = lumina2.load_transformer(files["diffusers"], torch.float32)
    text = FAMILY.encode_text(tiny.text, CAPTIONS)
    assert text["mask"].sum(1).tolist() == [11, 5]
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 16, 8, 6, generator=g, requires_grad=True)
    t = torch.tensor([0.2, 0.8])
    v = lumina2.velocity(ours, x, t, text)
    raw = theirs(hidden_states=x, timestep=1 - t, encoder_hidden_states=text["gemma"],
                 encoder_attention_mask=text["mask"].long(), return_dict=False)[0]
    torch.testing.assert_close(v, -raw, rtol=1e-5, atol=1e-5)
    ours_grad, = torch.autograd.grad(v.square().sum(), x)
    theirs_grad, = torch.autograd.grad(raw.square().sum(), x)
    torch.testing.assert_close(ours_grad, theirs_grad, rtol=1e-4, atol=1e-5)


def test_sampling_follows_diffusers_pipeline_in_the_engine_time(files, tiny):
    """diffusers' Lumina2Pipeline (it feeds the network 1 - t and negates its output) on ComfyUI's shift-6 sigmas,
    with and without classifier-free guidance, gives the latents of the family's sampler: a flipped time or sign
    would change every step (the sigmas avoid 0.5, where 1 - t = t)."""
    from diffusers import FlowMatchEulerDiscreteScheduler, Lumina2Pipeline, Lumina2Transformer2DModel

    steps, seed = 4, 3
    sigmas = lumina2.comfy_sigmas(steps)
    assert 0.5 not in sigmas.tolist()
    pipe = Lumina2Pipeline(transformer=Lumina2Transformer2DModel.from_pretrained(files["diffusers"] / "transformer"),
                           scheduler=FlowMatchEulerDiscreteScheduler(shift=1.0), vae=tiny.vae, text_encoder=None,
                           tokenizer=None)
    ours = lumina2.load_transformer(files["diffusers"], torch.float32)
    text = FAMILY.encode_text(tiny.text, CAPTIONS[:1])
    negative = FAMILY.encode_text(tiny.text, [""])
    for guidance in (1.0, 4.0):
        noise = torch.randn(1, 16, 8, 8, generator=torch.Generator().manual_seed(seed))
        theirs = pipe(prompt_embeds=text["gemma"], prompt_attention_mask=text["mask"].long(),
                      negative_prompt_embeds=negative["gemma"], negative_prompt_attention_mask=negative["mask"].long(),
                      guidance_scale=guidance, cfg_normalization=False, sigmas=sigmas[:-1].tolist(), latents=noise,
                      height=64, width=64, output_type="latent", return_dict=False)[0]
        mine = FAMILY.sample(ours, text, (64, 64), (8, 8), seed, steps, guidance, negative)
        torch.testing.assert_close(flux_vae.scale_latents(mine), theirs, rtol=1e-4, atol=1e-4)


class PointMassLumina(torch.nn.Module):
    """The exact network in Lumina 2's convention when all data is one point x0: it is fed s = 1 - t (1 = clean) and
    returns x0 - noise, where x_t = (1 - t)·x0 + t·noise."""

    def __init__(self, x0: torch.Tensor):
        super().__init__()
        self.x0 = torch.nn.Parameter(x0, requires_grad=False)

    def forward(self, hidden_states, timestep, encoder_hidden_states, encoder_attention_mask, return_dict=False):
        t = (1 - timestep).view(-1, 1, 1, 1)
        noise = (hidden_states - (1 - t) * self.x0) / t
        return (self.x0 - noise,)


@pytest.mark.parametrize("t", [0.1, 0.3, 0.7, 0.9])
def test_the_velocity_runs_in_the_engine_time(tiny, t):
    """The engine's target is noise - x0 at engine time t (0 = clean); the family's prediction must equal it for
    the exact network. Feeding t instead of 1 - t, or dropping the sign, is O(1) wrong away from t = 0.5."""
    g = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(2, 16, 4, 4, generator=g), torch.randn(2, 16, 4, 4, generator=g)
    oracle = PointMassLumina(x0)
    noised = FAMILY.noised(flux_vae.unscale_latents(x0), TrainConfig(), g, t=torch.full((2,), t), noise=noise)
    text = FAMILY.encode_text(tiny.text, CAPTIONS)
    pred = FAMILY.predict(oracle, noised.inputs, noised.t, text, [], 1.0)
    torch.testing.assert_close(pred, noised.target, rtol=1e-5, atol=1e-5)
    time_not_reversed = -oracle(noised.inputs, noised.t, None, None)[0]
    sign_not_flipped = oracle(noised.inputs, 1 - noised.t, None, None)[0]
    for wrong in (time_not_reversed, sign_not_flipped):
        assert (wrong - noised.target).norm() > 0.5 * noised.target.norm()


def test_previews_land_on_the_data_point_with_the_exact_network(tiny):
    x0 = torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(2))
    text = FAMILY.encode_text(tiny.text, CAPTIONS[:1])
    latents = FAMILY.sample(PointMassLumina(x0), text, (32, 32), (4, 4), seed=0, steps=8, guidance=1.0)
    torch.testing.assert_close(flux_vae.scale_latents(latents), x0, rtol=1e-4, atol=1e-4)


# ---------------------------------------------------------------- Gemma and captions


def test_gemma_gives_hidden_layer_minus_2_before_the_final_norm_zero_padded(tiny):
    """transformers' whole Gemma2Model: hidden_states[-2] is the output of the next-to-last layer, before the final
    norm (ComfyUI's layer_idx -2, layer_norm_hidden_state False)."""
    ids, mask = tiny.text.tokenize(CAPTIONS[:1])
    n = int(mask.sum())
    assert ids[0, 0] == lumina2.BOS and n == 11  # BOS, the system prompt, the caption
    with torch.no_grad():
        reference = tiny.text.full(input_ids=ids[:, :n], output_hidden_states=True).hidden_states[-2]
    ours = FAMILY.encode_text(tiny.text, CAPTIONS[:1])
    assert ours["gemma"].shape == (1, 256, 64) and ours["mask"].tolist()[0] == [1.0] * n + [0.0] * (256 - n)
    assert torch.equal(ours["gemma"][:, :n], reference)
    assert not ours["gemma"][:, n:].any()


def test_every_text_encoder_layout_gives_the_same_embeddings(tiny, files):
    expected = FAMILY.encode_text(tiny.text, CAPTIONS)
    layouts = {"comfyui file (tokenizer inside)": {}, "all-in-one checkpoint": {"text_encoder": files["checkpoint"]},
               "Hugging Face file + tokenizer folder": {"text_encoder": files["text_encoder_hf"],
                                                        "tokenizer": files["gemma_tokenizer"]},
               "diffusers folder": {"text_encoder": files["diffusers"]}}
    for name, paths in layouts.items():
        text = FAMILY.load_text_encoder(model_config(files, **{k: str(v) for k, v in paths.items()}), torch.float32)
        assert len(text.gemma.layers) == 2, name  # of 3: the last layer is never read
        got = FAMILY.encode_text(text, CAPTIONS)
        for key in expected:
            torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{name}: {key}")


def test_padding_changes_no_prediction(tiny):
    """A caption padded to the text length predicts what it predicts unpadded, alone or batched with a longer one."""
    exact = dataclasses.replace(tiny.text, length=5)
    alone = FAMILY.encode_text(exact, CAPTIONS[1:])
    assert alone["mask"].all()
    padded = FAMILY.encode_text(tiny.text, CAPTIONS)
    x = torch.randn(2, 16, 8, 8, generator=torch.Generator().manual_seed(4))
    t = torch.tensor([0.35, 0.35])
    with torch.no_grad():
        batched = lumina2.velocity(tiny.denoiser, x, t, padded)
        single = lumina2.velocity(tiny.denoiser, x[1:], t[1:], alone)
    torch.testing.assert_close(batched[1:], single, rtol=1e-5, atol=1e-5)


def test_system_prompt_and_text_length_resolve_and_shape_the_text(tiny, files, caplog):
    model = model_config(files)
    assert model.text_length == 256 and model.system_prompt == lumina2.SYSTEM_PROMPTS["superior"]
    own = model_config(files, system_prompt="You are an assistant designed to generate anime images.",
                       text_length=320)
    text = FAMILY.load_text_encoder(own, torch.float32)
    other = FAMILY.encode_text(text, CAPTIONS[:1])
    default = FAMILY.encode_text(tiny.text, CAPTIONS[:1])
    assert other["gemma"].shape == (1, 320, 64) and other["mask"].sum() > default["mask"].sum()
    # Longer than diffusers' 299-token caption table: the loaded transformer gets a longer one.
    long_caption = " ".join(["red"] * 330)
    with caplog.at_level("WARNING"):
        long = FAMILY.encode_text(text, [long_caption])
    assert long["mask"].all() and "was cut to model.text_length = 320" in caplog.text
    denoiser = FAMILY.load_denoiser(own, torch.float32, keep_float8=False)
    with torch.no_grad():
        v = FAMILY.predict(denoiser, torch.randn(1, 16, 4, 4), torch.tensor([0.5]), long, [], 1.0)
    assert torch.isfinite(v).all()


def test_training_defaults_are_lumina_2s():
    cfg = config_from_dict({"model": {"family": "lumina2"}})
    assert (cfg.train.timesteps, cfg.train.shift, cfg.data.captions.format) == ("shift", 6.0, "text")
    assert config_from_dict({"model": {"family": "lumina2"}, "train": {"timesteps": "auto_shift"}}).train.shift == 6.0
    with pytest.raises(ConfigError, match="noise-prediction models; Lumina2 is trained by flow matching"):
        config_from_dict({"model": {"family": "lumina2"}, "train": {"min_snr_gamma": 5.0}})


def test_sigmas_are_comfyuis_simple_scheduler_at_shift_6():
    sigmas = lumina2.comfy_sigmas(20)
    # ComfyUI 0.3.64 printed these for KSampler "simple" on a Lumina 2 model (model_sampling shift 6.0).
    expected = [1.0, 0.9913, 0.9818, 0.9714, 0.96]
    assert [round(s, 4) for s in sigmas[:5].tolist()] == expected
    assert [round(s, 4) for s in sigmas[-3:].tolist()] == [0.4, 0.24, 0.0]


# ---------------------------------------------------------------- ComfyUI's CLIP object, duck-typed


class FakeLumina2Clip:
    """ComfyUI's CLIP interface as its Lumina2 text encoder behaves (comfy/text_encoders/lumina2.py: BOS, then the
    sentencepiece ids, unpadded and uncut; hidden layer -2 of the whole Gemma before its norm)."""

    def __init__(self, text):
        self.text = text

    def tokenize(self, prompt, disable_weights=False):
        assert disable_weights
        return {"gemma2_2b": [[(lumina2.BOS, 1.0), *((i, 1.0) for i in self.text.tokenizer.encode(prompt))]]}

    def encode_from_tokens(self, tokens):
        ids = torch.tensor([[i for i, _ in tokens["gemma2_2b"][0]]])
        with torch.no_grad():
            return self.text.full(input_ids=ids, output_hidden_states=True).hidden_states[-2]


def test_comfy_text_is_the_engines_embedding_and_conditioning_is_comfyuis_format(tiny):
    clip = FakeLumina2Clip(tiny.text)
    for caption in CAPTIONS:
        got = FAMILY.comfy_text(clip, caption, 256, lumina2.SYSTEM_PROMPTS["superior"])
        expected = FAMILY.encode_text(tiny.text, [caption])
        assert all(torch.equal(got[key], expected[key][0]) for key in expected)
    cut = FAMILY.comfy_text(clip, CAPTIONS[0], 4, lumina2.SYSTEM_PROMPTS["superior"])
    assert cut["mask"].tolist() == [1.0] * 4
    [[cond, extras]] = FAMILY.comfy_conditioning(got, 1.0)
    assert cond.shape == (1, 5, 64) and torch.equal(extras["attention_mask"], torch.ones(1, 5, dtype=torch.long))

    class FluxClip:
        def tokenize(self, prompt, disable_weights=False):
            return {"l": [], "t5xxl": []}
    with pytest.raises(ConfigError, match="not Lumina 2's Gemma-2-2B: load it with CLIPLoader, type lumina2"):
        FAMILY.comfy_text(FluxClip(), "x", 16)


# ---------------------------------------------------------------- training, export, previews


def test_training_lowers_the_held_out_validation_loss(make_config):
    cfg = make_config(family_name="lumina2", train={"steps": 40, "batch_size": 2, "validate_every": 20},
                      optimizer={"lr": 3e-3}, adapter={"rank": 8, "alpha": 8.0, "targets": "all_linear"})
    session = Session.open(cfg)
    before = session.validate()
    session.run()
    after = session.validate()
    assert after < 0.8 * before, (before, after)


PRESET_MODULES = {
    "attention": ("attention.qkv", "attention.out"),
    "attention_mlp": ("attention.qkv", "attention.out", "feed_forward.w1", "feed_forward.w2", "feed_forward.w3"),
}


@pytest.mark.parametrize("preset", ["attention", "attention_mlp", "all_linear"])
def test_exports_use_comfyuis_native_names_with_alpha(make_config, preset):
    session = Session.open(make_config(family_name="lumina2", adapter={"targets": preset, "rank": 4, "alpha": 2.0},
                                       train={"steps": 1}))
    session.step(1)
    exported = load_file(session.export(dtype="fp32"))
    modules = {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k.removesuffix(".alpha") for k in exported}
    leaves = PRESET_MODULES.get(preset, (*PRESET_MODULES["attention_mlp"], "adaLN_modulation.1"))
    blocks = ["layers.0", "layers.1", "noise_refiner.0", "context_refiner.0"]
    expected = {f"diffusion_model.{b}.{leaf}" for b in blocks for leaf in leaves
                if not (b.startswith("context_refiner") and leaf == "adaLN_modulation.1")}
    assert modules == expected
    for module in modules:
        assert exported[f"{module}.alpha"].item() == 2.0
        assert {f"{module}.lora_A.weight", f"{module}.lora_B.weight"} <= exported.keys()
    assert exported["diffusion_model.layers.0.attention.qkv.lora_B.weight"].shape == (128, 4)  # q 64 | k 32 | v 32
    assert FAMILY.export_key(DENOISER, "layers.1.norm1.linear") == "diffusion_model.layers.1.adaLN_modulation.1"


def test_previews_use_classifier_free_guidance_against_the_empty_caption(make_config):
    session = Session.open(make_config(family_name="lumina2", train={"steps": 1},
                                       sample={"prompts": ["zwx, a red disc"], "steps": 2, "guidance": 4.0}))
    assert set(session.sample_texts) == {"zwx, a red disc", ""}
    guided = session.sample("zwx, a red disc", seed=0)
    assert guided.tobytes() == session.sample("zwx, a red disc", seed=0).tobytes()
    assert guided.tobytes() != session.sample("zwx, a red disc", seed=0, guidance=1.0).tobytes()
    assert session.preview().is_file()


def test_the_example_config_and_the_demo(tmp_path, capsys):
    assert main(["config", "--example", "lumina2"]) == 0
    example = capsys.readouterr().out
    assert 'family = "lumina2"' in example and "gemma_2_2b_fp16.safetensors" in example
    # The demo, reduced (the CLI's run trains what prepare wrote): the LoRA lowers the validation loss.
    demo.prepare(tmp_path / "demo", images=8, steps=40, vae_steps=20, base_steps=40, family_name="lumina2")
    assert main(["demo", "--family", "lumina2", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    before, after = (float(v) for v in re.search(r"validation loss ([\d.]+) -> ([\d.]+)", out).groups())
    assert after < 0.95 * before, out
