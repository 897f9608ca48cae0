"""Block and activation offloading: the same training, with the frozen base's blocks brought in one at a time."""

from __future__ import annotations

import pytest
import torch

from loraloom.training.config import ConfigError
from loraloom.training.offload import ActivationOffload, BlockOffload
from loraloom.training.session import Session

RUN = {"train": {"steps": 3, "gradient_checkpointing": True}, "adapter": {"dropout": 0.1},
       "optimizer": {"lr": 3e-3}}


def _train(make_config, name: str, family_name: str = "flux", **model) -> Session:
    session = Session.open(make_config(name, family_name, **RUN, model=model))
    session.step(3)
    return session


def _max_diff(a: Session, b: Session) -> float:
    sa, sb = a.adapter.state(), b.adapter.state()
    assert sa.keys() == sb.keys()
    return max((sa[k] - sb[k]).abs().max().item() for k in sa)


@pytest.mark.parametrize("family_name, precision", [("flux", "auto"), ("flux", "fp8"), ("flux", "nf4"),
                                                     ("lumina2", "auto"), ("sdxl", "auto")])
def test_block_offloading_trains_the_same_weights(make_config, family_name, precision):
    plain = _train(make_config, f"plain-{family_name}-{precision}", family_name, base_precision=precision)
    swapped = _train(make_config, f"offload-{family_name}-{precision}", family_name, base_precision=precision,
                     offload="blocks")
    assert plain.block_offload is None
    moved: BlockOffload = swapped.block_offload
    blocks = len(moved.blocks)
    # The tiny Flux: 2 double + 2 single blocks; Lumina 2: 2 layers + 1 + 1 refiners; SDXL: 17 transformer blocks.
    assert blocks == {"flux": 4, "lumina2": 4, "sdxl": 17}[family_name]
    # Every block was copied in for each forward pass, and the checkpointed ones (all but Lumina 2's refiners,
    # which diffusers does not checkpoint) again for backward's recomputation; never more than the running block
    # and the next one were on the device at once.
    recomputed = {"flux": 4, "lumina2": 2, "sdxl": 17}[family_name]
    assert moved.copies >= 3 * (blocks + recomputed)
    assert moved.peak_on_device == 2
    # Between steps every block holds its CPU originals again, and the adapter inside the blocks was trained.
    for slots in moved.slots:
        for slot in slots:
            assert getattr(slot.module, slot.kind)[slot.name] is slot.original
    assert _max_diff(plain, swapped) == 0.0  # fp32, same kernels on the same values: identical
    assert plain.validate() == swapped.validate()


@pytest.mark.parametrize("family_name", ["flux", "lumina2", "sdxl"])
def test_activation_offloading_trains_the_same_weights(make_config, family_name):
    plain = _train(make_config, f"plain-act-{family_name}", family_name)
    session = Session.open(make_config(f"act-{family_name}", family_name, **RUN, model={"offload_activations": True}))
    offloaded: ActivationOffload = session.activation_offload
    offloaded.min_bytes = 0  # the tiny model's activations are far below the 1 MiB default
    session.step(3)
    assert offloaded.offloaded_bytes > 0
    assert _max_diff(plain, session) == 0.0


def test_block_offloading_needs_gradient_checkpointing(make_config):
    with pytest.raises(ConfigError, match="gradient_checkpointing"):
        make_config("bad", model={"offload": "blocks"}, train={"gradient_checkpointing": False})


def test_prefetch_direction_follows_forward_and_backward():
    """The block copied ahead is the next one in a forward pass and the previous one in backward."""
    blocks = torch.nn.ModuleList(torch.nn.Linear(4, 4) for _ in range(3))
    model = torch.nn.Module()
    model.blocks = blocks
    model._repeated_blocks = ["Linear"]
    moved = BlockOffload(model, torch.device("cpu"))
    seen = []
    for i in (0, 1, 2, 2, 1, 0, 0, 1):  # forward, backward's recomputation, the next forward
        moved._enter(i)
        seen.append(next(iter(moved._pending), None))
        moved._exit(i)
    assert seen == [1, 2, None, 1, 0, None, 1, 2]
