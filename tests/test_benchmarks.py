"""Every script in benchmarks/ runs, at a reduced size (its --smoke flag), and prints its figures.

A change that breaks a benchmark fails here, not months later when someone wants the figure again. The
scripts run in this process (runpy): the imports are already paid for, so each takes seconds.
"""

from __future__ import annotations

import os
import re
import runpy
import sys
from pathlib import Path

import pytest
import torch

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
NUMBER = r"[0-9.]+(e-?[0-9]+)?"
# script -> (arguments besides --smoke, with {tmp} for a temporary folder; what its output must contain)
SMOKE = {
    "adapter_cost.py": ([], [rf"\| {name} \| [0-9,]+ \| {NUMBER} \| {NUMBER} MiB \| {NUMBER} \| {NUMBER} \| {NUMBER} \|"
                             for name in ("lora", "locon", "loha", "dora")]),
    "base_memory.py": ([], [rf"\| nf4 \| {NUMBER} MiB \| {NUMBER} MiB \| {NUMBER} GiB \|",
                            rf"nf4 relative output error .*: {NUMBER}"]),
    "comfy_vs_engine.py": (["--work", "{tmp}"], [rf"ratio engine/ComfyUI = {NUMBER}"]),
    "dataset_scale.py": ([], [r"cold index: \d+ records", rf"per step .*: {NUMBER} per CPU second",
                              rf"one epoch plan of the bucket sampler: {NUMBER} s"]),
    "decode.py": ([], [rf"full decode {NUMBER} ms, reduced scale {NUMBER} ms per image"]),
    "full_finetune.py": ([], [r'"full \+ ema": {\n  "trained_parameters": \d+', rf'"step_time_vs_lora": {NUMBER}']),
    "gpu.py": (["--out", "{tmp}/gpu.jsonl"],
               [rf"\| {family} \| {precision} \| {offload} \| True \| False \| 64 \| 1 \| {NUMBER} \|"
                for family in ("flux", "lumina2", "sdxl") for precision in ("bf16", "fp8", "nf4")
                for offload in ("none", "blocks")]
               + [rf"\| {family} \| bf16 \| none \| False \| False \| 64 \| 1 \| {NUMBER} \|"
                  for family in ("flux", "lumina2", "sdxl")]),
    "latent_read.py": ([], [rf"latent bf16 .* warm: median {NUMBER} ms per batch of 2",
                            rf"text bf16 .* cold: median {NUMBER} ms"]),
    "memory_plan.py": ([], [rf"### {title}\n\n\| \| 64² \|[^#]*\| 8 GB \| bf16 \|"
                            for title in ("Flux", "Lumina2", "SDXL")]),
    "lumina2_step_overhead.py": ([], [rf"ratio engine/bare = {NUMBER}", r"all_linear: \d+ modules"]),
    "resume_stress.py": (["--out", "{tmp}"], [r'"every_step_once": true', r'"adapter_max_abs_diff": 0\.0']),
    "sdxl_step_overhead.py": ([], [rf"ratio engine/bare = {NUMBER}", r"\| all_linear_conv \| \d+ \+ \d+ \|"]),
    "step_overhead.py": ([], [rf"ratio engine/bare = {NUMBER}", rf"ratio rank dropout/input dropout = {NUMBER}"]),
}
NEEDS_COMFYUI = {"comfy_vs_engine.py"}


def test_every_benchmark_has_a_smoke_run():
    assert sorted(SMOKE) == sorted(p.name for p in BENCHMARKS.glob("*.py"))


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_benchmark_smoke_run_prints_its_figures(script, tmp_path, monkeypatch, capsys):
    if script in NEEDS_COMFYUI and not os.environ.get("COMFYUI_PATH"):
        pytest.skip("needs COMFYUI_PATH (and COMFYUI_PYTHON) pointing at a ComfyUI checkout")
    extra, expected = SMOKE[script]
    monkeypatch.setattr(sys, "argv", [script, "--smoke", *(a.format(tmp=tmp_path) for a in extra)])
    threads = torch.get_num_threads()  # some scripts measure on one core
    try:
        runpy.run_path(str(BENCHMARKS / script), run_name="__main__")
    except SystemExit as e:
        assert e.code in (0, None), f"{script} exited with {e.code}"
    finally:
        torch.set_num_threads(threads)
    out = capsys.readouterr().out
    for pattern in expected:
        assert re.search(pattern, out), f"{script} --smoke did not print {pattern!r}:\n{out[-3000:]}"


def test_gpu_flops_table_counts_every_family(monkeypatch, capsys):
    """``gpu.py --flops`` (the FLOP table of benchmarks/README.md, without a GPU) at the smoke size."""
    monkeypatch.setattr(sys, "argv", ["gpu.py", "--smoke", "--flops"])
    runpy.run_path(str(BENCHMARKS / "gpu.py"), run_name="__main__")
    out = capsys.readouterr().out
    for name in ("flux", "lumina2", "sdxl"):
        forward, total, hardware = map(float, re.search(
            rf"\| {name} \| 64 \| 1 \| ({NUMBER}) \| ({NUMBER}) \| ({NUMBER}) \|", out).group(1, 3, 5))
        assert total + forward == pytest.approx(hardware, rel=1e-3)
        # Backward: the input gradients (about one forward pass) plus the adapter's and the inputs' weight gradients.
        assert 1.9 < total / forward < 3
