"""The SDXL family (SDXL, Illustrious, Kohaku XL, Pony, NoobAI, ...): the UNet, CLIP-L + CLIP-G, the 4-channel VAE,
a 1000-step DDPM schedule with epsilon- or v-prediction.

Shapes: latents are raw VAE latents (B, 4, H/8, W/8); the UNet sees them times 0.13025. Text, per caption:
``context`` (77·N, D_L + D_G) = CLIP-L | CLIP-G penultimate hidden states of up to N windows of 77 tokens (2048
wide at real width), zero rows after the caption's own windows; ``windows`` () its window count as a float;
``pooled`` (P,) = CLIP-G's projected end token of the first window (1280). Every value is computed as ComfyUI
computes it for a prompt without weights (measured to 1e-6 against ComfyUI 0.3.64).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar

import torch

from ...loaders.files import ModelFileError, read_safetensors
from ..errors import ConfigError
from ..objectives import (
    alphas_cumprod,
    ddpm_inputs,
    debiased_weights,
    discrete_sigmas,
    min_snr_weights,
    offset_noise,
    rescale_zero_terminal_snr,
    sample_timesteps,
    scaled_linear_betas,
    snr,
    timestep_index,
)
from ..precision import DTYPES, assign_weights
from . import parts
from .base import DENOISER, Family, FullSize, Geometry, ModelFile, Noised, TinyModel, TokenizerFolder
from .sdxl_layout import (
    CKPT_CLIP_G,
    CKPT_CLIP_L,
    CKPT_UNET,
    V_PRED_MARKER,
    ZTSNR_MARKER,
    clip_file_to_hf,
    unet_config,
    unet_file_to_diffusers,
    unet_to_ldm,
)

if TYPE_CHECKING:
    from diffusers import UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..config import ModelConfig, RunConfig, TrainConfig

LATENT_SCALE = 0.13025  # ComfyUI's latent_format.SDXL: the UNet sees latent * scale
STEPS = 1000  # the DDPM schedule's length
WINDOW = 77  # CLIP positions: start token, 75 caption tokens, end token (and padding)
G_PAD = 0  # ComfyUI pads CLIP-G windows with token 0 ("!"), CLIP-L windows with the end token

# adapter.targets presets (regex, full match) over diffusers UNet module names.
_BLOCK = r"(down_blocks\.\d+|up_blocks\.\d+|mid_block)\.attentions\.\d+\."
_TRANSFORMER = _BLOCK + r"transformer_blocks\.\d+\."
_ATTN = r"(attn1|attn2)\.(to_q|to_k|to_v|to_out\.0)"
_MLP = r"ff\.net\.(0\.proj|2)"
_OTHER_LINEAR = rf"{_BLOCK}proj_(in|out)|.*resnets\.\d+\.time_emb_proj|(time_embedding|add_embedding)\.linear_[12]"
_CONV = r".*resnets\.\d+\.(conv1|conv2|conv_shortcut)|.*(downsamplers|upsamplers)\.0\.conv"
TARGETS = {
    "attention": rf"^{_TRANSFORMER}{_ATTN}$",
    "attention_mlp": rf"^{_TRANSFORMER}({_ATTN}|{_MLP})$",
    "all_linear": rf"^({_TRANSFORMER}({_ATTN}|{_MLP})|{_OTHER_LINEAR})$",
    # kohya's LoCon set: every linear layer and the resnets' and samplers' convolutions (conv_in / conv_out
    # stay frozen). Algorithms that adapt only linear layers (LoRA) take the linear ones.
    "all_linear_conv": rf"^({_TRANSFORMER}({_ATTN}|{_MLP})|{_OTHER_LINEAR}|{_CONV})$",
}
# The text encoders' layers ComfyUI maps under kohya names (comfy/lora.py LORA_CLIP_MAP): attention and MLP.
TEXT_TARGET = r"^(text_model\.)?encoder\.layers\.\d+\.(self_attn\.(q_proj|k_proj|v_proj|out_proj)|mlp\.fc[12])$"
TEXT_COMPONENTS = {"text_encoder": "lora_te1_", "text_encoder_2": "lora_te2_"}  # model slot -> kohya prefix


@dataclass
class TextEncoders:
    clip_l: CLIPTextModel
    clip_g: CLIPTextModelWithProjection
    tokenizer: Any  # the CLIP BPE tokenizer both encoders read
    windows: int = 3  # caption windows of 77 tokens kept (model.text_length / 77)


# ---------------------------------------------------------------- loading


def load_unet(path: str | Path, dtype: torch.dtype, keep_float8: bool = False,
              allow_pickle: bool = False) -> UNet2DConditionModel:
    """The UNet from an all-in-one checkpoint, a UNet file (ComfyUI/LDM or diffusers keys) or a diffusers folder;
    widths from the tensors. Linear weights stored in float8 stay so with ``keep_float8``."""
    from accelerate import init_empty_weights
    from diffusers import UNet2DConditionModel

    path = Path(path)
    if path.is_dir():
        config, sd = parts.read_diffusers_folder(path, "unet", "the SDXL UNet", allow_pickle)
    else:
        sd = read_safetensors([path], what="the SDXL UNet", allow_pickle=allow_pickle, prefixes=(CKPT_UNET,))
        sd = {k: v for k, v in sd.items() if k not in (V_PRED_MARKER, ZTSNR_MARKER)}
        try:
            sd = unet_file_to_diffusers(sd)
            config = unet_config(sd)
        except (ValueError, KeyError, StopIteration) as e:  # a key the layout needs is missing or unknown
            raise ModelFileError(f"{path} is not an SDXL-family UNet: {e}. Check model.diffusion_model") from None
    with init_empty_weights():
        model = UNet2DConditionModel(**config)
    assign_weights(model, sd, dtype, keep_float8, path)
    return model.requires_grad_(False).eval()


def prediction_of(path: str | Path) -> tuple[str, bool]:
    """What a base predicts, as ComfyUI decides it: ("v_prediction", zero terminal SNR) when a single file has
    the ``v_pred`` (and ``ztsnr``) marker keys, a diffusers folder's scheduler config says so likewise;
    ("epsilon", False) otherwise, also for a file that is missing or unreadable (loading reports those)."""
    from safetensors import SafetensorError, safe_open

    path = Path(path) if path else None
    if path is None or not path.exists():
        return "epsilon", False
    if path.is_dir():
        for config in (path / "scheduler" / "scheduler_config.json", path.parent / "scheduler" /
                       "scheduler_config.json"):
            if config.is_file():
                scheduler = json.loads(config.read_text())
                return (scheduler.get("prediction_type", "epsilon"),
                        bool(scheduler.get("rescale_betas_zero_snr", False)))
        return "epsilon", False
    try:
        with safe_open(str(path), framework="pt") as f:
            keys = set(f.keys())
    except (SafetensorError, OSError):  # not a safetensors file: loading it names the problem
        return "epsilon", False
    v_pred = V_PRED_MARKER in keys
    return ("v_prediction" if v_pred else "epsilon"), v_pred and ZTSNR_MARKER in keys


def load_text_encoders(cfg: ModelConfig, dtype: torch.dtype) -> TextEncoders:
    """CLIP-L and CLIP-G with the CLIP tokenizer, from checkpoints, single files (any layout ComfyUI reads) or a
    diffusers folder."""
    from transformers import CLIPTextModel, CLIPTextModelWithProjection

    tokenizer = parts.load_tokenizer(cfg.tokenizer, cfg.text_encoder, "tokenizer", "model.tokenizer",
                                     "ComfyUI/comfy/sd1_tokenizer")
    common = dict(marker="embeddings.token_embedding.weight", allow_pickle=cfg.allow_pickle, convert=clip_file_to_hf)
    clip_l = parts.load_hf_encoder(cfg.text_encoder, "text_encoder", CLIPTextModel, parts.clip_config, tokenizer,
                                   dtype, checkpoint_prefixes=(CKPT_CLIP_L,), **common)
    clip_g = parts.load_hf_encoder(cfg.text_encoder_2, "text_encoder_2", CLIPTextModelWithProjection,
                                   _clip_g_config, tokenizer, dtype, checkpoint_prefixes=(CKPT_CLIP_G,), **common)
    return TextEncoders(clip_l, clip_g, tokenizer, max(1, cfg.text_length // WINDOW))


def _clip_g_config(sd: dict, tokenizer: Any) -> CLIPTextConfig:
    if "text_projection.weight" not in sd:
        raise ModelFileError("the CLIP-G file has no text_projection: model.text_encoder_2 must be SDXL's "
                             "CLIP-G (clip_g.safetensors), not CLIP-L")
    return parts.clip_config(sd, tokenizer, "clip_g.json", projection_dim=sd["text_projection.weight"].shape[0])


# ---------------------------------------------------------------- text


def token_windows(tokenizer: Any, caption: str, windows: int) -> tuple[torch.Tensor, torch.Tensor]:
    """A caption's token ids for CLIP-L and CLIP-G, each (n, 77) long, n ≤ ``windows``: as ComfyUI cuts an
    unweighted prompt, runs of 75 tokens between the start and end tokens, padded with the end token (L) or 0
    (G); an empty caption is one window. Escaped brackets are read as brackets, as ComfyUI reads them; longer
    captions lose their last windows."""
    text = caption.replace("\\(", "(").replace("\\)", ")")
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    body = WINDOW - 2
    chunks = [ids[i:i + body] for i in range(0, len(ids), body)][:windows] or [[]]
    start, end = tokenizer.bos_token_id, tokenizer.eos_token_id
    ids_l = [[start, *c, end] + [end] * (body - len(c)) for c in chunks]
    ids_g = [[start, *c, end] + [G_PAD] * (body - len(c)) for c in chunks]
    return torch.tensor(ids_l), torch.tensor(ids_g)


def encode_captions(enc: TextEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
    """Captions → {'context': (B, 77·N, D_L + D_G), 'windows': (B,), 'pooled': (B, P)}, float32 on the CPU.

    Differentiable: the caller picks the grad mode (the engine encodes under no_grad unless it trains the text
    encoders). All windows of all captions go through each encoder in one batch.
    """
    device = enc.clip_l.device
    pairs = [token_windows(enc.tokenizer, c, enc.windows) for c in captions]
    counts = [len(ids_l) for ids_l, _ in pairs]
    hidden_l = enc.clip_l(torch.cat([p[0] for p in pairs]).to(device), output_hidden_states=True).hidden_states[-2]
    out_g = enc.clip_g(torch.cat([p[1] for p in pairs]).to(device), output_hidden_states=True)
    hidden = torch.cat([hidden_l, out_g.hidden_states[-2]], dim=-1).float()  # no final LayerNorm, as ComfyUI
    firsts = torch.tensor([0, *counts[:-1]]).cumsum(0)
    contexts = [h.reshape(-1, h.shape[-1]) for h in hidden.split(counts)]
    length = WINDOW * enc.windows
    context = torch.stack([torch.nn.functional.pad(c, (0, 0, 0, length - len(c))) for c in contexts])
    return {"context": context.cpu(), "windows": torch.tensor(counts, dtype=torch.float32),
            "pooled": out_g.text_embeds[firsts.to(device)].float().cpu()}


def batch_contexts(context: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """Padded contexts (B, 77·N, D) with window counts (B,) → (B, 77·L, D), L the least common multiple of the
    counts: each caption's own windows repeated L / n times. Cross-attention without a mask gives exactly the
    same output for a context repeated k times, so every sample is conditioned as on its own windows; ComfyUI
    batches prompts of different lengths the same way (comfy/conds.py)."""
    counts = [int(n) for n in windows.tolist()]
    length = math.lcm(*counts)
    return torch.stack([context[i, :WINDOW * n].repeat(length // n, 1) for i, n in enumerate(counts)])


def size_ids(geometry: list[Geometry]) -> torch.Tensor:
    """Micro-conditioning (B, 6): original (h, w), crop (top, left), target (h, w) of each sample, in pixels,
    as diffusers' ``add_time_ids`` and ComfyUI's (height, width, crop_h, crop_w, target_height,
    target_width) order them."""
    return torch.tensor([[g.original[1], g.original[0], g.crop[1], g.crop[0], g.target[1], g.target[0]]
                         for g in geometry], dtype=torch.float32)


# ---------------------------------------------------------------- the UNet's view


def unet_output(model: UNet2DConditionModel, inputs: torch.Tensor, index: torch.Tensor,
                text: dict[str, torch.Tensor], geometry: list[Geometry]) -> torch.Tensor:
    """The UNet's raw output (B, 4, h, w) float32 for scaled noisy latents ``inputs`` at step indices ``index``
    (B,), batched ``text`` and each sample's geometry."""
    device = next(model.parameters()).device
    context = batch_contexts(text["context"], text["windows"])
    out = model(inputs.to(device), index.to(device), encoder_hidden_states=context.to(device),
                added_cond_kwargs={"text_embeds": text["pooled"].to(device),
                                   "time_ids": size_ids(geometry).to(device)}, return_dict=False)[0]
    return out.float()


class Sdxl(Family):
    name = "sdxl"
    title = "SDXL"
    architecture = "stable-diffusion-xl-v1-base"
    files = (
        ModelFile("diffusion_model", "unet", "diffusion_models",
                  "The UNet: an SDXL-family checkpoint (Illustrious, Kohaku XL, Pony, ...) or a UNet file."),
        ModelFile("text_encoder", "clip_l", "text_encoders", "CLIP-L: the checkpoint, or clip_l.safetensors."),
        ModelFile("text_encoder_2", "clip_g", "text_encoders", "CLIP-G: the checkpoint, or clip_g.safetensors."),
        ModelFile("vae", "vae", "vae", "The VAE: the checkpoint, or an SDXL VAE (sdxl_vae.safetensors)."),
    )
    tokenizers = (TokenizerFolder("tokenizer", "clip_tokenizer", "sd1_tokenizer", "CLIP tokenizer folder"),)
    latent_channels = 4
    latent_scale = LATENT_SCALE
    bucket_divisor = 32  # VAE factor 8 x the UNet's two downsamplings
    caption_format = "tags"
    text_length = 3 * WINDOW  # three windows: 225 caption tokens, kohya's longest setting
    targets = TARGETS
    quantized = rf"^({_TRANSFORMER}({_ATTN}|{_MLP})|{_BLOCK}proj_(in|out))$"
    noise_prediction = True
    text_encoders_trainable = True
    text_targets: ClassVar[dict[str, str]] = {name: TEXT_TARGET for name in TEXT_COMPONENTS}
    negative_caption = ""  # ComfyUI's empty prompt, for classifier-free guidance in previews
    node_options = ("base_precision", "prediction", "zero_terminal_snr", "vae_precision", "text_length")
    node_note = ("Pick an all-in-one checkpoint in every list to train on it. v-prediction bases are recognised "
                 "by their v_pred key (prediction auto).")

    def __init__(self, prediction: str = "epsilon", zero_terminal_snr: bool = False):
        self.prediction, self.zero_terminal_snr = prediction, zero_terminal_snr
        betas = scaled_linear_betas(STEPS)
        self.abar = alphas_cumprod(rescale_zero_terminal_snr(betas) if zero_terminal_snr else betas)

    def for_model(self, model: ModelConfig) -> Sdxl:
        prediction = "epsilon" if model.prediction == "auto" else model.prediction
        return Sdxl(prediction, model.zero_terminal_snr)

    # ---------------------------------------------------------------- configuration

    def resolve(self, cfg: RunConfig) -> RunConfig:
        """Besides the shared settings: text_length in whole windows, and the prediction type ("auto": from the
        base's v_pred / ztsnr keys, as ComfyUI decides it)."""
        cfg = super().resolve(cfg)
        model = cfg.model
        prediction, ztsnr = model.prediction, model.zero_terminal_snr
        if prediction == "auto":
            prediction, found = prediction_of(model.diffusion_model)
            ztsnr = ztsnr or found
        if ztsnr and prediction != "v_prediction":
            raise ConfigError("model.zero_terminal_snr needs model.prediction = 'v_prediction': epsilon cannot be "
                              "predicted from pure noise at the schedule's last step")
        length = -(-model.text_length // WINDOW) * WINDOW
        return dataclasses.replace(cfg, model=dataclasses.replace(model, prediction=prediction,
                                                                  zero_terminal_snr=ztsnr, text_length=length))

    def resolve_train(self, train: TrainConfig) -> TrainConfig:
        if train.timesteps in ("shift", "auto_shift"):
            raise ConfigError(f"train.timesteps = {train.timesteps!r} shifts flow-matching times; {self.title} is "
                              "trained on discrete DDPM steps: use 'uniform' (its recipe) or 'sigmoid'")
        return dataclasses.replace(train, timesteps="uniform" if train.timesteps == "auto" else train.timesteps)

    def warnings(self, cfg: RunConfig) -> list[str]:
        if cfg.model.vae_precision == "fp16":
            return ["model.vae_precision = 'fp16': SDXL's original VAE overflows in fp16 (NaN latents); use it only "
                    "with an fp16-fix VAE (madebyollin's sdxl-vae-fp16-fix)"]
        return []

    def example(self) -> dict[str, dict[str, Any]]:
        """Kohaku XL Epsilon's recipe (seed document 002) on a checkpoint from ComfyUI's checkpoints folder."""
        checkpoint = "ComfyUI/models/checkpoints/kohaku-xl-epsilon.safetensors"
        return {
            "model": dict(diffusion_model=checkpoint, text_encoder=checkpoint, text_encoder_2=checkpoint,
                          vae=checkpoint, tokenizer="ComfyUI/comfy/sd1_tokenizer"),
            "data": {"resolution": 1024, "buckets": {"enabled": True, "min_side": 256, "max_side": 4096},
                     "captions": {"format": "tags", "shuffle": True, "tag_dropout": 0.15}},
            "optimizer": {"name": "lion8bit", "lr": 2e-5, "text_encoder_lr": 5e-6, "betas": [0.9, 0.95],
                          "weight_decay": 0.1, "scheduler": "constant_with_warmup", "warmup_steps": 1000},
            "train": {"batch_size": 4, "gradient_accumulation": 16, "min_snr_gamma": 5.0, "noise_offset": 0.0357},
            "sample": {"guidance": 7.0, "steps": 28},
        }

    # ---------------------------------------------------------------- models

    def load_denoiser(self, model: ModelConfig, dtype: torch.dtype, keep_float8: bool) -> torch.nn.Module:
        return load_unet(model.diffusion_model, dtype, keep_float8, model.allow_pickle)

    def load_text_encoder(self, model: ModelConfig, dtype: torch.dtype) -> TextEncoders:
        return load_text_encoders(model, dtype)

    def text_encoder_to(self, text: TextEncoders, device: torch.device) -> None:
        text.clip_l.to(device)
        text.clip_g.to(device)

    def text_encoder_modules(self, text: TextEncoders) -> dict[str, torch.nn.Module]:
        return {"text_encoder": text.clip_l, "text_encoder_2": text.clip_g}

    def encode_text(self, text: TextEncoders, captions: list[str]) -> dict[str, torch.Tensor]:
        return encode_captions(text, captions)

    def load_vae(self, model: ModelConfig) -> torch.nn.Module:
        return parts.load_vae(model.vae, "the SDXL VAE", DTYPES[model.vae_precision], model.allow_pickle)

    def encode_images(self, vae: torch.nn.Module, pixels: torch.Tensor) -> torch.Tensor:
        latents = super().encode_images(vae, pixels)
        if not torch.isfinite(latents).all():
            raise ModelFileError(f"the VAE made NaN/inf latents in {vae.dtype}: SDXL's VAE overflows in fp16. Use "
                                 "model.vae_precision = 'fp32' or 'bf16', or an fp16-fix VAE")
        return latents

    # ---------------------------------------------------------------- training

    def noised(self, latents: torch.Tensor, train: TrainConfig, generator: torch.Generator,
               t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> Noised:
        """A drawn t is a step of the 1000 (index / 999): uniform over the steps, or a sigmoid draw rounded to
        one. Drawn noise carries ``train.noise_offset``; weights are min-SNR-γ and debiased estimation's."""
        x0 = latents * LATENT_SCALE
        if noise is None:
            noise = offset_noise(torch.randn(x0.shape, generator=generator), train.noise_offset, generator)
        if t is None:
            index = (torch.randint(0, STEPS, (len(x0),), generator=generator) if train.timesteps == "uniform"
                     else timestep_index(sample_timesteps(train.timesteps, len(x0), generator,
                                                          sigmoid_scale=train.sigmoid_scale), STEPS))
            t = index.float() / (STEPS - 1)
        abar = self.abar[timestep_index(t, STEPS)]
        inputs, target = ddpm_inputs(x0, noise, abar, self.prediction)
        weights = torch.ones(len(x0), dtype=torch.float64)
        if train.min_snr_gamma:
            weights = weights * min_snr_weights(snr(abar), train.min_snr_gamma, self.prediction)
        if train.debiased_estimation:
            weights = weights * debiased_weights(snr(abar))
        return Noised(inputs, noise, t, target, weights.float())

    def predict(self, model: torch.nn.Module, inputs: torch.Tensor, t: torch.Tensor, text: dict[str, torch.Tensor],
                geometry: list[Geometry], guidance: float) -> torch.Tensor:
        return unet_output(model, inputs, timestep_index(t, STEPS), text, geometry)

    def _denoised(self, x: torch.Tensor, sigma: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """ComfyUI's x0 estimate in sigma space (x = x0 + σ·noise) from the model's output."""
        if self.prediction == "epsilon":
            return x - sigma * out
        return x / (sigma ** 2 + 1) - out * sigma / (sigma ** 2 + 1).sqrt()

    @torch.no_grad()
    def sample(self, model: torch.nn.Module, text: dict[str, torch.Tensor], size: tuple[int, int],
               latent_hw: tuple[int, int], seed: int, steps: int, guidance: float,
               negative: dict[str, torch.Tensor] | None = None) -> torch.Tensor:
        """Euler steps in sigma space, as ComfyUI's euler sampler, on ``steps`` of the 1000 steps evenly spaced
        from the noisiest; classifier-free guidance with ``negative`` (the empty caption) when ``guidance`` > 1."""
        h, w = latent_hw
        table = discrete_sigmas(self.abar, self.zero_terminal_snr)
        index = torch.linspace(STEPS - 1, 0, steps).round().long()
        sigmas = torch.cat([table[index], torch.zeros(1)])
        x = torch.randn(1, self.latent_channels, h, w, generator=torch.Generator().manual_seed(seed)) * sigmas[0]
        geometry = [Geometry(size, (0, 0), size)]
        for i, (sigma, after) in enumerate(itertools.pairwise(sigmas)):
            scaled, step = x / (sigma ** 2 + 1).sqrt(), index[i:i + 1]
            x0 = self._denoised(x, sigma, unet_output(model, scaled, step, text, geometry).cpu())
            if negative is not None and guidance != 1.0:
                uncond = self._denoised(x, sigma, unet_output(model, scaled, step, negative, geometry).cpu())
                x0 = uncond + guidance * (x0 - uncond)
            x = x0 + (x - x0) / sigma * after  # Euler: x + (σ' - σ)·(x - x0)/σ
        return x / LATENT_SCALE

    # ---------------------------------------------------------------- export

    def export_key(self, component: str, module: str) -> str:
        """kohya names: ``lora_unet_<diffusers path>``, ``lora_te1_`` / ``lora_te2_<transformers path>`` (the
        classic path with ``text_model.``), dots as underscores."""
        if component == DENOISER:
            return "lora_unet_" + module.replace(".", "_")
        if component in TEXT_COMPONENTS:
            classic = module if module.startswith(("text_model.", "text_projection")) else "text_model." + module
            return TEXT_COMPONENTS[component] + classic.replace(".", "_")
        raise ValueError(f"{self.title} has no component {component!r}")

    def native_state_dict(self, denoiser_state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """LDM keys (``input_blocks.N...``), as ComfyUI's UNETLoader reads a UNet file; a v-prediction run's file
        carries ComfyUI's empty ``v_pred`` (and ``ztsnr``) markers, so the model samples as it was trained."""
        markers = {V_PRED_MARKER: self.prediction == "v_prediction", ZTSNR_MARKER: self.zero_terminal_snr}
        return {**unet_to_ldm(denoiser_state), **{key: torch.zeros(0) for key, on in markers.items() if on}}

    def metadata(self, cfg: RunConfig) -> dict[str, str]:
        return {"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0",
                "ss_v_parameterization": str(cfg.model.prediction == "v_prediction"),
                "ss_zero_terminal_snr": str(cfg.model.zero_terminal_snr),
                "ss_text_encoder_lr": str(cfg.optimizer.text_encoder_lr),
                "modelspec.prediction_type": "v" if cfg.model.prediction == "v_prediction" else "epsilon",
                "modelspec.implementation": "https://github.com/Stability-AI/generative-models"}

    # ---------------------------------------------------------------- the tiny-model kit

    def tiny(self, seed: int = 0, words: tuple[str, ...] = (), real_width: bool = False) -> TinyModel:
        from .sdxl_kit import REAL_WIDTH, TINY, build

        return build(REAL_WIDTH if real_width else TINY, seed, words)

    def full_size(self) -> FullSize:
        """SDXL 1.0's UNet (2.6B parameters); CLIP-L and CLIP-G contexts of ``text_length`` tokens."""
        from diffusers import UNet2DConditionModel

        from .sdxl_kit import FULL, unet_config

        with torch.device("meta"):
            unet = UNet2DConditionModel(**unet_config(FULL))
        windows = self.text_length // WINDOW
        return FullSize(unet.requires_grad_(False).eval(), 8, {
            "context": torch.randn(windows * WINDOW, FULL.clip_l.hidden + FULL.clip_g.hidden),
            "windows": torch.tensor(float(windows)), "pooled": torch.randn(FULL.clip_g.hidden)})

    def write_tiny(self, tiny: TinyModel, folder: Path, diffusers: bool = True) -> dict[str, Path]:
        from .sdxl_kit import write

        return write(tiny, folder, diffusers)

    # ---------------------------------------------------------------- ComfyUI's objects

    def comfy_text(self, clip: Any, caption: str, length: int, system_prompt: str = "") -> dict[str, torch.Tensor]:
        """ComfyUI's SDXL CLIP (CheckpointLoaderSimple, DualCLIPLoader type sdxl) on the caption read literally,
        its first ``length`` / 77 windows kept, as the engine's encoders do."""
        tokens = clip.tokenize(caption, disable_weights=True)
        if set(tokens) != {"l", "g"}:
            raise ConfigError(f"the CLIP input has text encoders {sorted(tokens)}, not SDXL's CLIP-L and CLIP-G: "
                              "load them with the checkpoint loader or DualCLIPLoader, type sdxl")
        windows = max(1, length // WINDOW)
        cond, pooled = clip.encode_from_tokens({k: v[:windows] for k, v in tokens.items()}, return_pooled=True)
        context = cond[0].float().cpu()
        return {"context": torch.nn.functional.pad(context, (0, 0, 0, WINDOW * windows - len(context))),
                "windows": torch.tensor(len(context) // WINDOW, dtype=torch.float32),
                "pooled": pooled[0].float().cpu()}

    def comfy_conditioning(self, text: dict[str, torch.Tensor], guidance: float) -> list:
        """``[[context (1, 77·n, D), {"pooled_output": (1, P)}]]``: the caption's own windows; ComfyUI sets the
        size conditioning from the latent, as for CLIPTextEncode."""
        n = int(text["windows"])
        return [[text["context"][None, :WINDOW * n], {"pooled_output": text["pooled"][None]}]]
