"""The SDXL family beyond the conformance test: file layouts against diffusers' converters, the prediction type
read from the checkpoint, ComfyUI's caption windows, micro-conditioning of a cropped, bucketed, flipped sample,
the DDPM training pieces as the session uses them, classifier-free guidance in previews, text-encoder training
with its own learning rate, its export read by diffusers' SDXL LoRA loader, and exact resume after SIGKILL."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from loraloom.loaders.buckets import BucketSettings
from loraloom.loaders.dataset import Geometry, TrainingData
from loraloom.loaders.files import atomic_save_safetensors
from loraloom.loaders.sources import SourceSettings
from loraloom.training.config import MODEL_FILES, ConfigError, TrainConfig, config_from_dict, load_config, to_toml
from loraloom.training.encoders import CachedOnly, Encoders
from loraloom.training.families import family, sdxl, sdxl_layout
from loraloom.training.families.base import DENOISER
from loraloom.training.objectives import alphas_cumprod, scaled_linear_betas, snr
from loraloom.training.session import Session

SDXL = family("sdxl")
CAPTIONS = ["zwx, a red circle on a yellow background", "a blue square"]

_spec = importlib.util.spec_from_file_location(
    "resume_stress", Path(__file__).parents[1] / "benchmarks" / "resume_stress.py")
resume_stress = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(resume_stress)


@pytest.fixture(scope="module")
def kit(tmp_path_factory):
    tiny = SDXL.tiny(seed=0, words=("zwx", "disc"))
    return tiny, SDXL.write_tiny(tiny, tmp_path_factory.mktemp("sdxl"))


def run_config(files: dict, images: Path, run_dir: Path, **sections) -> dict:
    """A fast fp32 SDXL run over the tiny files, as plain data; ``sections`` override fields."""
    base = {
        "model": {"family": "sdxl", **{s: str(files[s]) for s in MODEL_FILES if s in files}, "text_length": 77},
        "data": {"images": str(images), "resolution": 64, "validation_images": 2,
                 "cache_dir": str(run_dir.parent / "cache")},
        "adapter": {"rank": 4, "alpha": 4.0},
        "optimizer": {"lr": 1e-3, "scheduler": "constant"},
        "train": {"steps": 4, "batch_size": 2, "mixed_precision": "fp32", "gradient_checkpointing": False,
                  "checkpoint_every": 0, "validate_every": 0},
        "output": {"run_dir": str(run_dir)},
    }
    for name, values in sections.items():
        base[name] = {**base.get(name, {}), **values}
    return base


# ---------------------------------------------------------------- files


def test_unet_renames_are_diffusers_own_conversion_and_widths_come_from_the_shapes(kit):
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel
    from diffusers.loaders.single_file_utils import convert_ldm_unet_checkpoint

    tiny, _ = kit
    sdxl_base = dict(  # stabilityai/stable-diffusion-xl-base-1.0's unet/config.json
        block_out_channels=(320, 640, 1280), layers_per_block=2,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
        transformer_layers_per_block=(1, 2, 10), attention_head_dim=(5, 10, 20), cross_attention_dim=2048,
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=256,
        projection_class_embeddings_input_dim=2816)
    with init_empty_weights():
        base = UNet2DConditionModel(**sdxl_base)
    for model in (tiny.denoiser, base):
        sd = model.state_dict()
        ldm = sdxl_layout.unet_to_ldm(sd)
        back = sdxl_layout.unet_from_ldm(ldm)
        assert list(back) == list(sd) and all(back[k] is sd[k] for k in sd)  # pure renames, in order
        theirs = convert_ldm_unet_checkpoint({sdxl_layout.CKPT_UNET + k: v for k, v in ldm.items()},
                                             dict(model.config))
        assert theirs.keys() == back.keys() and all(theirs[k] is back[k] for k in back)
        config = sdxl_layout.unet_config(sd)
        for key in ("block_out_channels", "layers_per_block", "down_block_types", "up_block_types",
                    "cross_attention_dim", "use_linear_projection", "projection_class_embeddings_input_dim"):
            assert list(_seq(config[key])) == list(_seq(model.config[key])), key
        depths = config["transformer_layers_per_block"]
        assert [d if isinstance(d, int) else d[0] for d in depths] == list(_seq(model.config.
                                                                                transformer_layers_per_block))
    assert sdxl_layout.unet_config(base.state_dict())["attention_head_dim"] == [5, 10, 20]


def _seq(value):
    return value if isinstance(value, (list, tuple)) else [value]


def test_clip_g_openclip_layout_is_diffusers_own_conversion(kit):
    from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

    tiny, _ = kit
    model = tiny.text.clip_g
    classic = sdxl_layout.classic_clip_keys(model.state_dict())
    open_clip = sdxl_layout.clip_g_to_open_clip(classic)
    assert "transformer.resblocks.0.attn.in_proj_weight" in open_clip and "text_projection" in open_clip
    back = sdxl_layout.clip_g_from_open_clip(open_clip)
    assert back.keys() == classic.keys() and all(torch.equal(back[k], classic[k]) for k in classic)
    prefix = sdxl_layout.CKPT_CLIP_G
    theirs = convert_open_clip_checkpoint(model, {prefix + k: v for k, v in open_clip.items()}, prefix=prefix)
    assert all(torch.equal(theirs[k], back[k]) for k in theirs) and theirs.keys() <= back.keys()


def test_every_layout_users_have_loads_the_same_parts(kit, tmp_path):
    tiny, files = kit
    model = config_from_dict(run_config(files, tmp_path, tmp_path / "run")).model
    unet = SDXL.load_denoiser(model, torch.float32, keep_float8=False).state_dict()
    folder = dict(diffusion_model=str(files["diffusers"]), text_encoder=str(files["diffusers"]),
                  text_encoder_2=str(files["diffusers"]), vae=str(files["diffusers"]), tokenizer="")
    bundle = {slot: str(files["checkpoint"]) for slot in ("diffusion_model", "text_encoder", "text_encoder_2", "vae")}
    for where in (folder, bundle):
        other = config_from_dict(run_config({**files, **where}, tmp_path, tmp_path / "run")).model
        loaded = SDXL.load_denoiser(other, torch.float32, keep_float8=False).state_dict()
        # The diffusers folder holds the fp32 weights, the single files bf16.
        assert all(torch.equal(loaded[k].to(torch.bfloat16), v.to(torch.bfloat16)) for k, v in unet.items())
        text = SDXL.load_text_encoder(other, torch.float32)
        for ours, theirs in ((text.clip_l, tiny.text.clip_l), (text.clip_g, tiny.text.clip_g)):
            assert all(torch.equal(a, b) for a, b in zip(ours.state_dict().values(), theirs.state_dict().values()))
        vae = SDXL.load_vae(other)
        assert all(torch.equal(a, b) for a, b in zip(vae.state_dict().values(), tiny.vae.state_dict().values()))
    # CLIP-G in OpenCLIP names alone (as ComfyUI's CLIPSave writes it); fp8 UNet kept in float8 when asked.
    open_clip = tmp_path / "clip_g_open_clip.safetensors"
    atomic_save_safetensors(sdxl_layout.clip_g_to_open_clip(load_file(files["text_encoder_2"])), open_clip)
    text = SDXL.load_text_encoder(config_from_dict(run_config({**files, "text_encoder_2": open_clip}, tmp_path,
                                                              tmp_path / "run")).model, torch.float32)
    assert all(torch.equal(a, b) for a, b in zip(text.clip_g.state_dict().values(),
                                                 tiny.text.clip_g.state_dict().values()))
    fp8 = SDXL.load_denoiser(config_from_dict(run_config({**files, "diffusion_model": files["diffusion_model_fp8"]},
                                                         tmp_path, tmp_path / "run")).model, torch.float32, True)
    assert fp8.down_blocks[1].attentions[0].proj_in.weight.dtype == torch.float8_e4m3fn


def test_a_clip_l_file_given_as_clip_g_is_named_in_the_error(kit, tmp_path):
    _, files = kit
    model = config_from_dict(run_config({**files, "text_encoder_2": files["text_encoder"]}, tmp_path,
                                        tmp_path / "run")).model
    with pytest.raises(ValueError, match="text_encoder_2 must be SDXL's CLIP-G"):
        SDXL.load_text_encoder(model, torch.float32)
    model = config_from_dict(run_config({**files, "diffusion_model": files["vae"]}, tmp_path, tmp_path / "run")).model
    with pytest.raises(ValueError, match=r"vae\.safetensors is not an SDXL-family UNet: expected keys like 'input_"):
        SDXL.load_denoiser(model, torch.float32, keep_float8=False)


def test_prediction_auto_reads_the_checkpoint_markers_as_comfyui_does(kit, tmp_path):
    _, files = kit
    sd = load_file(files["checkpoint"])
    for markers, expected in (((), ("epsilon", False)), (("v_pred",), ("v_prediction", False)),
                              (("v_pred", "ztsnr"), ("v_prediction", True))):
        path = tmp_path / f"{'-'.join(markers) or 'eps'}.safetensors"
        atomic_save_safetensors({**sd, **{m: torch.tensor([]) for m in markers}}, path)
        model = config_from_dict(run_config({**files, "diffusion_model": path}, tmp_path, tmp_path / "r")).model
        assert (model.prediction, model.zero_terminal_snr) == expected
        assert SDXL.load_denoiser(model, torch.float32, False)  # the markers are no UNet weights
    explicit = config_from_dict(run_config({**files, "diffusion_model": path}, tmp_path, tmp_path / "r",
                                           model={"prediction": "epsilon"})).model
    assert (explicit.prediction, explicit.zero_terminal_snr) == ("epsilon", False)  # the user's word wins
    with pytest.raises(ConfigError, match=r"zero_terminal_snr needs model\.prediction = 'v_prediction'"):
        config_from_dict(run_config(files, tmp_path, tmp_path / "r",
                                    model={"prediction": "epsilon", "zero_terminal_snr": True}))
    with pytest.raises(ConfigError, match="discrete DDPM steps"):
        config_from_dict(run_config(files, tmp_path, tmp_path / "r", train={"timesteps": "auto_shift"}))
    with pytest.raises(ConfigError, match="trained by flow matching"):
        config_from_dict({"model": {"family": "flux"}, "train": {"min_snr_gamma": 5.0}})


# ---------------------------------------------------------------- text


def test_captions_are_cut_into_comfyuis_windows(kit):
    tiny, _ = kit
    tok = tiny.text.tokenizer
    start, end = tok.bos_token_id, tok.eos_token_id
    word = tok("cat", add_special_tokens=False)["input_ids"][0]
    for count, windows in ((0, 1), (75, 1), (76, 2), (150, 2), (151, 3), (400, 3)):
        ids_l, ids_g = sdxl.token_windows(tok, " ".join(["cat"] * count), windows=3)
        assert ids_l.shape == ids_g.shape == (windows, 77)
        assert (ids_l[:, 0] == start).all() and (ids_g[:, 0] == start).all()
        body = min(count, 225)
        assert int((ids_l == word).sum()) == int((ids_g == word).sum()) == body
        last = body - 75 * (windows - 1)  # tokens in the last window; every window ends with the end token
        assert ids_l[-1, last + 1] == end and ids_g[-1, last + 1] == end
        assert (ids_l[-1, last + 2:] == end).all() and (ids_g[-1, last + 2:] == 0).all()  # L pads with end, G 0
    escaped, plain = (sdxl.token_windows(tok, c, 3)[0] for c in ("a \\(cat\\)", "a (cat)"))
    assert torch.equal(escaped, plain)  # ComfyUI reads an escaped bracket as the bracket


def test_a_batch_of_captions_of_different_lengths_predicts_as_each_alone(kit):
    tiny, _ = kit
    long = ", ".join(["zwx red circle on a yellow background"] * 12)  # 2 windows
    text = SDXL.encode_text(tiny.text, ["a cat", long, long + ", " + long])
    assert text["windows"].tolist() == [1.0, 2.0, 3.0]
    assert torch.equal(text["context"][0, 77:], torch.zeros(154, 64))  # nothing after the caption's windows
    x = torch.randn(3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    t = torch.tensor([0.3, 0.5, 0.7])
    geometry = [Geometry((64, 64), (0, 0), (64, 64))] * 3
    with torch.no_grad():
        batched = SDXL.predict(tiny.denoiser, x, t, text, geometry, 1.0)
        alone = [SDXL.predict(tiny.denoiser, x[i:i + 1], t[i:i + 1], {k: v[i:i + 1] for k, v in text.items()},
                              geometry[:1], 1.0) for i in range(3)]
    torch.testing.assert_close(batched, torch.cat(alone), rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- micro-conditioning


def test_micro_conditioning_of_a_cropped_bucketed_flipped_sample(kit, tmp_path):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    tiny, _ = kit
    (tmp_path / "img").mkdir()
    Image.new("RGB", (150, 100), (200, 30, 30)).save(tmp_path / "img" / "wide.png")
    (tmp_path / "img" / "wide.txt").write_text("zwx")
    # At 64 px the 3:2 picture gets the 64x64 bucket, is resized to cover it (96x64) and cut at a random left.
    data = TrainingData.build([SourceSettings(path=str(tmp_path / "img"))], resolution=64,
                              divisor=SDXL.bucket_divisor, seed=3,
                              buckets=BucketSettings(enabled=True, crop="random", flip=True))
    assert data.bucket[0].tolist() == [64, 64] and data.resized[0].tolist() == [96, 64]
    left = int(data.crop[0][0])
    assert 0 <= left <= 32 and left != 16  # off centre, so the mirror shows
    plain, flipped = data.geometry([0, 0], [False, True])
    ids = sdxl.size_ids([plain, flipped])
    # (original h, w), (crop top, left), (target h, w); mirrored, the crop's left is measured from the right.
    assert ids.tolist() == [[100, 150, 0, left, 64, 64], [100, 150, 0, 96 - 64 - left, 64, 64]]
    # The same vector as diffusers' SDXL pipeline builds from (h, w), (top, left), (h, w).
    pipe = StableDiffusionXLPipeline(vae=tiny.vae, text_encoder=tiny.text.clip_l, text_encoder_2=tiny.text.clip_g,
                                     tokenizer=tiny.text.tokenizer, tokenizer_2=tiny.text.tokenizer,
                                     unet=tiny.denoiser, scheduler=EulerDiscreteScheduler())
    theirs = pipe._get_add_time_ids((100, 150), (0, 96 - 64 - left), (64, 64), torch.float32,
                                    text_encoder_projection_dim=tiny.text.clip_g.config.projection_dim)
    assert torch.equal(theirs, ids[1:])
    # ...and it reaches the UNet: the family's prediction is the UNet's with these ids, and depends on them.
    text = SDXL.encode_text(tiny.text, ["zwx"])
    x, t = torch.randn(1, 4, 16, 16, generator=torch.Generator().manual_seed(1)), torch.tensor([0.5])
    with torch.no_grad():
        ours = SDXL.predict(tiny.denoiser, x, t, text, [flipped], 1.0)
        unet = tiny.denoiser(x, torch.tensor([500]), text["context"][:, :77],
                             added_cond_kwargs={"text_embeds": text["pooled"], "time_ids": theirs}).sample
        other = SDXL.predict(tiny.denoiser, x, t, text, [plain], 1.0)
    torch.testing.assert_close(ours, unet, rtol=1e-5, atol=1e-6)
    assert (ours - other).abs().max() > 1e-4


# ---------------------------------------------------------------- the objective as the session uses it


def test_noised_draws_steps_weights_and_offset_noise(kit):
    latents = torch.randn(64, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    train = SDXL.resolve_train(TrainConfig(min_snr_gamma=5.0, noise_offset=0.0357, debiased_estimation=True))
    v = SDXL.for_model(config_from_dict({"model": {"family": "sdxl", "prediction": "v_prediction"}}).model)
    noised = v.noised(latents, train, torch.Generator().manual_seed(1))
    index = torch.round(noised.t * 999).long()
    assert torch.equal(noised.t, index.float() / 999)  # a drawn time is one of the 1000 steps
    abar = alphas_cumprod(scaled_linear_betas())[index]
    x0 = latents * sdxl.LATENT_SCALE
    a = abar.float().view(-1, 1, 1, 1)
    torch.testing.assert_close(noised.inputs, a.sqrt() * x0 + (1 - a).sqrt() * noised.noise)
    torch.testing.assert_close(noised.target, a.sqrt() * noised.noise - (1 - a).sqrt() * x0)
    s = snr(abar)
    torch.testing.assert_close(noised.weights, (s.clamp(max=5) / (s + 1) / s.clamp(1e-3, 1000).sqrt()).float())
    # The drawn noise carries the offset: N(0,1) then one N(0,1) per sample and channel, times 0.0357.
    g = torch.Generator().manual_seed(1)
    base = torch.randn(latents.shape, generator=g)
    torch.testing.assert_close(noised.noise, base + 0.0357 * torch.randn(64, 4, 1, 1, generator=g))
    fixed = SDXL.noised(latents, train, g, t=torch.full((64,), 0.25), noise=base)
    assert torch.equal(fixed.noise, base) and torch.equal(fixed.target, base)  # epsilon; given noise kept as is


def test_previews_guide_with_the_empty_caption_on_the_prediction_types_schedule(kit):
    tiny, _ = kit
    text, negative = (SDXL.encode_text(tiny.text, [c]) for c in ("zwx, a red circle", ""))
    def sample(family, guidance, **kw):
        return family.sample(tiny.denoiser, text, (64, 64), (8, 8), seed=0, steps=3, guidance=guidance, **kw)
    plain = sample(SDXL, 1.0)
    assert torch.equal(sample(SDXL, 1.0, negative=negative), plain)  # guidance 1: no unconditional pass
    assert (sample(SDXL, 5.0, negative=negative) - plain).abs().max() > 1e-3
    v = SDXL.for_model(config_from_dict({"model": {"family": "sdxl", "prediction": "v_prediction",
                                                   "zero_terminal_snr": True}}).model)
    zsnr = sample(v, 1.0)
    assert torch.isfinite(zsnr).all() and (zsnr - plain).abs().max() > 1e-3


def test_an_fp16_vae_that_overflows_is_named():
    vae = SDXL.tiny(seed=0).vae.to(torch.float16)
    with torch.no_grad():
        vae.encoder.conv_in.weight.mul_(1e6)  # as SDXL's original VAE overflows in fp16 on real pictures
    with pytest.raises(ValueError, match="vae_precision"):
        SDXL.encode_images(vae, torch.rand(1, 3, 32, 32) * 2 - 1)


# ---------------------------------------------------------------- text-encoder training and its export


@pytest.fixture(scope="module")
def te_session(kit, shapes_folder, tmp_path_factory):
    """Three steps training the UNet at 2e-3 and both text encoders at 5e-4, on shuffled captions. The UNet's
    preset is attention_mlp: diffusers' kohya converter misreads ``lora_unet_add_embedding_*`` (as
    ``add.embedding``), so all_linear exports are proven against ComfyUI in the host tests instead."""
    _, files = kit
    folder = tmp_path_factory.mktemp("te")
    cfg = config_from_dict(run_config(
        files, shapes_folder, folder / "run", adapter={"targets": "attention_mlp", "rank": 4, "alpha": 2.0},
        optimizer={"lr": 2e-3, "text_encoder_lr": 5e-4},
        data={"captions": {"shuffle": True}}, train={"steps": 3, "min_snr_gamma": 5.0, "noise_offset": 0.05}))
    session = Session.open(cfg)
    session.run()
    return session


def test_text_encoders_train_at_their_own_rate_and_export_under_kohyas_names(te_session):
    session = te_session
    components = {name.split(".", 1)[0] for name in session.adapted_modules}
    assert components == {DENOISER, "text_encoder", "text_encoder_2"}
    assert sorted(g["lr"] for g in session.optimizer.param_groups) == [5e-4, 5e-4, 2e-3]
    state = session.adapter.state()
    for component in ("text_encoder", "text_encoder_2"):  # B starts at zero: trained, it is not
        assert any(k.startswith(component) and "lora_B" in k and v.abs().max() > 0 for k, v in state.items())
    with torch.no_grad():
        trained = session.prompt_text(CAPTIONS[0])
        with session.adapter.disabled():
            base = session.prompt_text(CAPTIONS[0])
    assert (trained["context"] - base["context"]).abs().max() > 1e-5
    exported = load_file(session.export(dtype="fp32"))
    names = {k.rsplit(".", 2)[0] if not k.endswith(".alpha") else k.removesuffix(".alpha") for k in exported}
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj" in names
    assert "lora_te2_text_model_encoder_layers_2_mlp_fc2" in names
    assert "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k" in names
    assert "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
    assert all(f"{n}.alpha" in exported and f"{n}.lora_down.weight" in exported for n in names)


def test_text_encoder_training_refuses_a_given_text_encoder(kit, shapes_folder, tmp_path):
    _, files = kit
    cfg = config_from_dict(run_config(files, shapes_folder, tmp_path / "run", optimizer={"text_encoder_lr": 1e-4}))
    with pytest.raises(ConfigError, match="leave the clip input of Encode dataset unconnected"):
        Session.open(cfg, encoders=Encoders(text=CachedOnly("comfy-clip-77-0")))


def test_diffusers_sdxl_loader_reproduces_the_engines_unet_and_text_encoders(te_session, kit):
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline

    session = te_session
    path = session.export(dtype="fp32")
    model = session.cfg.model
    unet = sdxl.load_unet(model.diffusion_model, torch.float32)
    text = sdxl.load_text_encoders(model, torch.float32)
    pipe = StableDiffusionXLPipeline(vae=SDXL.load_vae(model), text_encoder=text.clip_l, text_encoder_2=text.clip_g,
                                     tokenizer=text.tokenizer, tokenizer_2=text.tokenizer, unet=unet,
                                     scheduler=EulerDiscreteScheduler())
    pipe.load_lora_weights(load_file(path))
    caption = CAPTIONS[0]
    with torch.no_grad():
        ours_text = session.prompt_text(caption)
        theirs_text = SDXL.encode_text(text, [caption])
        item = session.val_items[0]
        x = item.latent[None] * sdxl.LATENT_SCALE
        t = torch.tensor([0.6])
        ours = session.predict(x, t, ours_text, 1.0)
        base = session.predict(x, t, ours_text, 1.0, adapter=False)
        theirs = SDXL.predict(pipe.unet, x, t, ours_text, [Geometry((64, 64), (0, 0), (64, 64))], 1.0)
    for key in ("context", "pooled"):
        rel = (theirs_text[key] - ours_text[key]).norm() / ours_text[key].norm()
        assert rel < 1e-4, key
    assert (ours - base).abs().max() > 1e-3  # the adapter matters, so agreement means something
    assert ((theirs - ours).norm() / ours.norm()).item() < 1e-4


def test_sigkill_at_random_points_then_resume_equals_an_uninterrupted_run(kit, shapes_folder, tmp_path):
    """Text encoders trained on shuffled captions, v-prediction with zero terminal SNR, noise offset and
    min-SNR: every draw and the per-step encoding must come back exactly."""
    _, files = kit
    path = tmp_path / "vpred.safetensors"
    atomic_save_safetensors({**load_file(files["checkpoint"]), "v_pred": torch.tensor([]),
                             "ztsnr": torch.tensor([])}, path)
    for name in ("straight", "killed"):
        cfg = load_config_from(run_config(
            {**files, "diffusion_model": path}, shapes_folder, tmp_path / name,
            optimizer={"text_encoder_lr": 5e-4}, adapter={"dropout": 0.1}, data={"captions": {"shuffle": True}},
            train={"steps": 8, "checkpoint_every": 2, "keep_checkpoints": 2, "validate_every": 3,
                   "min_snr_gamma": 5.0, "noise_offset": 0.0357}), tmp_path / f"{name}.toml")
        assert cfg.model.prediction == "v_prediction" and cfg.model.zero_terminal_snr
    resume_stress.run_to_end(tmp_path / "straight.toml")
    trials = resume_stress.train_with_kills(tmp_path / "killed.toml", kills=5, seed=3)
    assert len(trials) == 5
    result = resume_stress.compare_runs(tmp_path / "straight", tmp_path / "killed", step=8)
    assert result["adapter_max_abs_diff"] <= 1e-6 and result["loss_max_abs_diff"] <= 1e-6
    assert result["resumed_steps"] == result["reference_steps"] == list(range(1, 9))


def load_config_from(data: dict, path: Path):
    path.write_text(to_toml(config_from_dict(data)))
    return load_config(path)
