"""Two training processes (gloo on CPU) on the tiny Flux: one adapter, gradients of the union of their batches,
one writer, and an exact resume after a kill and a stop.

Ranks are forked from the test process (an import costs seconds here, a fork milliseconds); one run goes
through ``loraloom train --gpus 2`` and torchrun, as a user starts it.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from loraloom.training import checkpoint, distributed
from loraloom.training.config import ConfigError
from loraloom.training.metrics import read_metrics
from loraloom.training.session import Session

REPO = Path(__file__).parents[1]
# The CPU (gloo) proof. CUDA cannot be used in a process forked after it started, so on a GPU machine the
# multi-GPU check is the command in benchmarks/README.md.
pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="forked ranks; on GPUs see benchmarks/README.md")


def run_ranks(fn: Callable[[int], None], world: int = 2, timeout: float = 120) -> list[int | None]:
    """``fn(rank)`` in ``world`` processes forked from this one and joined in a process group; exit codes."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = multiprocessing.get_context("fork")
    ranks = [ctx.Process(target=_rank, args=(fn, rank, world, port)) for rank in range(world)]
    for p in ranks:
        p.start()
    for p in ranks:
        p.join(timeout)
    for p in ranks:
        if p.is_alive():
            p.kill()
            p.join()
    return [p.exitcode for p in ranks]


def _rank(fn: Callable[[int], None], rank: int, world: int, port: int) -> None:
    # OpenMP's thread pool does not survive a fork: a child of a process that already ran parallel torch code
    # hangs at its first parallel region unless it stays on one thread.
    torch.set_num_threads(1)
    # What torchrun sets for each process it starts.
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    with distributed.process_group():
        fn(rank)


def _record_steps(session: Session) -> list[dict]:
    """Per optimizer step (accumulation 1): the batch, its noise and timesteps, and the gradients the
    optimizer is about to apply."""
    steps: list[dict] = []
    next_batch, noised = session._next_batch, session.family.noised

    def batch():
        items = next_batch()
        steps.append({"items": items})
        return items

    def drawn(*args, **kwargs):
        out = noised(*args, **kwargs)
        steps[-1].update(noise=out.noise, t=out.t)
        return out

    session._next_batch = batch
    session.family.noised = drawn  # in the forked rank only
    session.optimizer.register_step_pre_hook(
        lambda *_: steps[-1].update(grads=[p.grad.clone() for p in session.params]))
    return steps


def test_two_ranks_average_their_gradients_into_one_adapter_and_rank_0_alone_writes(make_config, tmp_path):
    # No clipping: the optimizer sees the averaged gradients themselves.
    cfg = make_config("two", train={"steps": 3, "checkpoint_every": 1, "keep_checkpoints": 5, "max_grad_norm": 0})

    def rank_main(rank: int) -> None:
        session = Session.open(cfg)
        steps = _record_steps(session)
        session.run()
        torch.save({"steps": steps, "adapter": session.adapter.state()},
                   tmp_path / f"rank{rank}.pt")

    assert run_ranks(rank_main) == [0, 0]
    ranks = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    a, b = (r["adapter"] for r in ranks)
    assert all(torch.equal(a[k], b[k]) for k in a)  # bit for bit: every rank applied the same updates

    # Step 2 (step 1's gradients of A are zero: B starts at zero) in one process, from step 1's adapter, on the
    # union of both ranks' batches with their noise and timesteps: the same gradient as the averaged one.
    one, two = (r["steps"][1] for r in ranks)
    assert not torch.equal(one["noise"], two["noise"])  # each rank draws its own noise
    single = Session.open(make_config("single"))
    run_dir = Path(cfg.output.run_dir)
    after_one = load_file(checkpoint.step_folder(run_dir, 1) / "adapter.safetensors")
    single.adapter.load_state(after_one)
    single.denoiser.train()

    def gradients(steps: list[dict]) -> tuple[float, list[torch.Tensor]]:
        single.optimizer.zero_grad(set_to_none=True)
        loss = single._loss([i for s in steps for i in s["items"]], torch.cat([s["t"] for s in steps]),
                            torch.cat([s["noise"] for s in steps]))
        loss.backward()
        return loss.item(), [p.grad for p in single.params]

    union_loss, union = gradients([one, two])
    for averaged, expected in zip(one["grads"], union):
        torch.testing.assert_close(averaged, expected, rtol=1e-5, atol=1e-9)
    _, alone = gradients([one])  # what rank 0 would have applied without the other: the check can fail
    assert max((x - y).abs().max() / y.abs().max() for x, y in zip(alone, union)) > 0.05

    records = read_metrics(run_dir)
    logged = [r for r in records if r["type"] == "step"]
    assert logged[1]["loss"] == pytest.approx(union_loss, rel=1e-6)  # the mean over both ranks' batches
    assert [r["type"] for r in records] == ["dataset", "memory_plan", "step", "checkpoint", "step", "checkpoint",
                                            "step", "checkpoint", "export"]  # each line once: rank 0 alone writes
    folders = sorted(p.name for p in checkpoint.checkpoint_dir(run_dir).iterdir())
    assert folders == ["step-00000001", "step-00000002", "step-00000003"]
    files = checkpoint.verified_files(run_dir / "checkpoints" / folders[-1])
    assert {"state.json", "rank1-state.json", "rng.safetensors", "rank1-rng.safetensors", "host_rng.json",
            "rank1-host_rng.json"} <= files.keys()
    assert sorted(p.name for p in run_dir.iterdir()) == ["checkpoints", "lora.safetensors", "metrics.jsonl"]
    with pytest.raises(ConfigError, match=r"trained by 2 process.* this run has 1.*--gpus 2"):
        Session.open(cfg)


# Dropout and accumulation make every RNG and each rank's data position matter; with 6 training images in
# batches of 2, rank 0 gets 2 batches per epoch and rank 1 one, so the ranks' positions differ.
RUN = {"train": {"steps": 6, "gradient_accumulation": 2, "checkpoint_every": 2}, "adapter": {"dropout": 0.1}}


def test_kill_and_stop_then_resume_under_two_ranks_equals_an_uninterrupted_run(make_config, tmp_path):
    make_config("straight", **RUN)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, "-m", "loraloom.training.cli", "train", str(tmp_path / "straight.toml"),
                    "--gpus", "2"], env=env, check=True, timeout=300)

    cfg = make_config("interrupted", **RUN)
    plan = tmp_path / "plan"
    plan.write_text("checkpoint.before-rename 2")  # rank 0 dies writing step 4's checkpoint

    def killed(rank: int) -> None:
        os.environ[checkpoint.FAULT_PLAN_ENV] = str(plan)
        Session.open(cfg).run()

    def stopped(rank: int) -> None:
        session = Session.open(cfg)
        assert session.state.step == 2
        session.step(1)
        session.checkpoint()  # as the node's Cancel does, at a step no schedule checkpoints

    def finished(rank: int) -> None:
        session = Session.open(cfg)
        assert session.state.step == 3
        session.run()

    codes = run_ranks(killed)
    assert codes[0] == -9 and codes[1] != 0  # rank 1 fails at its next collective
    assert run_ranks(stopped) == [0, 0]
    assert run_ranks(finished) == [0, 0]

    straight, interrupted = (load_file(tmp_path / name / "lora.safetensors") for name in ("straight", "interrupted"))
    assert max((straight[k] - interrupted[k]).abs().max().item() for k in straight) == 0
    losses = [{r["step"]: r["loss"] for r in read_metrics(tmp_path / name) if r["type"] == "step"}
              for name in ("straight", "interrupted")]
    assert losses[0] == losses[1] and list(losses[1]) == [1, 2, 3, 4, 5, 6]  # every step once, same losses
