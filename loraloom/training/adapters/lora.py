"""LoRA through peft: the only module that talks to peft, and every call sets its state explicitly.

``W x + (alpha / r) · B A x`` on each target, A (r, in) drawn from the seed, B (out, r) zero at the start.
Dropout with probability p while training acts on ``A x`` (``adapter.dropout_on = "rank"``: B drop(A x)) or on
``x`` (``"input"``: B A drop(x), peft's own), each kept value scaled by 1 / (1 - p).
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model

from .base import Adapter, Target, check_alpha, check_rank, file_alpha, require_algorithm

ADAPTER_NAME = "default"


class Lora(Adapter):
    name = "lora"
    options = ("dropout_on",)

    def __init__(self, components: dict[str, torch.nn.Module], targets: list[Target], settings, seed: int):
        super().__init__(components, targets, settings, seed)
        self.root = torch.nn.ModuleDict(components)  # peft names modules from here: "<component>.<module>"
        exact = {t.name: rf"^{re.escape(t.name)}$" for t in targets}  # peft matches patterns on name ends
        on_input = settings.dropout_on == "input"
        config = LoraConfig(
            r=settings.rank, lora_alpha=settings.alpha, lora_dropout=settings.dropout if on_input else 0.0,
            target_modules=list(exact),
            rank_pattern={exact[t.name]: t.rank for t in targets if t.rank != settings.rank},
            alpha_pattern={exact[t.name]: t.alpha for t in targets if t.alpha != settings.alpha},
            init_lora_weights=True)
        with torch.random.fork_rng(devices=[]):  # peft's own draws, replaced below
            inject_adapter_in_model(config, self.root, adapter_name=ADAPTER_NAME)
        self.layers = {t.name: self.root.get_submodule(t.name) for t in targets}
        # peft creates the factors in the base's dtype (float8, bf16): train them in float32, and draw A there
        # from the seed (peft's Kaiming-uniform), so the start does not depend on the base's storage.
        generator = torch.Generator().manual_seed(seed)
        for name in sorted(self.layers):
            layer = self.layers[name]
            a, b = layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight
            bound = 1 / math.sqrt(a.shape[1])  # kaiming_uniform_(a=sqrt(5)) of an (r, in) matrix
            a.data = (torch.rand(a.shape, generator=generator) * 2 - 1).mul_(bound).to(a.device)
            b.data = torch.zeros(b.shape, device=b.device)
            if settings.dropout and not on_input:
                # peft applies B to A's output: dropping out B's input is dropping out the rank-r activation.
                layer.lora_B[ADAPTER_NAME].register_forward_pre_hook(_RankDropout(settings.dropout))

    def parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, layer in self.layers.items():
            groups.setdefault(name.split(".", 1)[0], []).extend(
                [layer.lora_A[ADAPTER_NAME].weight, layer.lora_B[ADAPTER_NAME].weight])
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        """``<target>.lora_A.weight`` (r, in) and ``<target>.lora_B.weight`` (out, r)."""
        state = get_peft_model_state_dict(self.root, adapter_name=ADAPTER_NAME)
        return {k: v.detach().clone() for k, v in state.items()}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        params = dict(self.root.named_parameters())
        for key, value in state.items():
            module, kind = key.rsplit(".lora_", 1)
            name = f"{module}.lora_{kind.replace('.weight', '')}.{ADAPTER_NAME}.weight"
            if name not in params or params[name].shape != value.shape:
                raise ValueError(f"adapter weight {key} does not fit this model (targets or rank changed?)")
            with torch.no_grad():
                params[name].copy_(value)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        previous = {name: layer.disable_adapters for name, layer in self.layers.items()}
        for layer in self.layers.values():
            layer.enable_adapters(False)
        try:
            yield
        finally:
            for name, layer in self.layers.items():
                layer.enable_adapters(not previous[name])

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        """LyCORIS/kohya suffixes: ``lora_down.weight`` (A), ``lora_up.weight`` (B) and ``alpha`` (without it
        ComfyUI scales by 1, not alpha / rank)."""
        return {name: {"lora_down.weight": layer.lora_A[ADAPTER_NAME].weight.detach().clone(),
                       "lora_up.weight": layer.lora_B[ADAPTER_NAME].weight.detach().clone(),
                       "alpha": torch.tensor(float(self.targets[name].alpha))}
                for name, layer in self.layers.items()}

    def load_export(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        state = {}
        for name, tensors in groups.items():
            target = self.targets.get(name)
            if target is None:
                raise ValueError(f"{name}: the file adapts a layer this run does not (check adapter.targets)")
            require_algorithm(name, tensors, ("lora",), self.name)
            down, up = tensors["lora_down.weight"], tensors["lora_up.weight"]
            if down.dim() != 2:
                raise ValueError(f"{name}: the file adapts a convolution here, which this algorithm does not: set "
                                 "adapter.algorithm = 'locon'")
            check_rank(name, target, down.shape[0])
            check_alpha(name, target, file_alpha(tensors, down.shape[0]))
            state[f"{name}.lora_A.weight"], state[f"{name}.lora_B.weight"] = down.float(), up.float()
        self.load_state(state)

    def trained_weights(self) -> dict[str, torch.Tensor]:
        """``<target>.weight``: the base weight plus peft's delta ``(alpha / r) · B A``, float32."""
        weights = {}
        for name, layer in self.layers.items():
            base = layer.get_base_layer().weight
            if not base.is_floating_point():
                raise ValueError(f"{name}: the base weight is stored in {base.dtype} (4-bit); load the base in "
                                 "bf16/fp32 to fold the LoRA into it")
            weights[f"{name}.weight"] = base.detach().float() + layer.get_delta_weight(ADAPTER_NAME).float()
        return weights


class _RankDropout:
    """A forward pre-hook of ``lora_B``: dropout on its input, A x (…, r), while the module is training."""

    def __init__(self, p: float):
        self.p = p

    def __call__(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
        return (F.dropout(args[0], self.p, module.training), *args[1:])
