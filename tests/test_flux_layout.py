"""Round trips: diffusers -> BFL/LDM single-file layout (ours) -> diffusers (diffusers' own loaders)."""

from __future__ import annotations

import pytest
import torch
from diffusers import AutoencoderKL, FluxTransformer2DModel
from diffusers.loaders import single_file_utils
from diffusers.loaders.single_file_utils import (
    convert_flux_transformer_checkpoint_to_diffusers,
    convert_ldm_vae_checkpoint,
)

from loraloom.training.families.flux_layout import transformer_to_bfl, vae_to_ldm

HEADS, HEAD_DIM = 2, 32
HIDDEN = HEADS * HEAD_DIM
MLP = 4 * HIDDEN


def _randomize(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """Distinct random values everywhere (zero-init or ones-init params would hide swapped keys)."""
    gen = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=gen) for k, v in model.state_dict().items()}


def _tiny_flux(guidance: bool) -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    model = FluxTransformer2DModel(
        num_layers=2, num_single_layers=2, attention_head_dim=HEAD_DIM, num_attention_heads=HEADS,
        joint_attention_dim=48, pooled_projection_dim=24, in_channels=64, guidance_embeds=guidance,
        axes_dims_rope=(4, 14, 14),
    )
    return _randomize(model, seed=1)


def _tiny_vae() -> tuple[dict[str, torch.Tensor], dict]:
    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, latent_channels=16, block_out_channels=(16, 32, 32),
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        layers_per_block=1, norm_num_groups=8, use_quant_conv=False, use_post_quant_conv=False,
    )
    return _randomize(vae, seed=2), dict(vae.config)


class _WidthAgnosticTorch:
    """Stand-in for the ``torch`` module inside diffusers' single_file_utils.

    convert_flux_transformer_checkpoint_to_diffusers splits ``single_blocks.N.linear1`` with a hard-coded
    (3072, 3072, 3072, 12288); for a tiny model the same 3:3:3:12 proportions are rescaled to the tensor's
    real length. Everything else is the real torch, so the rest of the converter runs unchanged.
    """

    def __getattr__(self, name: str):
        return getattr(torch, name)

    @staticmethod
    def split(tensor: torch.Tensor, split_size, dim: int = 0):
        n = tensor.shape[dim]
        if isinstance(split_size, (list, tuple)) and sum(split_size) != n:
            total = sum(split_size)
            assert all(s * n % total == 0 for s in split_size), (split_size, n)
            split_size = [s * n // total for s in split_size]
        return torch.split(tensor, split_size, dim=dim)


@pytest.fixture
def width_agnostic_loader(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(single_file_utils, "torch", _WidthAgnosticTorch())


def _assert_same(back: dict[str, torch.Tensor], original: dict[str, torch.Tensor]) -> None:
    assert set(back) - set(original) == set(), "extra keys"
    assert set(original) - set(back) == set(), "missing keys"
    for k, v in original.items():
        assert back[k].shape == v.shape, k
        assert torch.equal(back[k], v), k


def test_diffusers_flux_loader_hardcodes_width() -> None:
    """Why the fixture exists: the stock loader cannot read a non-3072 BFL file."""
    bfl = transformer_to_bfl(_tiny_flux(guidance=False))
    with pytest.raises(RuntimeError):
        convert_flux_transformer_checkpoint_to_diffusers(dict(bfl))


def test_transformer_round_trip_stock_loader_at_real_linear1_width() -> None:
    """No stand-in: single-block q/k/v/mlp get Flux.1's real lengths (3072, 12288) along dim 0 only.

    The stock loader checks no other dimension, so thin (n, 1) weights keep this cheap.
    """
    sd = _tiny_flux(guidance=True)
    gen = torch.Generator().manual_seed(3)
    real = {"attn.to_q": 3072, "attn.to_k": 3072, "attn.to_v": 3072, "proj_mlp": 12288}
    for i in range(2):
        for name, n in real.items():
            sd[f"single_transformer_blocks.{i}.{name}.weight"] = torch.randn(n, 1, generator=gen)
            sd[f"single_transformer_blocks.{i}.{name}.bias"] = torch.randn(n, generator=gen)
    bfl = transformer_to_bfl(sd)
    assert bfl["single_blocks.0.linear1.weight"].shape == (3 * 3072 + 12288, 1)
    leftover = dict(bfl)
    back = convert_flux_transformer_checkpoint_to_diffusers(leftover)
    assert leftover == {}
    _assert_same(back, sd)


@pytest.mark.parametrize("guidance", [True, False])
@pytest.mark.parametrize("prefix", ["", "model.diffusion_model."])
def test_transformer_round_trip(guidance: bool, prefix: str, width_agnostic_loader: None) -> None:
    sd = _tiny_flux(guidance)
    before = dict(sd)
    bfl = transformer_to_bfl(sd, prefix=prefix)
    assert sd.keys() == before.keys() and all(sd[k] is before[k] for k in sd), "input mutated"
    assert all(k.startswith(prefix) for k in bfl)

    leftover = dict(bfl)  # the converter pops what it uses; anything left would be a key we invented
    back = convert_flux_transformer_checkpoint_to_diffusers(leftover)
    assert leftover == {}, sorted(leftover)[:5]
    _assert_same(back, sd)
    assert any("guidance_in" in k for k in bfl) == guidance


def test_transformer_bfl_keys_and_shapes() -> None:
    bfl = transformer_to_bfl(_tiny_flux(guidance=True))
    assert bfl["double_blocks.0.img_attn.qkv.weight"].shape == (3 * HIDDEN, HIDDEN)
    assert bfl["double_blocks.1.txt_attn.qkv.bias"].shape == (3 * HIDDEN,)
    assert bfl["single_blocks.1.linear1.weight"].shape == (3 * HIDDEN + MLP, HIDDEN)
    assert bfl["single_blocks.0.linear2.weight"].shape == (HIDDEN, HIDDEN + MLP)
    assert bfl["double_blocks.0.img_attn.norm.query_norm.scale"].shape == (HEAD_DIM,)
    assert bfl["final_layer.adaLN_modulation.1.weight"].shape == (2 * HIDDEN, HIDDEN)
    for key in ("img_in.weight", "txt_in.bias", "time_in.in_layer.weight", "vector_in.out_layer.bias",
                "guidance_in.in_layer.weight", "final_layer.linear.weight",
                "double_blocks.1.txt_mod.lin.weight", "single_blocks.0.modulation.lin.bias"):
        assert key in bfl, key
    assert not any(k.startswith(("transformer_blocks.", "single_transformer_blocks.")) for k in bfl)


def test_transformer_final_layer_halves_swapped() -> None:
    sd = _tiny_flux(guidance=False)
    w = transformer_to_bfl(sd)["final_layer.adaLN_modulation.1.weight"]
    scale, shift = sd["norm_out.linear.weight"].chunk(2)
    assert torch.equal(w, torch.cat([shift, scale]))


def test_transformer_rejects_unknown_key() -> None:
    sd = _tiny_flux(guidance=False) | {"transformer_blocks.0.surprise.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="surprise"):
        transformer_to_bfl(sd)


@pytest.mark.parametrize("prefix", ["", "first_stage_model.", "vae."])
def test_vae_round_trip(prefix: str) -> None:
    sd, config = _tiny_vae()
    ldm = vae_to_ldm(sd, prefix=prefix)
    # One-to-one renames: equal counts plus a full round trip rule out invented or merged keys.
    assert len(ldm) == len(sd)
    back = convert_ldm_vae_checkpoint(ldm, config)
    _assert_same(back, sd)


def test_vae_ldm_keys_and_shapes() -> None:
    sd, _ = _tiny_vae()
    ldm = vae_to_ldm(sd)
    assert ldm["encoder.mid.attn_1.q.weight"].shape == (32, 32, 1, 1)
    assert ldm["decoder.mid.attn_1.proj_out.weight"].shape == (32, 32, 1, 1)
    assert ldm["encoder.mid.attn_1.norm.bias"].shape == (32,)
    assert torch.equal(ldm["encoder.down.0.block.0.conv1.weight"],
                       sd["encoder.down_blocks.0.resnets.0.conv1.weight"])
    # Decoder blocks are numbered in reverse: diffusers up_blocks.0 is LDM up.2.
    assert torch.equal(ldm["decoder.up.2.upsample.conv.weight"], sd["decoder.up_blocks.0.upsamplers.0.conv.weight"])
    assert torch.equal(ldm["decoder.up.0.block.0.nin_shortcut.weight"],
                       sd["decoder.up_blocks.2.resnets.0.conv_shortcut.weight"])
    for key in ("encoder.norm_out.weight", "decoder.norm_out.bias", "decoder.conv_in.weight",
                "encoder.down.1.downsample.conv.bias", "encoder.mid.block_2.conv2.weight",
                "encoder.down.1.block.0.nin_shortcut.weight"):
        assert key in ldm, key
    assert not any("quant_conv" in k for k in ldm)


def test_vae_rejects_unknown_key() -> None:
    sd, _ = _tiny_vae()
    with pytest.raises(ValueError, match="surprise"):
        vae_to_ldm(sd | {"encoder.mid_block.surprise.weight": torch.zeros(1)})
