"""Host test: the node pack inside a real ComfyUI (headless, CPU), driven over its HTTP and websocket API.

The example workflows' API forms are POSTed with their file widgets pointed at tiny real-width Flux files (1 + 1
blocks; ComfyUI's stock loaders only detect real widths) and the SDXL family's real-width checkpoint, at 64 px.
Proven here: the Flux example trains, exports into the first ``loras`` folder, the stock LoraLoaderModelOnly lists
and loads the file with every key, the Apply node patches exactly as the stock loader does, images with and without
the adapter differ; progress events arrive over the websocket; the queued example continues its run on each re-queue
(the first chunk in a worker process), Cancel (``POST /interrupt``) leaves a checkpoint and the next queue item
continues from it; a full fine-tune's Export puts its whole model where the stock UNETLoader lists it, and that
model samples as the base patched by the exported diff; the booru example trains SDXL (its text encoders too) from a
checkpoint, and the stock checkpoint and LoRA loaders load its export with every key; the metrics route serves the
run and nothing outside it; the UI forms in ``example_workflows/`` are what the API forms generate
(``LORALOOM_WRITE_EXAMPLES=1`` rewrites them).

Runs when COMFYUI_PATH points at a ComfyUI checkout (COMFYUI_PYTHON: the interpreter of its environment,
default this one); skips otherwise. About 3 minutes on 2 CPU cores.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

import numpy as np
import pytest

COMFYUI_PATH = os.environ.get("COMFYUI_PATH")
pytestmark = pytest.mark.skipif(not COMFYUI_PATH, reason="COMFYUI_PATH not set: no ComfyUI checkout to test against")
websocket = pytest.importorskip("websocket", reason="websocket-client not installed")

import torch  # noqa: E402
from diffusers import AutoencoderKL  # noqa: E402
from PIL import Image  # noqa: E402
from safetensors.torch import load_file  # noqa: E402
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel  # noqa: E402

from loraloom.loaders.cache import text_key  # noqa: E402
from loraloom.loaders.files import atomic_save_safetensors  # noqa: E402
from loraloom.loaders.images import decode_batches  # noqa: E402
from loraloom.training.config import DataConfig, ModelConfig, RunConfig  # noqa: E402
from loraloom.training.data import training_data  # noqa: E402
from loraloom.training.demo_data import write_shapes_dataset  # noqa: E402
from loraloom.training.families import family, flux, parts  # noqa: E402
from loraloom.training.families.flux_kit import REAL_WIDTH, TINY, build, write  # noqa: E402
from loraloom.training.families.flux_layout import transformer_to_bfl, vae_to_ldm  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from workflow_forms import ui_from_api  # noqa: E402

HERE = Path(__file__).resolve().parent
REPO = HERE.parents[1]
EXAMPLES = REPO / "example_workflows"
LAUNCHER = REPO / "tests" / "browser" / "run_comfyui.py"  # main.py with torchvision stubbed when absent
SDXL_CHECKPOINT = "checkpoints/sdxl-tiny.safetensors"  # every part of the SDXL family's real-width kit


def write_models(base: Path) -> dict[str, str]:
    """Real-width Flux files in ComfyUI's model folders: 'dev2pro' to train on, 'dev' to apply to, a VAE in
    the layout ComfyUI's VAELoader expects. Returns the tokenizer folders the engine needs."""
    models, stage = base / "models", base / "stage"
    files = write(build(REAL_WIDTH, seed=1, words=("zwx",)), stage, diffusers=False)
    for role, folder, name in (("diffusion_model", "diffusion_models", "flux1-dev2pro-tiny.safetensors"),
                               ("diffusion_model_fp8", "diffusion_models", "flux1-dev2pro-fp8-tiny.safetensors"),
                               ("text_encoder", "text_encoders", "clip_l-tiny.safetensors"),
                               ("text_encoder_2", "text_encoders", "t5xxl-tiny.safetensors")):
        (models / folder).mkdir(parents=True, exist_ok=True)
        (models / folder / name).symlink_to(files[role])
    (models / "checkpoints").mkdir(parents=True, exist_ok=True)  # every part in one file, as ComfyUI ships Flux
    (models / "checkpoints" / "flux1-dev2pro-aio-tiny.safetensors").symlink_to(files["checkpoint"])
    sdxl = family("sdxl")
    sdxl_files = sdxl.write_tiny(sdxl.tiny(seed=1, real_width=True), stage / "sdxl", diffusers=False)
    (models / "checkpoints" / "sdxl-tiny.safetensors").symlink_to(sdxl_files["checkpoint"])
    dev = build(REAL_WIDTH, seed=2).denoiser.state_dict()
    atomic_save_safetensors({k: v.to(torch.bfloat16) for k, v in transformer_to_bfl(dev).items()},
                            models / "diffusion_models" / "flux1-dev-tiny.safetensors")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(3)
        vae = AutoencoderKL(latent_channels=16, block_out_channels=(128, 256, 512, 512), layers_per_block=2,
                            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
                            norm_num_groups=32, use_quant_conv=False, use_post_quant_conv=False)
    (models / "vae").mkdir(parents=True)
    atomic_save_safetensors(vae_to_ldm(vae.state_dict()), models / "vae" / "ae-tiny.safetensors")
    images = write_shapes_dataset(base / "input" / "shapes", count=4, size=64, seed=0, trigger="zwx")
    records = [{"path": f"../shapes/{image.name}", "tag_string_general": f"1girl solo red_circle tag_{i} tagme",
                "tag_string_character": "hatsune_miku", "tag_string_copyright": "vocaloid", "tag_string_artist": "",
                "tag_string_meta": "highres", "rating": "g", "fav_count": 10 * i, "created_at": f"{2015 + i}-05-01"}
               for i, image in enumerate(images)]
    (base / "input" / "danbooru").mkdir()
    (base / "input" / "danbooru" / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in records))
    write_comfy_text_encoders(models)
    write_lumina2_models(models, stage / "lumina2")
    return {"clip_tokenizer": str(files["tokenizer"]), "t5_tokenizer": str(files["tokenizer_2"])}


def write_lumina2_models(models: Path, stage: Path) -> None:
    """The smallest real-width Lumina 2 ComfyUI detects (1 layer, 2 + 2 refiners) and its Gemma (real width, 3
    layers: the engine's encoder reads it; stock CLIPLoader would need the real depth), for the Lumina 2 example."""
    lumina = family("lumina2")
    files = lumina.write_tiny(lumina.tiny(seed=6, words=("zwx",), real_width=True), stage, diffusers=False)
    (models / "diffusion_models" / "lumina2-tiny.safetensors").symlink_to(files["diffusion_model"])
    (models / "text_encoders" / "gemma_2_2b-tiny.safetensors").symlink_to(files["text_encoder"])


def write_comfy_text_encoders(models: Path) -> None:
    """CLIP-L and T5 at the real vocabularies (ComfyUI's bundled tokenizers read them) but tiny widths, for
    tiny_flux_clip_node.py, and a Flux transformer of their widths (context 64, pooled 64) to train on them."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(5)
        clip = CLIPTextModel(CLIPTextConfig(
            vocab_size=49408, hidden_size=64, intermediate_size=256, num_hidden_layers=2, num_attention_heads=1,
            max_position_embeddings=77, hidden_act="quick_gelu", bos_token_id=49406, eos_token_id=49407))
        t5 = T5EncoderModel(T5Config(vocab_size=32128, d_model=64, d_kv=32, d_ff=128, num_layers=1, num_heads=2,
                                     feed_forward_proj="gated-gelu", is_encoder_decoder=False))
    clip_sd = {k if k.startswith("text_model.") else f"text_model.{k}": v for k, v in clip.state_dict().items()}
    atomic_save_safetensors(clip_sd, models / "text_encoders" / "clip_l-comfy-tiny.safetensors")
    t5_sd = {k: v for k, v in t5.state_dict().items() if k != "encoder.embed_tokens.weight"}
    atomic_save_safetensors(t5_sd, models / "text_encoders" / "t5-comfy-tiny.safetensors")
    narrow = build(dataclasses.replace(TINY, double_blocks=1, single_blocks=1), seed=4).denoiser
    atomic_save_safetensors(transformer_to_bfl(narrow.state_dict()),
                            models / "diffusion_models" / "flux1-narrow-tiny.safetensors")


class Comfy:
    """A running ComfyUI: HTTP helpers and every websocket message since it started."""

    def __init__(self, url: str, base: Path, log: Path):
        self.url, self.base, self.log = url, base, log
        self.client_id = uuid.uuid4().hex
        self.messages: list[dict] = []
        self.ws = websocket.WebSocket()
        self.ws.connect(f"ws://{url.removeprefix('http://')}/ws?clientId={self.client_id}", timeout=30)
        self.ws.settimeout(None)
        threading.Thread(target=self._listen, daemon=True).start()

    def _listen(self) -> None:
        while True:
            try:
                frame = self.ws.recv()
            except Exception:
                return
            if isinstance(frame, str):
                self.messages.append(json.loads(frame))

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=60) as r:
            return json.loads(r.read())

    def post(self, path: str, body: object):
        request = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                         headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(request, timeout=60) as r:
            return json.loads(r.read() or b"null")

    def queue(self, prompt: dict) -> str:
        try:
            return self.post("/prompt", {"prompt": prompt, "client_id": self.client_id})["prompt_id"]
        except urllib.error.HTTPError as e:
            raise AssertionError(f"ComfyUI refused the prompt: {e.read().decode()[:3000]}") from None

    def wait(self, prompt_id: str, timeout: float = 600) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history:
                return history[prompt_id]
            time.sleep(0.5)
        raise AssertionError(f"prompt {prompt_id} did not finish in {timeout} s; log: {self.log_text()[-3000:]}")

    def progress(self, since: int = 0, run: str | None = None) -> list[dict]:
        return [m["data"] for m in self.messages[since:] if m.get("type") == "loraloom.progress"
                and (run is None or m["data"]["run"] == run)]

    def image(self, ref: dict) -> np.ndarray:
        query = urllib.parse.urlencode(ref)
        with urllib.request.urlopen(f"{self.url}/view?{query}", timeout=60) as r:
            return np.asarray(Image.open(io.BytesIO(r.read())).convert("RGB"), dtype=np.int16)

    def log_text(self) -> str:
        return self.log.read_text(errors="replace")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def comfy(tmp_path_factory):
    base = tmp_path_factory.mktemp("comfy")
    (base / "custom_nodes").mkdir()
    (base / "custom_nodes" / "lora-loom").symlink_to(REPO, target_is_directory=True)
    (base / "custom_nodes" / "tiny_flux_clip_node.py").symlink_to(HERE / "tiny_flux_clip_node.py")
    tokenizers = write_models(base)
    port, log = free_port(), base / "server.log"
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1"}
    with open(log, "w") as out:
        server = subprocess.Popen(
            [python, str(LAUNCHER), COMFYUI_PATH, "--cpu", "--listen", "127.0.0.1", "--port", str(port),
             "--disable-auto-launch", "--base-directory", str(base), "--database-url", "sqlite:///:memory:"],
            stdout=out, stderr=subprocess.STDOUT, env=env)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 300
        while True:
            try:
                urllib.request.urlopen(f"{url}/object_info/LoraLoomTrainSteps", timeout=5)
                break
            except (urllib.error.URLError, ConnectionError):
                assert server.poll() is None and time.monotonic() < deadline, log.read_text()[-3000:]
                time.sleep(1)
        host = Comfy(url, base, log)
        host.tokenizers = tokenizers
        yield host
    finally:
        server.terminate()
        server.wait(timeout=60)


def example(name: str) -> dict:
    return json.loads((EXAMPLES / "api" / f"{name}.json").read_text())


def point_at_tiny_models(prompt: dict, tokenizers: dict[str, str], **train) -> dict:
    """The example with its file widgets on the tiny files and its sizes small enough for a CPU."""
    prompt = copy.deepcopy(prompt)
    settings = {
        "LoraLoomModelFlux": {"transformer": "flux1-dev2pro-tiny.safetensors", "clip_l": "clip_l-tiny.safetensors",
                          "t5": "t5xxl-tiny.safetensors", "vae": "ae-tiny.safetensors", "text_length": 16,
                          **tokenizers},
        "LoraLoomModelSDXL": {"unet": SDXL_CHECKPOINT, "clip_l": SDXL_CHECKPOINT, "clip_g": SDXL_CHECKPOINT,
                              "vae": SDXL_CHECKPOINT, "text_length": 77},
        "LoraLoomModelLumina2": {"transformer": "lumina2-tiny.safetensors", "gemma": "gemma_2_2b-tiny.safetensors",
                                 "vae": "ae-tiny.safetensors", "text_length": 32},
        "LoraLoomDatasetFolder": {"folder": "shapes", "resolution": 64},
        "LoraLoomDatasetMetadata": {"resolution": 64, "validation_images": 1},
        # alpha/rank = 16 makes two steps' adapter visible in a 2-step 64 px sample through a random VAE.
        "LoraLoomAdapter": {"rank": 4, "alpha": 64.0, "targets": "attention"},
        "LoraLoomOptimizer": {"lr": 0.01, "scheduler": "constant", "warmup_steps": 0},
        "LoraLoomTrainSteps": {"batch_size": 1, "mixed_precision": "fp32", "gradient_checkpointing": False,
                               "checkpoint_every": 0, "validate_every": 0, "preview_steps": 2, **train},
        "UNETLoader": {"unet_name": "flux1-dev-tiny.safetensors"},
        "VAELoader": {"vae_name": "ae-tiny.safetensors"},
        "EmptySD3LatentImage": {"width": 64, "height": 64},
        "KSampler": {"steps": 2},
    }
    for node in prompt.values():
        for key, value in settings.get(node["class_type"], {}).items():
            assert key in node["inputs"], f"{node['class_type']} has no input {key}"
            node["inputs"][key] = value
    return prompt


def node_of(prompt: dict, class_type: str) -> str:
    [node_id] = [k for k, v in prompt.items() if v["class_type"] == class_type]
    return node_id


def assert_succeeded(entry: dict, comfy: Comfy) -> None:
    assert entry["status"]["status_str"] == "success", (entry["status"], comfy.log_text()[-4000:])


def test_example_ui_forms_are_generated_from_the_api_forms(comfy):
    object_info = comfy.get("/object_info")
    for api_file in sorted((EXAMPLES / "api").glob("*.json")):
        ui = ui_from_api(json.loads(api_file.read_text()), object_info)
        target = EXAMPLES / api_file.name
        if os.environ.get("LORALOOM_WRITE_EXAMPLES") == "1":
            target.write_text(json.dumps(ui, indent=1) + "\n")
        assert json.loads(target.read_text()) == ui, f"{target} is stale: rerun with LORALOOM_WRITE_EXAMPLES=1"
    assert sorted(comfy.get("/workflow_templates")["lora-loom"]) == sorted(
        p.stem for p in (EXAMPLES / "api").glob("*.json"))


def test_flux_example_trains_exports_and_the_stock_loader_applies_it(comfy):
    prompt = point_at_tiny_models(example("flux_train_then_compare_on_dev"), comfy.tokenizers,
                                  total_steps=2, steps_per_queue=2, validate_every=2)
    train_id = node_of(prompt, "LoraLoomTrainSteps")
    since = len(comfy.messages)
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)

    events = comfy.progress(since, run="flux-zwx")
    assert {e["node"] for e in events} == {train_id}
    assert [p["step"] for e in events for p in e["points"]] == [1, 2]
    assert [v["step"] for e in events for v in e["validation"]] == [2]
    assert events[0]["state"] == "loading" and events[-1]["state"] == "done" and events[-1]["step"] == 2
    bar = [m["data"] for m in comfy.messages[since:] if m["type"] == "progress" and m["data"]["node"] == train_id]
    assert bar and bar[-1]["value"] == 2 and bar[-1]["max"] == 2

    lora_name = entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"][0]
    assert lora_name == "loraloom/flux-zwx.safetensors"
    assert (comfy.base / "models" / "loras" / lora_name).is_file()
    choices = comfy.get("/object_info/LoraLoaderModelOnly")["LoraLoaderModelOnly"]["input"]["required"]
    assert lora_name in choices["lora_name"][0]
    [saved] = entry["outputs"][node_of(prompt, "SaveImage")]["images"]
    assert comfy.image(saved).shape[1] > 2 * 192  # two labelled columns

    assert_the_stock_loader_applies_it(comfy, prompt, lora_name)


def assert_the_stock_loader_applies_it(comfy: Comfy, prompt: dict, lora_name: str) -> None:
    """The exported file through the stock loader, sampled with and without it at the same seed, and through the
    Apply node (the Train node re-runs: the run is finished, so it only says so and exports again): every key
    loads, Apply patches as the stock loader does, and the adapter shows."""
    stock = copy.deepcopy(prompt)
    for node_id in [k for k, v in stock.items() if v["class_type"] in
                    ("LoraLoomExportAdapter", "LoraLoomSideBySide", "SaveImage", "LoraLoomLossGraph", "PreviewImage")]:
        del stock[node_id]
    unet, apply = node_of(stock, "UNETLoader"), node_of(stock, "LoraLoomApplyAdapter")
    without_sampler, apply_sampler = (k for k, v in stock.items() if v["class_type"] == "KSampler")
    assert stock[apply_sampler]["inputs"]["model"] == [apply, 0]
    stock["stock_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [unet, 0], "lora_name": lora_name, "strength_model": 1.0}}
    stock["stock_sampler"] = copy.deepcopy(stock[apply_sampler])
    stock["stock_sampler"]["inputs"]["model"] = ["stock_lora", 0]
    images = sample_pictures(comfy, stock, {"without": without_sampler, "apply": apply_sampler,
                                            "stock": "stock_sampler"})
    assert np.array_equal(images["apply"], images["stock"])  # Apply is ComfyUI's own LoRA patching
    difference = np.abs(images["without"] - images["stock"]).mean()
    print(f"mean |with - without| = {difference:.3f} of 255")
    assert difference > 0.25  # sampling is deterministic: any difference is the adapter's


def sample_pictures(comfy: Comfy, graph: dict, samplers: dict[str, str]) -> dict[str, np.ndarray]:
    """Queue ``graph`` with each of ``samplers``' latents decoded by its VAELoader and previewed; every LoRA key
    must load. Returns the pictures by name."""
    vae = node_of(graph, "VAELoader")
    for name, sampler in samplers.items():
        graph[f"decode_{name}"] = {"class_type": "VAEDecode", "inputs": {"samples": [sampler, 0], "vae": [vae, 0]}}
        graph[f"show_{name}"] = {"class_type": "PreviewImage", "inputs": {"images": [f"decode_{name}", 0]}}
    log_before = len(comfy.log_text())
    entry = comfy.wait(comfy.queue(graph))
    assert_succeeded(entry, comfy)
    log = comfy.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]
    return {name: comfy.image(entry["outputs"][f"show_{name}"]["images"][0]) for name in samplers}


def test_lumina2_example_trains_exports_and_the_stock_loader_applies_it(comfy):
    """The Lumina 2 example on the real-width Lumina 2: trains, exports under native names, and the stock
    LoraLoaderModelOnly and the Apply node patch the stock UNETLoader's model alike, with cfg 4 against the engine's
    encoding of the negative prompt."""
    prompt = point_at_tiny_models(example("lumina2_train_then_compare"), comfy.tokenizers,
                                  total_steps=2, steps_per_queue=2, validate_every=2)
    prompt[node_of(prompt, "UNETLoader")]["inputs"]["unet_name"] = "lumina2-tiny.safetensors"
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    lora_name = entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"][0]
    assert lora_name == "loraloom/lumina2-zwx.safetensors"
    lora = load_file(comfy.base / "models" / "loras" / lora_name)
    assert "diffusion_model.layers.0.attention.qkv.lora_A.weight" in lora
    assert "diffusion_model.context_refiner.1.attention.out.alpha" in lora  # the refiners too
    assert_the_stock_loader_applies_it(comfy, prompt, lora_name)


def test_lokr_example_trains_and_the_stock_loader_applies_every_key(comfy):
    """The LoKr example (full matrices, factor 8) through the nodes, its export applied to Flux-dev by the stock
    LoraLoaderModelOnly: every key loaded, no adapter error logged, the picture changed by it."""
    prompt = point_at_tiny_models(example("flux_lokr_train_then_compare_on_dev"), comfy.tokenizers,
                                  total_steps=2, steps_per_queue=2)
    adapter = prompt[node_of(prompt, "LoraLoomAdapter")]["inputs"]
    assert adapter["algorithm"] == "lokr" and adapter["full_matrix"] and adapter["factor"] == 8
    # Full matrices start at zero and are not scaled up by alpha / rank: two steps need a larger lr to show.
    prompt[node_of(prompt, "LoraLoomOptimizer")]["inputs"]["lr"] = 0.05
    log_before = len(comfy.log_text())
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    lora_name = entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"][0]
    lora = load_file(comfy.base / "models" / "loras" / lora_name)
    assert any(k.endswith(".lokr_w1") for k in lora) and any(k.endswith(".lokr_w2") for k in lora)
    stock = {k: v for k, v in copy.deepcopy(prompt).items() if v["class_type"] in (
        "UNETLoader", "LoraLoomEncodePrompt", "LoraLoomModelFlux", "ConditioningZeroOut", "EmptySD3LatentImage",
        "KSampler", "VAELoader")}
    unet = node_of(stock, "UNETLoader")
    without, with_adapter = (k for k, v in stock.items() if v["class_type"] == "KSampler")
    stock["stock_lora"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": [unet, 0], "lora_name": lora_name, "strength_model": 1.0}}
    stock[with_adapter]["inputs"]["model"] = ["stock_lora", 0]
    images = sample_pictures(comfy, stock, {"without": without, "with": with_adapter})
    log = comfy.log_text()[log_before:]  # training included
    assert "ERROR lokr" not in log, log[-3000:]
    assert np.abs(images["without"] - images["with"]).mean() > 0.25


def test_a_full_fine_tune_exports_a_model_the_stock_unet_loader_lists_and_samples_as_its_patch(comfy):
    """The Flux example as a full fine-tune: the Export node writes the diff patch into ``loras`` and the whole
    model into ``diffusion_models``; the stock UNETLoader lists and loads that model, and samples what the
    trained-on base patched with the diff by the stock LoraLoaderModelOnly samples."""
    prompt = point_at_tiny_models(example("flux_train_then_compare_on_dev"), comfy.tokenizers,
                                  run_name="full-zwx", total_steps=2, steps_per_queue=2)
    prompt[node_of(prompt, "LoraLoomAdapter")]["inputs"]["algorithm"] = "full"
    prompt[node_of(prompt, "LoraLoomOptimizer")]["inputs"]["lr"] = 1e-3
    prompt[node_of(prompt, "LoraLoomExportAdapter")]["inputs"]["name"] = "loraloom/full-zwx"
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    name = "loraloom/full-zwx.safetensors"
    assert entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"] == [
        name, f"whole model in diffusion_models: {name}"]
    assert name in comfy.get("/object_info/UNETLoader")["UNETLoader"]["input"]["required"]["unet_name"][0]

    stock = {k: v for k, v in copy.deepcopy(prompt).items() if v["class_type"] in (
        "LoraLoomEncodePrompt", "LoraLoomModelFlux", "ConditioningZeroOut", "EmptySD3LatentImage", "VAELoader")}
    sampler = next(v for v in prompt.values() if v["class_type"] == "KSampler")  # the example has two, alike
    stock["base"] = {"class_type": "UNETLoader", "inputs": {"unet_name": "flux1-dev2pro-tiny.safetensors",
                                                            "weight_dtype": "default"}}
    stock["tuned"] = {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}
    stock["patched"] = {"class_type": "LoraLoaderModelOnly", "inputs": {
        "model": ["base", 0], "lora_name": name, "strength_model": 1.0}}
    for model in ("base", "tuned", "patched"):
        stock[f"sample_{model}"] = {"class_type": "KSampler", "inputs": {**sampler["inputs"], "model": [model, 0]}}
    images = sample_pictures(comfy, stock, {m: f"sample_{m}" for m in ("base", "tuned", "patched")})
    trained = np.abs(images["tuned"] - images["base"]).mean()
    formats = np.abs(images["tuned"] - images["patched"]).mean()
    print(f"mean |tuned - base| = {trained:.3f}, |tuned - base + patch| = {formats:.3f} of 255")
    assert trained > 0.25 and formats < trained / 10


def test_an_fp8_base_trains_in_fp32_and_its_export_loads_on_a_bf16_dev(comfy):
    """Every 2-D weight of the base in fp8 (the modulation and embedding layers too), every linear layer adapted,
    fp32 compute (ComfyUI on a CPU); the export applied to a bf16 Flux-dev by ComfyUI's own loader."""
    prompt = point_at_tiny_models(example("flux_train_then_compare_on_dev"), comfy.tokenizers,
                                  run_name="fp8-all-linear", total_steps=2, steps_per_queue=2)
    prompt[node_of(prompt, "LoraLoomModelFlux")]["inputs"]["transformer"] = "flux1-dev2pro-fp8-tiny.safetensors"
    prompt[node_of(prompt, "LoraLoomAdapter")]["inputs"]["targets"] = "all_linear"
    prompt[node_of(prompt, "LoraLoomExportAdapter")]["inputs"]["name"] = "loraloom/fp8-all-linear"
    since, log_before = len(comfy.messages), len(comfy.log_text())
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    losses = [p["loss"] for e in comfy.progress(since, run="fp8-all-linear") for p in e["points"]]
    assert len(losses) == 2 and all(np.isfinite(losses))
    lora = load_file(comfy.base / "models" / "loras" / "loraloom" / "fp8-all-linear.safetensors")
    assert any("norm1.linear" in k for k in lora) and any("norm.linear" in k for k in lora)  # modulation layers
    log = comfy.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]


def test_queued_example_continues_and_cancel_keeps_a_checkpoint(comfy):
    run = "queued-zwx"
    run_dir = comfy.base / "output" / "loraloom" / "runs" / run
    prompt = point_at_tiny_models(example("queued_training_with_previews"), comfy.tokenizers,
                                  total_steps=2, steps_per_queue=1, preview_every=2)
    train_id = node_of(prompt, "LoraLoomTrainSteps")
    prompt[train_id]["inputs"]["worker_process"] = True  # the first chunk in a worker process, the rest in ComfyUI
    since = len(comfy.messages)
    assert_succeeded(comfy.wait(comfy.queue(prompt)), comfy)
    assert [p["step"] for e in comfy.progress(since, run=run) for p in e["points"]] == [1]
    assert (run_dir / "worker.log").is_file()
    prompt[train_id]["inputs"]["worker_process"] = False
    since = len(comfy.messages)
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    events = comfy.progress(since, run=run)
    assert "continuing from the checkpoint at step 1" in events[1]["message"]
    assert [p["step"] for e in events for p in e["points"]] == [2]
    [preview] = events[-1]["images"]
    assert preview["subfolder"] == f"loraloom/runs/{run}/samples" and comfy.image(preview).size > 0
    assert entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"] == [
        "loraloom/queued-zwx-latest.safetensors"]

    # Cancel mid-run: the run stops at a step boundary with a checkpoint of it.
    prompt[train_id]["inputs"].update(total_steps=6, steps_per_queue=4)
    since = len(comfy.messages)
    prompt_id = comfy.queue(prompt)
    deadline = time.monotonic() + 300
    while not any(p["step"] >= 3 for e in comfy.progress(since, run) for p in e["points"]):
        assert time.monotonic() < deadline, comfy.log_text()[-3000:]
        time.sleep(0.2)
    comfy.post("/interrupt", {})
    entry = comfy.wait(prompt_id)
    assert entry["status"]["status_str"] == "error"
    assert any(m[0] == "execution_interrupted" for m in entry["status"]["messages"])
    cancelled = comfy.progress(since, run)[-1]
    assert cancelled["state"] == "cancelled"
    stopped = cancelled["step"]
    assert 3 <= stopped < 6
    assert (run_dir / "checkpoints" / f"step-{stopped:08d}").is_dir()

    since = len(comfy.messages)
    assert_succeeded(comfy.wait(comfy.queue(prompt)), comfy)
    events = comfy.progress(since, run)
    assert f"continuing from the checkpoint at step {stopped}" in events[1]["message"]
    assert [p["step"] for e in events for p in e["points"]] == list(range(stopped + 1, min(stopped + 4, 6) + 1))

    metrics = comfy.get(f"/loraloom/runs/{run}/metrics")
    steps = [r["step"] for r in metrics["events"] if r["type"] == "step"]
    assert metrics["run"] == run and steps == list(range(1, min(stopped + 4, 6) + 1))


def test_a_missing_optional_package_is_named_at_start(comfy):
    python = os.environ.get("COMFYUI_PYTHON", sys.executable)
    if subprocess.run([python, "-c", "import bitsandbytes"], capture_output=True).returncode == 0:
        pytest.skip("bitsandbytes is installed in ComfyUI's Python")
    assert "LoRA Loom: the 8-bit optimizers (adamw8bit, lion8bit) and the nf4 base precision are unavailable: " \
           "bitsandbytes is not installed" in comfy.log_text()


def test_booru_example_reads_kohaku_captions_and_trains_sdxl(comfy):
    prompt = point_at_tiny_models(example("booru_tags_kohaku_captions"), comfy.tokenizers,
                                  total_steps=1, steps_per_queue=1)
    assert prompt[node_of(prompt, "LoraLoomOptimizer")]["inputs"]["text_encoder_lr"] > 0
    entry = comfy.wait(comfy.queue(prompt))
    assert_succeeded(entry, comfy)
    [preview] = entry["outputs"][node_of(prompt, "PreviewAny")]["text"]
    captions = [ast.literal_eval(line.split(": ", 1)[1]) for line in preview.splitlines() if "hatsune miku" in line]
    assert captions, preview
    for line in captions:  # people first; quality, year, meta and rating last; underscores and junk gone
        tags = line.split(", ")
        assert tags[:3] == ["1girl", "hatsune miku", "vocaloid"] and tags[-2:] == ["highres", "safe"], line
        assert "tagme" not in tags and "|||" not in line
    assert (comfy.base / "output" / "loraloom" / "runs" / "booru-kohaku" / "checkpoints" / "step-00000001").is_dir()
    lora_name = entry["outputs"][node_of(prompt, "LoraLoomExportAdapter")]["text"][0]
    keys = load_file(comfy.base / "models" / "loras" / lora_name).keys()
    assert any(k.startswith("lora_te1_") for k in keys) and any(k.startswith("lora_te2_") for k in keys)

    # The stock checkpoint loader and LoraLoader (UNet and CLIP) load every key and sample with it. (The tiny
    # checkpoint's CLIPs have 3 layers; CheckpointLoaderSimple builds 12 and 32 and leaves the rest unset,
    # which changes no key of the LoRA.)
    log_before = len(comfy.log_text())
    stock = {
        "ckpt": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sdxl-tiny.safetensors"}},
        "lora": {"class_type": "LoraLoader", "inputs": {"model": ["ckpt", 0], "clip": ["ckpt", 1],
                                                        "lora_name": lora_name, "strength_model": 1.0,
                                                        "strength_clip": 1.0}},
        "text": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["lora", 1], "text": "1girl, solo"}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "sample": {"class_type": "KSampler", "inputs": {
            "model": ["lora", 0], "positive": ["text", 0], "negative": ["text", 0], "latent_image": ["latent", 0],
            "seed": 0, "steps": 2, "cfg": 1.0, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "show": {"class_type": "PreviewAny", "inputs": {"source": ["sample", 0]}},
    }
    assert_succeeded(comfy.wait(comfy.queue(stock)), comfy)
    log = comfy.log_text()[log_before:]
    assert "lora key not loaded" not in log and "NOT LOADED" not in log, log[-3000:]


def test_model_node_trains_from_an_all_in_one_checkpoint(comfy):
    bundle = "checkpoints/flux1-dev2pro-aio-tiny.safetensors"
    choices = comfy.get("/object_info/LoraLoomModelFlux")["LoraLoomModelFlux"]["input"]["required"]
    assert all(bundle in choices[name][0] for name in ("transformer", "clip_l", "t5", "vae"))
    prompt = point_at_tiny_models(example("queued_training_with_previews"), comfy.tokenizers,
                                  run_name="from-checkpoint", total_steps=1, steps_per_queue=1)
    model = node_of(prompt, "LoraLoomModelFlux")
    prompt[model]["inputs"].update(transformer=bundle, clip_l=bundle, t5=bundle, vae=bundle)
    prompt[node_of(prompt, "LoraLoomExportAdapter")]["inputs"]["name"] = "loraloom/from-checkpoint"
    assert_succeeded(comfy.wait(comfy.queue(prompt)), comfy)
    run_dir = comfy.base / "output" / "loraloom" / "runs" / "from-checkpoint"
    config = (run_dir / "checkpoints" / "step-00000001" / "config.toml").read_text()
    assert config.count("checkpoints/flux1-dev2pro-aio-tiny.safetensors") == 4
    assert (comfy.base / "models" / "loras" / "loraloom" / "from-checkpoint.safetensors").is_file()


def with_defaults(prompt: dict, object_info: dict) -> dict:
    """Every input a node of ``prompt`` leaves out set to its widget's default (a list widget: its first entry)."""
    for node in prompt.values():
        spec = object_info[node["class_type"]]["input"]
        for name, (kind, *options) in {**spec["required"], **spec.get("optional", {})}.items():
            default = (options[0] if options else {}).get("default", kind[0] if isinstance(kind, list) else None)
            if name not in node["inputs"] and default is not None:
                node["inputs"][name] = default
    return prompt


def test_encode_dataset_with_comfyuis_clip_and_vae_trains_and_hits_the_cache(comfy):
    """ComfyUI's VAE from the stock VAELoader (real Flux VAE architecture) and ComfyUI's Flux CLIP (its loader
    function, tokenizers and classes, tiny widths: tiny_flux_clip_node.py) encode the dataset; Train steps
    trains on it across queue runs; after ComfyUI forgets its node outputs (as after a restart) the Encode
    dataset node runs again with newly loaded encoders, finds it all cached, and the run resumes with them;
    the cached embeddings and latents equal the engine's own encoders' on the same files."""
    prompt = with_defaults({
        "model": {"class_type": "LoraLoomModelFlux", "inputs": {
            "transformer": "flux1-narrow-tiny.safetensors", "clip_l": "clip_l-comfy-tiny.safetensors",
            "t5": "t5-comfy-tiny.safetensors", "vae": "ae-tiny.safetensors", "text_length": 16}},
        "data": {"class_type": "LoraLoomDatasetFolder", "inputs": {"folder": "shapes", "trigger": "zwx",
                                                                   "resolution": 64, "validation_images": 1}},
        "clip": {"class_type": "TinyFluxCLIPLoader", "inputs": {
            "clip_name1": "clip_l-comfy-tiny.safetensors", "clip_name2": "t5-comfy-tiny.safetensors"}},
        "vae": {"class_type": "VAELoader", "inputs": {"vae_name": "ae-tiny.safetensors"}},
        "encode": {"class_type": "LoraLoomEncodeDataset", "inputs": {
            "model": ["model", 0], "dataset": ["data", 0], "clip": ["clip", 0], "vae": ["vae", 0]}},
        "summary": {"class_type": "PreviewAny", "inputs": {"source": ["encode", 1]}},
        "adapter": {"class_type": "LoraLoomAdapter", "inputs": {"rank": 4, "alpha": 4.0}},
        "optimizer": {"class_type": "LoraLoomOptimizer", "inputs": {"lr": 0.001, "scheduler": "constant"}},
        "train": {"class_type": "LoraLoomTrainSteps", "inputs": {
            "model": ["model", 0], "dataset": ["encode", 0], "adapter": ["adapter", 0],
            "optimizer": ["optimizer", 0], "run_name": "comfy-encoders", "total_steps": 2, "steps_per_queue": 1,
            "mixed_precision": "fp32", "gradient_checkpointing": False, "checkpoint_every": 0,
            "validate_every": 0}},
    }, comfy.get("/object_info"))
    summaries = []
    for queue in range(3):
        if queue == 2:  # as after a restart: ComfyUI forgets every node output, loads CLIP and VAE anew
            comfy.post("/free", {"unload_models": True, "free_memory": True})
            # The flags are read after a prompt: a trivial one, so that the next finds the caches empty.
            assert_succeeded(comfy.wait(comfy.queue({"a": prompt["adapter"], "p": {
                "class_type": "PreviewAny", "inputs": {"source": ["a", 0]}}})), comfy)
            prompt["train"]["inputs"]["total_steps"] = 3
        since = len(comfy.messages)
        entry = comfy.wait(comfy.queue(prompt))
        assert_succeeded(entry, comfy)
        assert [p["step"] for e in comfy.progress(since, "comfy-encoders") for p in e["points"]] == [queue + 1]
        summaries += entry["outputs"].get("summary", {}).get("text", [])
    first, cached, again = summaries
    assert cached == first  # the second queue run reused the Encode node's output: ComfyUI did not run it again
    assert first.startswith("4 images: 4 encoded, 0 from the cache\ncaptions: 4 encoded, 0 from the cache")
    assert again.startswith("4 images: 0 encoded, 4 from the cache\ncaptions: 0 encoded, 4 from the cache")
    assert "ComfyUI CLIP (comfy-clip-16-" in first and "ComfyUI VAE (comfy-vae-" in first

    cache = comfy.base / "output" / "loraloom" / "cache"
    [text_folder] = (cache / "text").glob("comfy-clip-16-*")
    [latent_folder] = (cache / "latents").glob("comfy-vae-*")
    comfy_root = Path(COMFYUI_PATH) / "comfy"
    text_encoders = comfy.base / "models" / "text_encoders"
    model = ModelConfig(text_encoder=str(text_encoders / "clip_l-comfy-tiny.safetensors"),
                        text_encoder_2=str(text_encoders / "t5-comfy-tiny.safetensors"),
                        tokenizer=str(comfy_root / "sd1_tokenizer"),
                        tokenizer_2=str(comfy_root / "text_encoders" / "t5_tokenizer"), text_length=16)
    encoders = flux.load_text_encoders(model, torch.float32)
    data = training_data(RunConfig(data=DataConfig(images=str(comfy.base / "input" / "shapes"), trigger="zwx",
                                                   resolution=64)), None)
    for caption in {data.fixed_caption(r) for r in range(len(data))}:
        cached = load_file(text_folder / text_key(caption)[:2] / f"{text_key(caption)}.safetensors")
        engine = flux.encode_prompts(encoders, [caption])
        torch.testing.assert_close(cached["t5"], engine["t5"][0], rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(cached["pooled"], engine["pooled"][0], rtol=1e-4, atol=1e-5)
    vae = parts.load_vae(comfy.base / "models" / "vae" / "ae-tiny.safetensors")
    spec = data.latent_spec(0)
    [(_, pixels, _)] = decode_batches([spec], 1, 0, (255, 255, 255))
    cached = load_file(latent_folder / spec.key[:2] / f"{spec.key}.safetensors")["latent"]
    torch.testing.assert_close(cached, parts.encode_images(vae, pixels)[0], rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("name", ["no-such-run", "..", "%2E%2E", "..%2F..%2Fuser", ".hidden"])
def test_metrics_route_serves_only_existing_runs(comfy, name):
    with pytest.raises(urllib.error.HTTPError) as error:
        comfy.get(f"/loraloom/runs/{name}/metrics")
    assert error.value.code == 404
