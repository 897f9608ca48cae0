"""The Train steps node and the nodes around it, on the tiny Flux, without ComfyUI.

The few calls into the host (``loraloom.nodes.host``) are replaced by recorders; the engine runs for real.
The same nodes run inside a real ComfyUI in ``tests/host/test_node_pack.py``.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch
from safetensors.torch import load_file

from loraloom.loaders.captions import CaptionSettings
from loraloom.nodes import host
from loraloom.nodes.adapter import ExportAdapter, export_path
from loraloom.nodes.encode import EncodeDataset, EncodePrompt
from loraloom.nodes.images import LossGraph, SideBySide, from_image_batch, to_image_batch
from loraloom.nodes.runs import LossHistory, TrainedRun
from loraloom.nodes.settings import AdapterSettings, DatasetFolder, OptimizerSettings, model_node
from loraloom.nodes.train import TrainSteps
from loraloom.nodes.widgets import widget
from loraloom.training.config import ConfigError, TrainConfig
from loraloom.training.families import family, flux, parts
from loraloom.training.metrics import read_metrics

FluxModel = model_node(family("flux"))


class Interrupted(Exception):
    """Stands for ComfyUI's InterruptProcessingException."""


class Bar:
    def __init__(self):
        self.values = []

    def update_absolute(self, value):
        self.values.append(value)


class Host:
    """Records what the nodes ask of ComfyUI; ``cancel_after`` presses Cancel once that many steps are done."""

    def __init__(self, tmp_path, output, tiny_files, monkeypatch):
        self.output = output
        self.loras = tmp_path / "models" / "loras"
        self.sent, self.bars, self.freed = [], [], 0
        self.cancel_after: int | None = None
        folders = {"diffusion_models": tiny_files["diffusion_model"].parent, "text_encoders":
                   tiny_files["text_encoder"].parent, "vae": tiny_files["vae"].parent}
        monkeypatch.setattr(host, "output_dir", lambda: self.output)
        monkeypatch.setattr(host, "input_dir", lambda: tmp_path / "input")
        monkeypatch.setattr(host, "model_path", lambda folder, name: folders[folder] / name)
        self.diffusion_models = tmp_path / "models" / "diffusion_models"
        monkeypatch.setattr(host, "first_folder",
                            lambda folder: {"loras": self.loras, "diffusion_models": self.diffusion_models}[folder])
        monkeypatch.setattr(host, "bundled_tokenizer", lambda folder: tmp_path / "bundled" / folder)
        monkeypatch.setattr(host, "send_progress", lambda event, payload: self.sent.append((event, payload)))
        monkeypatch.setattr(host, "progress_bar", self._bar)
        monkeypatch.setattr(host, "free_models", self._free)
        monkeypatch.setattr(host, "interrupted", self._interrupted)
        monkeypatch.setattr(host, "raise_if_interrupted", self._raise)

    def _bar(self, total, node_id):
        self.bars.append(Bar())
        return self.bars[-1]

    def _free(self):
        self.freed += 1

    def _interrupted(self) -> bool:
        steps = [p["step"] for _, p in self.sent if p["points"]]
        return self.cancel_after is not None and bool(steps) and steps[-1] >= self.cancel_after

    def _raise(self):
        self.cancel_after = None
        raise Interrupted

    def payloads(self) -> list[dict]:
        return [p for _, p in self.sent]


@pytest.fixture(scope="module")
def output(tmp_path_factory):
    """One ComfyUI output folder for the module, so the runs share the encoder cache; run names differ."""
    return tmp_path_factory.mktemp("output")


@pytest.fixture
def comfy(tmp_path, output, tiny_files, monkeypatch) -> Host:
    return Host(tmp_path, output, tiny_files, monkeypatch)


@pytest.fixture
def graph(comfy, tiny_files, shapes_folder):
    """The setting nodes' outputs, as the example workflow wires them."""
    model = FluxModel().build(transformer=tiny_files["diffusion_model"].name, clip_l=tiny_files["text_encoder"].name,
                              t5=tiny_files["text_encoder_2"].name, vae=tiny_files["vae"].name, base_precision="auto",
                              guidance_distilled=False, text_length=16, clip_tokenizer=str(tiny_files["tokenizer"]),
                              t5_tokenizer=str(tiny_files["tokenizer_2"]))[0]
    dataset, _ = DatasetFolder().build(str(shapes_folder), ".txt", "zwx", 64, 2)
    adapter = AdapterSettings().build(4, 8.0, 0.0, "attention_mlp", 0)[0]
    optimizer = OptimizerSettings().build("adamw", 1e-3, "constant", 0, 0.01)[0]
    return dict(model=model, dataset=dataset, adapter=adapter, optimizer=optimizer)


def train(graph, run_name: str, total_steps=4, steps_per_queue=2, **overrides):
    settings = dict(batch_size=2, training_seed=42, guidance=1.0, timesteps="auto_shift", mixed_precision="fp32",
                    gradient_checkpointing=False, checkpoint_every=0, validate_every=0, preview_every=0,
                    preview_prompt="", preview_steps=2, preview_guidance=1.0, unique_id="9")
    settings.update(overrides)
    return TrainSteps().train(**graph, run_name=run_name, total_steps=total_steps, steps_per_queue=steps_per_queue,
                              **settings)


def test_each_queue_item_continues_the_run_exactly(comfy, graph):
    run, lora, history = train(graph, "queued", validate_every=2)
    assert isinstance(run, TrainedRun) and run.step == 2 and run.total_steps == 4
    assert run.run_dir == comfy.output / "loraloom" / "runs" / "queued"
    assert (run.run_dir / "checkpoints" / "step-00000002").is_dir()
    assert lora.keys() == load_file(run.adapter_file).keys() and any(k.endswith(".alpha") for k in lora)
    assert history.steps == (1, 2) and history.val_steps == (2,)
    assert comfy.freed == 1 and comfy.bars[0].values == [0, 1, 2]

    run, lora, history = train(graph, "queued", validate_every=2)
    assert run.step == 4 and history.steps == (1, 2, 3, 4) and history.val_steps == (2, 4)
    assert comfy.bars[1].values == [2, 3, 4]
    states = [p["state"] for p in comfy.payloads()]
    assert states[-1] == "done" and "cancelled" not in states and "error" not in states

    # The same four steps in one queue item give the same adapter: continuing is exact.
    straight, straight_lora, _ = train(graph, "straight", steps_per_queue=4, validate_every=2)
    assert straight.step == 4
    for key, value in straight_lora.items():
        torch.testing.assert_close(lora[key], value, rtol=0, atol=0, msg=key)


def test_a_finished_run_says_so_instead_of_training(comfy, graph):
    train(graph, "finished", total_steps=1, steps_per_queue=1)
    before = len(comfy.payloads())
    run, _, history = train(graph, "finished", total_steps=1, steps_per_queue=1)
    assert run.step == 1 and history.steps == (1,)
    last = comfy.payloads()[before:]
    assert not any(p["points"] for p in last)
    assert last[-1]["state"] == "done" and "already finished" in last[-1]["message"]


def test_cancel_checkpoints_and_the_next_queue_item_resumes(comfy, graph):
    comfy.cancel_after = 1
    with pytest.raises(Interrupted):
        train(graph, "cancelled", total_steps=3, steps_per_queue=3)
    run_dir = comfy.output / "loraloom" / "runs" / "cancelled"
    assert [p.name for p in (run_dir / "checkpoints").iterdir()] == ["step-00000001"]
    assert comfy.payloads()[-1]["state"] == "cancelled"

    run, _, history = train(graph, "cancelled", total_steps=3, steps_per_queue=3)
    assert run.step == 3 and history.steps == (1, 2, 3)
    assert comfy.bars[-1].values[0] == 1  # the bar starts where the run was


def test_previews_every_n_steps_reach_the_progress_events(comfy, graph):
    run, _, _ = train(graph, "previews", total_steps=1, steps_per_queue=1, preview_every=1,
                      preview_prompt="zwx, a red circle")
    preview = run.run_dir / "samples" / "step-00000001.png"
    assert preview.is_file()
    images = comfy.payloads()[-1]["images"]
    assert images == [{"filename": preview.name, "subfolder": "loraloom/runs/previews/samples", "type": "output"}]


def test_changing_what_is_trained_on_a_queued_run_is_refused(comfy, graph):
    train(graph, "changed", total_steps=2, steps_per_queue=1)
    graph["adapter"] = AdapterSettings().build(8, 8.0, 0.0, "attention_mlp", 0)[0]
    with pytest.raises(ConfigError, match=r"adapter\.rank changed"):
        train(graph, "changed", total_steps=2, steps_per_queue=1)
    assert comfy.payloads()[-1]["state"] == "error"


def test_bad_settings_are_refused_before_loading(comfy, graph):
    with pytest.raises(ValueError, match="run name"):
        train(graph, "../escape")
    with pytest.raises(ConfigError, match=r"data\.resolution"):
        graph["dataset"] = DatasetFolder().build(graph["dataset"].images, ".txt", "", 40, 1)[0]
        train(graph, "bad-resolution")
    assert comfy.freed == 0


def test_model_node_defaults_to_the_tokenizers_that_ship_with_comfyui(comfy, tiny_files, tmp_path):
    model = FluxModel().build(transformer=tiny_files["diffusion_model"].name, clip_l=tiny_files["text_encoder"].name,
                              t5=tiny_files["text_encoder_2"].name, vae=tiny_files["vae"].name, base_precision="fp8",
                              guidance_distilled=True, text_length=64)[0]
    assert model.diffusion_model == str(tiny_files["diffusion_model"]) and model.vae == str(tiny_files["vae"])
    assert model.tokenizer == str(tmp_path / "bundled" / "sd1_tokenizer")
    assert model.tokenizer_2 == str(tmp_path / "bundled" / "text_encoders" / "t5_tokenizer")
    assert model.base_precision == "fp8" and model.guidance_distilled and model.text_length == 64


@pytest.mark.parametrize("targets", ["attention", "all_linear"])
def test_an_fp8_base_trains_in_fp32_through_the_node(comfy, graph, tiny_files, targets):
    model = dataclasses.replace(graph["model"], diffusion_model=str(tiny_files["diffusion_model_fp8"]))
    adapter = AdapterSettings().build(4, 8.0, 0.0, targets, 0)[0]
    run, lora, history = train({**graph, "model": model, "adapter": adapter}, f"fp8-{targets}", total_steps=2,
                               mixed_precision="fp32")
    assert run.step == 2 and len(history.losses) == 2 and all(loss is not None for loss in history.losses)
    assert lora and all(torch.isfinite(v.float()).all() for v in lora.values())


def test_dataset_node_previews_captions_and_finds_relative_folders(comfy, shapes_folder, tmp_path):
    (tmp_path / "input").mkdir()
    (tmp_path / "input" / "shapes").symlink_to(shapes_folder, target_is_directory=True)
    data, preview = DatasetFolder().build("shapes", ".txt", "zwx", 64, 1)
    assert data.images == str(tmp_path / "input" / "shapes")
    lines = preview.splitlines()
    assert lines[0] == "8 images: 7 for training, 1 for validation" and "skipped: none" in lines
    captions = [line for line in lines if line.startswith("  epoch ")]
    assert len(captions) == DatasetFolder.PREVIEW_CAPTIONS and all("zwx" in line for line in captions)
    with pytest.raises(ConfigError, match="nowhere"):
        DatasetFolder().build("nowhere", ".txt", "", 64, 1)


def test_widgets_carry_the_config_defaults_and_docs():
    kind, spec = widget(TrainConfig, "steps", min=1)
    assert kind == "INT" and spec["default"] == TrainConfig().steps and spec["min"] == 1
    assert spec["tooltip"] == "Total optimizer steps."
    choices, spec = widget(TrainConfig, "timesteps")
    assert choices == ["auto", "uniform", "sigmoid", "shift", "auto_shift"] and spec["default"] == "auto"


def test_export_never_overwrites_unless_asked(tmp_path):
    folder = tmp_path / "loras"
    assert export_path(folder, "a/b.safetensors", False) == folder / "a" / "b.safetensors"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "b.safetensors").write_bytes(b"x")
    (folder / "a" / "b_001.safetensors").write_bytes(b"x")
    assert export_path(folder, "a/b", False) == folder / "a" / "b_002.safetensors"
    assert export_path(folder, "a/b", True) == folder / "a" / "b.safetensors"
    for bad in ("../b", "/abs/b", ".hidden", "a/../../b", ""):
        with pytest.raises(ValueError, match="inside the loras folder"):
            export_path(folder, bad, False)


def test_export_node_writes_the_trained_adapter_into_the_loras_folder(comfy, graph):
    run, lora, _ = train(graph, "exported", total_steps=1, steps_per_queue=1)
    first = ExportAdapter().export(run, "mine/zwx", False)
    second = ExportAdapter().export(run, "mine/zwx", False)
    assert first["result"] == ("mine/zwx.safetensors",) and second["result"] == ("mine/zwx_001.safetensors",)
    exported = load_file(comfy.loras / "mine" / "zwx.safetensors")
    assert exported.keys() == lora.keys()
    assert all(torch.equal(exported[k], lora[k]) for k in lora)


def test_a_full_fine_tune_exports_its_model_for_the_diffusion_model_loader(comfy, graph):
    graph = {**graph, "adapter": AdapterSettings().build(4, 8.0, 0.0, "attention_mlp", 0, algorithm="full")[0]}
    run, patch, _ = train(graph, "whole", total_steps=1, steps_per_queue=1)
    out = ExportAdapter().export(run, "tuned", False)
    assert out["result"] == ("tuned.safetensors",)
    assert out["ui"]["text"] == ["tuned.safetensors", "whole model in diffusion_models: tuned.safetensors"]
    assert load_file(comfy.loras / "tuned.safetensors").keys() == patch.keys()
    model = load_file(comfy.diffusion_models / "tuned.safetensors")
    written = load_file(run.adapter_file.with_name(f"{run.adapter_file.stem}-model.safetensors"))
    assert model.keys() == written.keys() and all(torch.equal(model[k], written[k]) for k in written)
    again = ExportAdapter().export(run, "tuned", False)  # kept: both get the next free name
    assert again["ui"]["text"] == ["tuned_001.safetensors", "whole model in diffusion_models: tuned_001.safetensors"]


def test_the_moving_average_trains_exports_and_is_named_when_missing(comfy, graph):
    run, lora, _ = train(graph, "averaged", total_steps=2, steps_per_queue=2, ema_decay=0.5)
    ExportAdapter().export(run, "avg", False, weights="moving average")
    averaged = load_file(comfy.loras / "avg.safetensors")
    assert averaged.keys() == lora.keys()
    assert any(not torch.equal(averaged[k], lora[k]) for k in lora)  # the average lags the trained weights
    plain, _, _ = train(graph, "plain", total_steps=1, steps_per_queue=1)
    with pytest.raises(ConfigError, match=r"has no moving average export .* set ema_decay above 0"):
        ExportAdapter().export(plain, "none", False, weights="moving average")


def test_a_worker_process_trains_the_same_steps(comfy, graph):
    _, lora, _ = train(graph, "in-process", total_steps=2, steps_per_queue=2)
    run, worker_lora, history = train(graph, "in-worker", total_steps=2, steps_per_queue=2, worker_process=True)
    assert run.step == 2 and history.steps == (1, 2) and (run.run_dir / "worker.log").is_file()
    for key, value in lora.items():
        torch.testing.assert_close(worker_lora[key], value, rtol=0, atol=0, msg=key)
    streamed = [p for p in comfy.payloads() if p["run"] == "in-worker"]
    assert [pt["step"] for p in streamed for pt in p["points"]] == [1, 2] and streamed[-1]["state"] == "done"
    assert comfy.bars[-1].values[-1] == 2


def test_cancel_stops_a_worker_process_at_a_checkpoint(comfy, graph):
    comfy.cancel_after = 1
    with pytest.raises(Interrupted):
        train(graph, "worker-cancelled", total_steps=50, steps_per_queue=50, worker_process=True)
    cancelled = comfy.payloads()[-1]
    assert cancelled["state"] == "cancelled" and 1 <= cancelled["step"] < 50
    run_dir = comfy.output / "loraloom" / "runs" / "worker-cancelled"
    assert (run_dir / "checkpoints" / f"step-{cancelled['step']:08d}").is_dir()


@pytest.mark.skipif(torch.cuda.is_available() and torch.cuda.device_count() < 2, reason="needs 2 GPUs or none")
def test_cancel_stops_every_rank_of_a_two_process_worker_at_one_checkpoint(comfy, graph):
    """torchrun passes Cancel's SIGTERM to both ranks; they stop after the same step and rank 0 answers."""
    comfy.cancel_after = 1
    with pytest.raises(Interrupted):
        train(graph, "two-gpus", total_steps=50, steps_per_queue=50, gpus=2)
    streamed = [p for p in comfy.payloads() if p["run"] == "two-gpus"]
    assert streamed[-1]["state"] == "cancelled"
    step = streamed[-1]["step"]
    assert [pt["step"] for p in streamed for pt in p["points"]] == list(range(1, step + 1))  # from rank 0 only
    run_dir = comfy.output / "loraloom" / "runs" / "two-gpus"
    saved = run_dir / "checkpoints" / f"step-{step:08d}"
    assert (saved / "rank1-state.json").is_file() and '"world_size": 2' in (saved / "state.json").read_text()
    assert [r["step"] for r in read_metrics(run_dir) if r["type"] == "step"] == list(range(1, step + 1))


def test_encode_prompt_gives_flux_conditioning(graph):
    (conditioning,) = EncodePrompt().encode(graph["model"], "zwx, a red circle", 3.5)
    [[t5, extra]] = conditioning
    assert t5.shape == (1, 16, 64) and extra["pooled_output"].shape == (1, 64) and extra["guidance"] == 3.5
    (other,) = EncodePrompt().encode(graph["model"], "a blue square", 3.5)
    assert not torch.equal(other[0][0], t5)


def test_loss_graph_and_side_by_side_make_images():
    history = LossHistory((1, 2, 3), (0.9, 0.5, 0.6), (3,), (0.7,))
    (chart,) = LossGraph().draw(history, 0.6, 320, 200)
    assert chart.shape == (1, 200, 320, 3) and chart.dtype == torch.float32
    assert chart.std() > 0.05  # lines and labels were drawn, not a blank canvas

    a = torch.zeros(2, 32, 32, 3)
    b = torch.ones(2, 32, 32, 3)
    (sheet,) = SideBySide().compose(a, b, "base", "lora", "same seed")
    assert sheet.shape[0] == 1 and sheet.shape[2] > 2 * 192 and sheet.shape[1] > 2 * 192  # 2 rows, 2 columns
    with pytest.raises(ValueError, match="different labels"):
        SideBySide().compose(a, b, "x", "x", "")


def test_image_batches_round_trip_through_pil():
    images = torch.rand(3, 5, 7, 3).mul(255).round().div(255)
    pictures = from_image_batch(images)
    assert [p.size for p in pictures] == [(7, 5)] * 3
    assert torch.equal(torch.cat([to_image_batch(p) for p in pictures]), images)


class FakeClip:
    """Stands for ComfyUI's Flux CLIP object: its tokenize / encode_from_tokens surface over the tiny encoders,
    padding T5 input to ``t5xxl_min_length`` with the pad token as ComfyUI's tokenizer does."""

    def __init__(self, encoders):
        self.encoders, self.calls = encoders, 0

    def tokenize(self, text, disable_weights=False, tokenizer_options=None):
        assert disable_weights  # captions are literal text, not ComfyUI prompt syntax
        t5 = [(i, 1.0) for i in self.encoders.t5_tokenizer(text).input_ids]
        t5 += [(0, 1.0)] * (tokenizer_options.get("t5xxl_min_length", 256) - len(t5))
        clip = self.encoders.clip_tokenizer(text, padding="max_length", max_length=77, truncation=True).input_ids
        return {"l": [[(i, 1.0) for i in clip]], "t5xxl": [t5]}

    def encode_from_tokens(self, tokens, return_pooled=False):
        self.calls += 1
        [t5], [clip] = tokens["t5xxl"], tokens["l"]
        cond = self.encoders.t5(torch.tensor([[i for i, _ in t5]]))[0]
        return cond, self.encoders.clip(torch.tensor([[i for i, _ in clip]])).pooler_output


class FakeVae:
    """Stands for ComfyUI's VAE object: encode takes (B, H, W, 3) pixels in [0, 1], returns raw latents."""

    def __init__(self, path):
        self.vae, self.calls = parts.load_vae(path), 0

    def encode(self, pixels):
        self.calls += len(pixels)
        return parts.encode_images(self.vae, pixels.movedim(-1, 1) * 2 - 1)


@pytest.fixture
def comfy_encoders(graph, tiny_files):
    return FakeClip(flux.load_text_encoders(graph["model"], torch.float32)), FakeVae(tiny_files["vae"])


def test_encode_dataset_trains_like_the_engines_encoders_and_a_requeue_hits_the_cache(comfy, graph, comfy_encoders):
    clip, vae = comfy_encoders
    _, own_lora, _ = train(graph, "own-encoders", total_steps=2, steps_per_queue=2)
    encoded, summary = EncodeDataset().encode(graph["model"], graph["dataset"], clip=clip, vae=vae)
    assert summary.startswith("8 images: 8 encoded, 0 from the cache\ncaptions: 4 encoded, 0 from the cache")
    assert "ComfyUI CLIP (comfy-clip-16-" in summary and "ComfyUI VAE (comfy-vae-" in summary
    clip.calls = vae.calls = 0
    _, lora, _ = train({**graph, "dataset": encoded}, "comfy-encoders", total_steps=2, steps_per_queue=2)
    assert clip.calls == 0 and vae.calls == 0  # trained from the cache
    for key, value in own_lora.items():  # the same embeddings; latents to float rounding of the pixel transform
        torch.testing.assert_close(lora[key], value, rtol=1e-4, atol=1e-6, msg=key)
    # A re-queue (or a ComfyUI restart: the ids come from the weights) finds everything encoded.
    _, summary = EncodeDataset().encode(graph["model"], graph["dataset"], clip=clip, vae=vae)
    assert summary.startswith("8 images: 0 encoded, 8 from the cache\ncaptions: 0 encoded, 4 from the cache")
    # The worker process cannot get ComfyUI's objects: it trains from the cache by their ids.
    _, worker_lora, _ = train({**graph, "dataset": encoded}, "comfy-worker", total_steps=2, steps_per_queue=2,
                              worker_process=True)
    assert all(torch.equal(worker_lora[k], lora[k]) for k in lora)
    other_model = dataclasses.replace(graph["model"], text_length=32)
    with pytest.raises(ConfigError, match="different models"):
        train({**graph, "dataset": encoded, "model": other_model}, "mismatch", total_steps=2)


def test_per_step_captions_use_comfyuis_clip_in_process_and_refuse_a_worker(comfy, graph, comfy_encoders,
                                                                              shapes_folder):
    clip, _ = comfy_encoders
    dataset, _ = DatasetFolder().build(str(shapes_folder), ".txt", "zwx", 64, 2, CaptionSettings(shuffle=True))
    encoded, summary = EncodeDataset().encode(graph["model"], dataset, clip=clip)
    assert summary.endswith("captions change every step: Train steps encodes them while it trains")
    with pytest.raises(ConfigError, match="worker_process cannot train with ComfyUI's CLIP"):
        train({**graph, "dataset": encoded}, "per-step-worker", total_steps=2, worker_process=True)
    clip.calls = 0
    run, _, _ = train({**graph, "dataset": encoded}, "per-step", total_steps=2, steps_per_queue=2)
    assert run.step == 2 and clip.calls == 4  # 2 steps x batch 2, each caption encoded as read


def test_comfyui_clip_pads_and_cuts_t5_input_as_the_engine_does(graph):
    encoders = flux.load_text_encoders(graph["model"], torch.float32)  # text_length 16
    wrapped = host.ComfyTextEncoder(FakeClip(encoders), family("flux"), 16)
    texts = ["zwx", "a red circle " * 10]  # 2 and 31 T5 tokens
    for text, got in zip(texts, wrapped.encode_texts(texts)):
        expected = flux.encode_prompts(encoders, [text])
        assert got["t5"].shape == (16, 64)
        assert torch.equal(got["t5"], expected["t5"][0]) and torch.equal(got["pooled"], expected["pooled"][0])


def test_adapter_node_offers_every_algorithm_and_continues_from_a_file_of_the_loras_folder(comfy, graph, monkeypatch):
    from loraloom.training.adapters import ALGORITHMS

    first, lora, _ = train({**graph, "adapter": AdapterSettings().build(
        4, 4.0, 0.0, "attention", 0, algorithm="lokr", factor=4, full_matrix=True)[0]}, "lokr", total_steps=2)
    assert any(k.endswith(".lokr_w2") for k in lora)  # a full-matrix LoKr, trained through the nodes
    comfy.loras.mkdir(parents=True, exist_ok=True)
    (comfy.loras / "mine.safetensors").write_bytes(first.adapter_file.read_bytes())
    monkeypatch.setattr(host, "folder_files", lambda folder: {"loras": ["mine.safetensors"]}[folder])
    monkeypatch.setattr(host, "model_path", lambda folder, name: {"loras": comfy.loras}[folder] / name)
    inputs = AdapterSettings.INPUT_TYPES()["optional"]
    assert inputs["algorithm"][0] == list(ALGORITHMS)
    assert {"factor", "full_matrix", "decompose_both", "tucker"} <= inputs.keys()
    assert inputs["init_from"][0] == [AdapterSettings.NO_FILE, "mine.safetensors"]
    adapter = AdapterSettings().build(4, 4.0, 0.0, "attention", 0, algorithm="lokr", factor=4, full_matrix=True,
                                      init_from="mine.safetensors")[0]
    assert adapter.init_from == str(comfy.loras / "mine.safetensors") and adapter.full_matrix
    assert AdapterSettings().build(4, 4.0, 0.0, "attention", 0)[0].init_from == ""
    again, _, _ = train({**graph, "adapter": adapter}, "lokr-continued", total_steps=3, steps_per_queue=1)
    assert again.step == 1  # a new run, started from the file and trained one step on
