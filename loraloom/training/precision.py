"""How the frozen base is stored: float8 and 4-bit weights, and the one rule for computing with them.

The rule: a ``Linear`` whose weight is stored in float8 becomes a :class:`Float8Linear`, which casts the weight
to the dtype of the computation at use and keeps only the float8 tensor for backward; every other float8
tensor (norm scales, biases, convolution kernels) is upcast when the file is loaded. Nothing depends on module
names, so every family and every ``adapter.targets`` value gets the same treatment.
"""

from __future__ import annotations

import re
from pathlib import Path

import torch
import torch.nn.functional as F

from ..loaders.files import ModelFileError
from .errors import optional_module

FLOAT8 = (torch.float8_e4m3fn, torch.float8_e5m2)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}  # config names of dtypes


def is_float8(tensor: torch.Tensor) -> bool:
    return tensor.dtype in FLOAT8


def assign_weights(model: torch.nn.Module, sd: dict[str, torch.Tensor], dtype: torch.dtype, keep_float8: bool,
                   path: Path | str) -> None:
    """Load ``sd`` into a meta-initialised ``model`` (strict, shapes checked, errors naming ``path``).

    Linear weights stored in float8 stay float8 when ``keep_float8`` (no upcast copy of a 12B model in host
    memory); every other tensor is stored in ``dtype``. Call :func:`store_float8` afterwards.
    """
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    expected = {k: v.shape for k, v in model.state_dict().items()}
    missing, unexpected = expected.keys() - sd.keys(), sd.keys() - expected.keys()
    if missing or unexpected:
        raise ModelFileError(
            f"{path}: weights do not match the model built from its shapes (missing {sorted(missing)[:3]}, "
            f"unexpected {sorted(unexpected)[:3]}); the file may be truncated or of another model")
    wrong = [f"{k} {tuple(v.shape)}, expected {tuple(expected[k])}" for k, v in sd.items() if v.shape != expected[k]]
    if wrong:
        raise ModelFileError(f"{path}: tensors of the wrong width ({'; '.join(wrong[:2])}); the file mixes models "
                             "of different sizes or is corrupt: download it again")
    kept = {k: v if keep_float8 and is_float8(v) and k in linear_weights else v.to(dtype) for k, v in sd.items()}
    model.load_state_dict(kept, assign=True, strict=True)


class _Float8Linear(torch.autograd.Function):
    """``x @ weight.T + bias`` with the weight cast to ``dtype`` for the product and saved as float8."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, dtype: torch.dtype
                ) -> torch.Tensor:
        ctx.save_for_backward(weight)
        ctx.dtype, ctx.input_dtype = dtype, x.dtype
        return F.linear(x.to(dtype), weight.to(dtype), None if bias is None else bias.to(dtype))

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (weight,) = ctx.saved_tensors
        return (grad.to(ctx.dtype) @ weight.to(ctx.dtype)).to(ctx.input_dtype), None, None, None


class Float8Linear(torch.nn.Linear):
    """A frozen Linear whose weight is stored in float8 and computed with in the autocast dtype (else the
    input's). Its weight gets no gradient: a full fine-tune refuses float8 bases."""

    @classmethod
    def from_linear(cls, linear: torch.nn.Linear) -> Float8Linear:
        layer = cls(linear.in_features, linear.out_features, bias=linear.bias is not None, device="meta")
        layer.weight = linear.weight
        layer.bias = linear.bias
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind = x.device.type
        dtype = torch.get_autocast_dtype(kind) if torch.is_autocast_enabled(kind) else x.dtype
        return _Float8Linear.apply(x, self.weight, self.bias, dtype)


def store_float8(model: torch.nn.Module, convert: bool = False) -> int:
    """Make every Linear of ``model`` with a float8 weight a :class:`Float8Linear`; with ``convert``, first store
    every Linear weight in float8_e4m3fn. Call before an adapter wraps the layers. Returns how many there are."""
    count = 0
    for name, module in list(model.named_modules()):
        if type(module) is not torch.nn.Linear:
            continue
        if convert and not is_float8(module.weight):
            module.weight = torch.nn.Parameter(module.weight.data.to(torch.float8_e4m3fn), requires_grad=False)
        if is_float8(module.weight):
            model.set_submodule(name, Float8Linear.from_linear(module))
            count += 1
    return count


def quantize_nf4(model: torch.nn.Module, target_regex: str, compute_dtype: torch.dtype, device: torch.device
                 ) -> None:
    """Store the linear layers whose names fully match ``target_regex`` in 4-bit NormalFloat (QLoRA).

    Each layer is quantised on ``device`` as it is replaced, so the full-precision base never sits there
    whole. Call before the adapter is attached, so it wraps the 4-bit layers.
    """
    bnb = optional_module("bitsandbytes", "model.base_precision = 'nf4'", "model.base_precision = 'fp8'")
    pattern = re.compile(target_regex)
    for name, linear in list(model.named_modules()):
        if not (isinstance(linear, torch.nn.Linear) and pattern.fullmatch(name)):
            continue
        layer = bnb.nn.Linear4bit(linear.in_features, linear.out_features, bias=linear.bias is not None,
                                  compute_dtype=compute_dtype, quant_type="nf4", device="meta")
        # bitsandbytes 0.50 repacks the weight for AVX512-BF16 CPUs at the first no-grad eval forward (a
        # validation), and its training forward then fails on the repacked weight: keep one layout.
        layer.support_avx512bf16_for_cpu = False
        layer.weight = bnb.nn.Params4bit(linear.weight.data, requires_grad=False, quant_type="nf4")
        if linear.bias is not None:
            layer.bias = torch.nn.Parameter(linear.bias.data.to(compute_dtype), requires_grad=False)
        model.set_submodule(name, layer.to(device))  # .to quantises
    model.is_loaded_in_4bit = True  # what peft reads to pick its 4-bit LoRA layer
