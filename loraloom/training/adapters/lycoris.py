"""LoCon, LoHa, LoKr and DoRA through lycoris-lora 4.1: the only module that talks to lycoris-lora, and every
call passes every option explicitly.

One lycoris module per target, built from its class (``LoConModule``, ``LohaModule``, ``LokrModule``). Never
``LycorisNetwork`` / ``create_lycoris``: they keep presets in class attributes that carry over from one call to
the next, match names by prefix and wrap every Linear by default. Each module is registered under the layer it
wraps (``<layer>.lycoris``), so the model's ``to()``, ``train()`` and ``eval()`` reach it, and hooks the layer's
forward (``apply_to``); ``restore`` unhooks it, which is how previews show the base (a multiplier of 0 is not
"off" for DoRA: it leaves W + ΔW).

Modes:

- **bypass**, y = base(x) + Δ(x), for LoCon, LoHa and LoKr: the base layer runs as it is stored (float8, 4-bit),
  LoCon and LoKr on Linear never build ΔW, and lycoris applies ``dropout`` (to Δ(x)) only in this mode.
- **rebuild**, y = base(x) + x·(W' − W)ᵀ with W' = m ⊙ (W + ΔW) / ‖W + ΔW‖ per input column, for DoRA: lycoris
  ignores the weight decomposition in bypass mode. W is read in float32 whatever its storage.

Exports are the factors as lycoris holds them, which stock ComfyUI applies exactly (checked in
``tests/host/test_comfyui_loads_export.py``): LoCon and LoHa scale by alpha / rank; LoKr by alpha / rank when a
factor is stored decomposed and by 1 otherwise (lycoris then stores alpha = rank), the same rule in both tools;
DoRA's ``dora_scale`` (1, in) is normalised by the merged weight per input column in both. The exception is
LoKr's Tucker factor ``lokr_t2``, which ComfyUI 0.3.64 cannot apply (``torch.kron`` of a non-contiguous tensor;
the layer is left unpatched): it is written in the plain layout of the same rank. Exports and merges never go
through lycoris' merged weights: LoHa's and LoKr's ``get_diff_weight`` apply the scale twice.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import ClassVar

import torch
from lycoris.functional.general import factorization
from lycoris.modules.base import LycorisBaseModule
from lycoris.modules.locon import LoConModule
from lycoris.modules.loha import LohaModule
from lycoris.modules.lokr import LokrModule

from ..errors import ConfigError
from .base import LAYERS, Adapter, Target, check_alpha, check_rank, file_alpha, require_algorithm

CHILD = "lycoris"  # the name each lycoris module is registered under, inside the layer it wraps
TUCKER_TOLERANCE = 1e-5  # relative error allowed when a plain LoKr factor is put back into Tucker form


def base_weight(layer: torch.nn.Module) -> torch.Tensor:
    """``layer``'s weight (out, in[, k...]) in float32, whatever its storage: float8, bitsandbytes 4-bit, bf16."""
    weight = layer.weight
    quant_state = getattr(weight, "quant_state", None)
    if quant_state is not None:
        from bitsandbytes.functional import dequantize_4bit

        return dequantize_4bit(weight.data, quant_state).float()
    return weight.detach().float()


class _Float32Base:
    """lycoris reads the base weight raw in ``_current_weight`` (DoRA's norm and rebuild, LoKr's DoRA init), which
    fails for float8 on the CPU and is packed bytes for 4-bit; this reads it dequantised to float32. It overrides
    a private lycoris method: the dependency is pinned to lycoris-lora 4.1 and tests/test_adapters.py checks
    DoRA on float8 and nf4 bases against a float32 copy."""

    def _current_weight(self) -> torch.Tensor:
        return base_weight(self.org_module[0])


class _LoCon(_Float32Base, LoConModule):
    pass


class _LoHa(_Float32Base, LohaModule):
    pass


class _LoKr(_Float32Base, LokrModule):
    pass


class LycorisAdapter(Adapter):
    """One lycoris module of ``module_class`` per target; what differs between the algorithms is class data."""

    layers = LAYERS
    options = ("tucker",)
    module_class: ClassVar[type[LycorisBaseModule]]
    accepts: ClassVar[tuple[str, ...]]  # the file formats (base.file_algorithm) it continues from
    decompose_weight: ClassVar[bool] = False  # DoRA: rebuild mode, a trainable dora_scale
    kohya_algo: ClassVar[str]  # LyCORIS' own name, for the exported file's ss_network_args

    def __init__(self, components: dict[str, torch.nn.Module], targets: list[Target], settings, seed: int):
        super().__init__(components, targets, settings, seed)
        self.modules: dict[str, LycorisBaseModule] = {}
        self.enabled = True
        # lycoris draws its initial factors from the global CPU RNG: a fork seeded here keeps the start the same
        # for a seed and leaves the caller's RNG untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for target in targets:
                self.modules[target.name] = self._wrap(target)

    def _wrap(self, target: Target) -> LycorisBaseModule:
        layer = target.module
        module = self.module_class(target.name, layer, **self._arguments(target))
        if self.decompose_weight:
            # lycoris' own init reads the stored weight (packed bytes for 4-bit): m starts at ‖W‖ per input column.
            module.dora_scale = torch.nn.Parameter(input_axis_norm(base_weight(layer)))
        module.to(layer.weight.device)
        layer.add_module(CHILD, module)
        module.apply_to()
        return module

    def _arguments(self, target: Target) -> dict:
        """Every constructor option of the lycoris classes, stated (their defaults differ between versions)."""
        return dict(multiplier=1.0, lora_dim=target.rank, alpha=target.alpha, dropout=self.settings.dropout,
                    rank_dropout=0.0, module_dropout=0.0, use_tucker=self.settings.tucker, use_scalar=False,
                    rank_dropout_scale=False, weight_decompose=self.decompose_weight, wd_on_out=False,
                    bypass_mode=not self.decompose_weight, rs_lora=False)

    # ------------------------------------------------------------ training state

    def parameters(self) -> dict[str, list[torch.nn.Parameter]]:
        groups: dict[str, list[torch.nn.Parameter]] = {}
        for name, module in self.modules.items():
            groups.setdefault(self.targets[name].component, []).extend(module.parameters())
        return groups

    def state(self) -> dict[str, torch.Tensor]:
        """``<target>.<lycoris key>`` (``lokr_w1``, ``hada_w1_a``, ``lora_up.weight``, ``dora_scale``, ...), in
        lycoris' own layout; ``alpha`` is a setting, not state."""
        return {f"{name}.{key}": value.detach().clone() for name, module in self.modules.items()
                for key, value in module.state_dict().items() if key != "alpha"}

    def load_state(self, state: dict[str, torch.Tensor]) -> None:
        own = {name: module.state_dict() for name, module in self.modules.items()}
        split: dict[str, dict[str, torch.Tensor]] = {name: {} for name in self.modules}
        for key, value in state.items():
            name = next((n for n in self.modules if key.startswith(f"{n}.")), None)
            if name is None:
                raise ValueError(f"adapter weight {key} belongs to no layer of this run (targets changed?)")
            split[name][key[len(name) + 1:]] = value
        for name, given in split.items():
            expected = {k: v.shape for k, v in own[name].items() if k != "alpha"}
            if {k: v.shape for k, v in given.items()} != expected:
                raise ValueError(f"adapter weights of {name} do not fit this model (targets, rank or algorithm "
                                 "changed?)")
        for name, module in self.modules.items():
            with torch.no_grad():
                module.load_state_dict({**split[name], "alpha": own[name]["alpha"]}, strict=True)

    @contextmanager
    def disabled(self) -> Iterator[None]:
        if not self.enabled:  # nested: already off
            yield
            return
        for module in self.modules.values():
            module.restore()
        self.enabled = False
        try:
            yield
        finally:
            for module in self.modules.values():
                module.apply_to()
            self.enabled = True

    @torch.no_grad()
    def trained_weights(self) -> dict[str, torch.Tensor]:
        """``<target>.weight``: the base weight (dequantised, float32) plus ΔW from the factors, and for DoRA that
        sum renormalised per input column by the trained magnitude."""
        weights = {}
        for name, module in self.modules.items():
            merged = base_weight(self.targets[name].module) + self.delta(module).float()
            if self.decompose_weight:
                merged = module.apply_weight_decompose(merged, 1.0)
            weights[f"{name}.weight"] = merged
        return weights

    def delta(self, module: LycorisBaseModule) -> torch.Tensor:
        """ΔW (out, in[, k...]) of one module, scale included, as its forward applies it."""
        return module.get_weight(module.shape)  # LoHa's and LoKr's: already scaled

    # ------------------------------------------------------------ files

    def export(self) -> dict[str, dict[str, torch.Tensor]]:
        return {name: self.file_tensors(module) for name, module in self.modules.items()}

    def file_tensors(self, module: LycorisBaseModule) -> dict[str, torch.Tensor]:
        """One module's exported tensors: lycoris' own (``alpha`` included), float32."""
        return {key: value.detach().float().clone().contiguous() for key, value in module.state_dict().items()}

    def metadata(self) -> dict[str, str]:
        args = {"algo": self.kohya_algo, "use_tucker": self.settings.tucker, "dora_wd": self.decompose_weight,
                "wd_on_output": False, "dropout": self.settings.dropout}
        return {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps(args)}

    def load_export(self, groups: dict[str, dict[str, torch.Tensor]]) -> None:
        states = {}
        for name, tensors in groups.items():
            target = self.targets.get(name)
            if target is None:
                raise ValueError(f"{name}: the file adapts a layer this run does not (check adapter.targets)")
            require_algorithm(name, tensors, self.accepts, self.name)
            module = self.modules[name]
            state = self.module_layout(name, module, tensors)
            expected = {k: tuple(v.shape) for k, v in module.state_dict().items() if k != "alpha"}
            if {k: tuple(v.shape) for k, v in state.items() if k != "alpha"} != expected:
                self.explain_misfit(name, target, module, tensors)
                raise ValueError(f"{name}: the file's tensors {_shapes(tensors)} do not fit this run's "
                                 f"{expected}: it was trained on another model or with other settings")
            self.check_scale(name, target, module, tensors)
            states[name] = {**{k: v.float() for k, v in state.items() if k != "alpha"},
                            "alpha": module.state_dict()["alpha"]}
        for name, state in states.items():  # all checked before any is loaded
            with torch.no_grad():
                self.modules[name].load_state_dict(state, strict=True)

    def module_layout(self, name: str, module: LycorisBaseModule, tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        """A file's tensors for one layer in the module's own layout (the inverse of :meth:`file_tensors`)."""
        unexpected = sorted(set(tensors) - set(module.state_dict()))
        if "dora_scale" in unexpected:
            raise ValueError(f"{name}: the file decomposes the weight (dora_scale) of a {self.name} adapter, which "
                             "is not trained here; only adapter.algorithm = 'dora' (LoRA factors) does that")
        return dict(tensors)

    def check_scale(self, name: str, target: Target, module: LycorisBaseModule,
                    tensors: dict[str, torch.Tensor]) -> None:
        """ValueError unless the file's alpha is the run's (the shapes, and so the ranks, already fit)."""
        check_alpha(name, target, file_alpha(tensors, module.lora_dim))

    def explain_misfit(self, name: str, target: Target, module: LycorisBaseModule,
                       tensors: dict[str, torch.Tensor]) -> None:
        """Raise ValueError naming the setting to change when the file's shapes say which one differs (a generic
        error follows when they do not)."""


class Locon(LycorisAdapter):
    """LoRA on Linear and convolution layers (LoCon): ΔW = (alpha / r) · up @ down, the kernel in ``down``.

    ``tucker`` on a convolution with a kernel over 1x1: down (r, in, 1, 1), a core ``lora_mid`` (r, r, k, k) and
    up (out, r, 1, 1)."""

    name = "locon"
    module_class = _LoCon
    accepts = ("lora",)
    kohya_algo = "locon"

    def delta(self, module: LycorisBaseModule) -> torch.Tensor:
        return module.make_weight().view(module.shape) * module.scale

    def explain_misfit(self, name: str, target: Target, module: LycorisBaseModule,
                       tensors: dict[str, torch.Tensor]) -> None:
        if ("lora_mid.weight" in tensors) != module.tucker:
            raise ValueError(f"{name}: the file {'has' if 'lora_mid.weight' in tensors else 'has no'} Tucker core "
                             f"(lora_mid): set adapter.tucker = {str('lora_mid.weight' in tensors).lower()}")
        if "lora_down.weight" in tensors:
            check_rank(name, target, tensors["lora_down.weight"].shape[0])


class Dora(Locon):
    """LoRA with weight decomposition (DoRA) on the input axis: W' = m ⊙ (W + ΔW) / ‖W + ΔW‖, the norm per input
    column, m (``dora_scale``, (1, in[, 1...])) trained and initialised to ‖W‖. This is the form ComfyUI computes
    from the merged weight on any base; the output-axis form (peft, lycoris' default) it computes against the
    base's norm instead, which is exact only on the base it was trained on."""

    name = "dora"
    accepts = ("dora",)
    decompose_weight = True

    @classmethod
    def check(cls, settings) -> None:
        super().check(settings)
        if settings.dropout:
            raise ConfigError("adapter.dropout must be 0 for adapter.algorithm = 'dora': DoRA rebuilds the weight "
                              "(lycoris applies dropout only to an adapter that runs beside the base layer)")

    def _wrap(self, target: Target) -> LycorisBaseModule:
        if target.module.weight.shape[0] == 1:
            raise ConfigError(f"{target.name} has one output: ComfyUI would read its DoRA scale (1, in) as one per "
                              "output row; leave the layer out with an [[adapter.blocks]] entry of rank 0")
        return super()._wrap(target)

    def module_layout(self, name: str, module: LycorisBaseModule, tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        scale = tensors["dora_scale"]
        if scale.shape[0] != 1:
            raise ValueError(f"{name}: the file's DoRA scale {tuple(scale.shape)} is one per output row (peft, or "
                             "LyCORIS' default wd_on_out), which ComfyUI applies against the base's norm; only the "
                             "input-axis form (dora_scale (1, in)) continues here")
        return dict(tensors)


class Loha(LycorisAdapter):
    """LoHa: ΔW = (alpha / r) · (w1a @ w1b) ⊙ (w2a @ w2b), rank r each; the product has rank up to r²."""

    name = "loha"
    module_class = _LoHa
    accepts = ("loha",)
    kohya_algo = "loha"

    def explain_misfit(self, name: str, target: Target, module: LycorisBaseModule,
                       tensors: dict[str, torch.Tensor]) -> None:
        if ("hada_t1" in tensors) != module.tucker:
            raise ValueError(f"{name}: the file {'has' if 'hada_t1' in tensors else 'has no'} Tucker cores "
                             f"(hada_t1/t2): set adapter.tucker = {str('hada_t1' in tensors).lower()}")
        if "hada_w1_b" in tensors:
            check_rank(name, target, tensors["hada_w1_b"].shape[0])


class Lokr(LycorisAdapter):
    """LoKr: ΔW = scale · w1 ⊗ w2, W's (out, in) split as (a·b, c·d) with w1 (a, c) and w2 (b, d) (the split of
    each side by ``factor``, lycoris' ``factorization``). w2 is a rank-r product (scale alpha / r) when r is under
    half its size, else full; with ``full_matrix`` both are full and the scale is 1; with ``decompose_both`` w1 is
    a rank-r product too. Bypass mode never builds w1 ⊗ w2 for a Linear."""

    name = "lokr"
    module_class = _LoKr
    accepts = ("lokr",)
    kohya_algo = "lokr"
    options = ("tucker", "factor", "full_matrix", "decompose_both")

    @classmethod
    def check(cls, settings) -> None:
        super().check(settings)
        if settings.full_matrix and settings.decompose_both:
            raise ConfigError("adapter.decompose_both has no effect with adapter.full_matrix = true (both factors "
                              "are then full matrices): turn one of them off")

    def _arguments(self, target: Target) -> dict:
        return {**super()._arguments(target), "factor": target.factor, "decompose_both": self.settings.decompose_both,
                "full_matrix": self.settings.full_matrix, "unbalanced_factorization": False}

    def metadata(self) -> dict[str, str]:
        meta = super().metadata()
        args = {**json.loads(meta["ss_network_args"]), "factor": self.settings.factor,
                "full_matrix": self.settings.full_matrix, "decompose_both": self.settings.decompose_both}
        return {**meta, "ss_network_args": json.dumps(args)}

    def file_tensors(self, module: LycorisBaseModule) -> dict[str, torch.Tensor]:
        tensors = super().file_tensors(module)
        if "lokr_t2" in tensors:
            tensors.update(untucker(tensors.pop("lokr_t2"), tensors.pop("lokr_w2_a"), tensors.pop("lokr_w2_b")))
        return tensors

    def module_layout(self, name: str, module: LycorisBaseModule, tensors: dict[str, torch.Tensor]
                      ) -> dict[str, torch.Tensor]:
        tensors = super().module_layout(name, module, tensors)
        if "lokr_t2" in tensors and not module.tucker:  # a Tucker file into a plain run: exact, same rank
            tensors.update(untucker(tensors.pop("lokr_t2"), tensors.pop("lokr_w2_a"), tensors.pop("lokr_w2_b")))
        elif module.tucker and "lokr_t2" not in tensors and {"lokr_w2_a", "lokr_w2_b"} <= tensors.keys():
            w2_a, w2_b = tensors.pop("lokr_w2_a"), tensors.pop("lokr_w2_b")
            check_rank(name, self.targets[name], w2_a.shape[1])
            try:
                tensors.update(retucker(w2_a, w2_b, tuple(module.lokr_t2.shape[2:])))
            except ValueError as e:
                raise ValueError(f"{name}: {e}; set adapter.tucker = false to continue from this file") from None
        return tensors

    def check_scale(self, name: str, target: Target, module: LycorisBaseModule,
                    tensors: dict[str, torch.Tensor]) -> None:
        if module.use_w1 and module.use_w2:  # both full: no rank, scale 1 whatever alpha says (in ComfyUI too)
            return
        super().check_scale(name, target, module, tensors)

    def explain_misfit(self, name: str, target: Target, module: LycorisBaseModule,
                       tensors: dict[str, torch.Tensor]) -> None:
        theirs, ours = _lokr_layout(tensors), _lokr_layout(module.state_dict())
        if theirs["w1"] != ours["w1"]:
            factor = lokr_factor(module.shape, theirs["w1"])
            raise ValueError(f"{name}: the file splits the weight with w1 {theirs['w1']} (factor {factor}), this "
                             f"run with w1 {ours['w1']} (factor {target.factor}): set adapter.factor = {factor} (or "
                             "the factor of the [[adapter.blocks]] entry that matches it)")
        if theirs["w1_decomposed"] != ours["w1_decomposed"]:
            raise ValueError(f"{name}: the file stores w1 as {_kind(theirs['w1_decomposed'])}, this run as "
                             f"{_kind(ours['w1_decomposed'])}: set adapter.decompose_both = "
                             f"{str(theirs['w1_decomposed']).lower()}")
        if theirs["w2_decomposed"] != ours["w2_decomposed"]:
            if not theirs["w2_decomposed"]:
                raise ValueError(f"{name}: the file stores w2 as a full matrix, this run as a rank-{target.rank} "
                                 "product: set adapter.full_matrix = true")
            if self.settings.full_matrix:
                raise ValueError(f"{name}: the file stores w2 as a rank-{theirs['rank']} product: set "
                                 f"adapter.full_matrix = false and adapter.rank = {theirs['rank']}")
        if theirs["rank"] is not None:
            check_rank(name, target, theirs["rank"])


def _kind(decomposed: bool) -> str:
    return "a rank-r product" if decomposed else "a full matrix"


def _lokr_layout(tensors: dict[str, torch.Tensor]) -> dict:
    """w1's shape, whether w1 / w2 are rank products, and that rank, from a LoKr module's or file's tensors."""
    w1 = (tuple(tensors["lokr_w1"].shape[:2]) if "lokr_w1" in tensors
          else (tensors["lokr_w1_a"].shape[0], tensors["lokr_w1_b"].shape[1]))
    rank = next((tensors[k].shape[0] for k in ("lokr_w2_b", "lokr_w1_b") if k in tensors), None)
    return {"w1": w1, "w1_decomposed": "lokr_w1" not in tensors, "w2_decomposed": "lokr_w2" not in tensors,
            "rank": rank}


def lokr_factor(shape: tuple[int, ...], w1: tuple[int, int]) -> int | str:
    """The ``factor`` for which lycoris splits a weight of ``shape`` (out, in, ...) with this w1 (a, c), or
    'none' when no factor does."""
    for factor in (-1, *sorted(set(w1))):
        if (factorization(shape[0], factor)[0], factorization(shape[1], factor)[0]) == tuple(w1):
            return factor
    return "none"


def input_axis_norm(weight: torch.Tensor) -> torch.Tensor:
    """‖W‖ per input column of ``weight`` (out, in[, k...]), shaped (1, in[, 1...]) as DoRA's ``dora_scale``."""
    norm = weight.transpose(0, 1).reshape(weight.shape[1], -1).norm(dim=1)
    return norm.reshape(1, -1, *[1] * (weight.dim() - 2))


def untucker(t2: torch.Tensor, w2_a: torch.Tensor, w2_b: torch.Tensor) -> dict[str, torch.Tensor]:
    """LoKr's Tucker form of w2, ``t2`` (r, r, k...), ``w2_a`` (r, b), ``w2_b`` (r, d), in the plain layout of
    the same rank: ``lokr_w2_a`` (b, r) and ``lokr_w2_b`` (r, d·k...), whose product is the same w2 (b, d, k...):
    w2[p, q, k] = Σ_i w2_a[i, p] Σ_j t2[i, j, k] w2_b[j, q]. The rank, and so alpha / rank, are unchanged."""
    core = torch.einsum("i j ..., j q -> i q ...", t2, w2_b)
    return {"lokr_w2_a": w2_a.t().contiguous(), "lokr_w2_b": core.reshape(core.shape[0], -1).contiguous()}


def retucker(w2_a: torch.Tensor, w2_b: torch.Tensor, kernel: tuple[int, ...]) -> dict[str, torch.Tensor]:
    """The inverse of :func:`untucker`: plain ``w2_a`` (b, r), ``w2_b`` (r, d·k...) → ``lokr_t2`` (r, r, k...),
    ``lokr_w2_a`` (r, b), ``lokr_w2_b`` (r, d) with the same w2. The core (r, d, k...) is factored over its d axis
    by an SVD; ValueError when that axis has rank over r (a plain factor never trained in Tucker form)."""
    rank = w2_a.shape[1]
    core = w2_b.float().reshape(rank, -1, *kernel)  # (i, q, k...)
    d = core.shape[1]
    unfolded = core.transpose(0, 1).reshape(d, -1)  # (q, (i, k...)) = w2_bᵀ (q, j) @ T (j, (i, k...))
    u, s, vh = torch.linalg.svd(unfolded, full_matrices=False)
    keep = min(rank, s.shape[0])
    w2_b_new = torch.zeros(rank, d)
    w2_b_new[:keep] = u[:, :keep].t()
    t = torch.zeros(rank, unfolded.shape[1])
    t[:keep] = s[:keep, None] * vh[:keep]
    error = (w2_b_new.t() @ t - unfolded).norm() / unfolded.norm().clamp_min(1e-30)
    if error > TUCKER_TOLERANCE:
        raise ValueError(f"its LoKr factor w2 has rank over {rank} along the input axis (relative error "
                         f"{error:.1e} in Tucker form)")
    t2 = t.reshape(rank, rank, *kernel).transpose(0, 1).contiguous()  # t2[i, j] = T[j, (i, k...)]
    return {"lokr_t2": t2, "lokr_w2_a": w2_a.t().contiguous(), "lokr_w2_b": w2_b_new}


def _shapes(tensors: dict[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {key: tuple(value.shape) for key, value in sorted(tensors.items())}
