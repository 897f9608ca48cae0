"""Bad input gets a clear message naming the file or key and the fix (the table is docs/errors.md)."""

from __future__ import annotations

import os
import shutil
import subprocess
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraloom.loaders.files import ModelFileError, WriteError, read_safetensors
from loraloom.loaders.images import DatasetError
from loraloom.training.config import ConfigError, config_from_dict, load_config
from loraloom.training.families import flux
from loraloom.training.session import Session


@pytest.mark.parametrize("suffix", [".ckpt", ".pt", ".pth", ".bin"])
def test_pickle_weights_are_refused_unless_opted_in_then_read_as_plain_tensors(tmp_path, suffix):
    weights = {"double_blocks.0.img_attn.qkv.weight": torch.randn(6, 2), "step": torch.tensor(3)}
    path = tmp_path / f"model{suffix}"
    torch.save({"state_dict": weights}, path)  # the Lightning / A1111 nesting
    with pytest.raises(ModelFileError, match=rf"model\{suffix}: pickle checkpoints are not loaded by default "
                                             r"\(they can run code\)\. Convert it to \.safetensors"):
        read_safetensors([path], "the test model")
    loaded = read_safetensors([path], "the test model", allow_pickle=True)
    assert loaded.keys() == weights.keys() and all(torch.equal(loaded[k], weights[k]) for k in weights)


def test_a_run_refuses_a_pickled_base_until_model_allow_pickle_is_set(make_config, tiny_files, tmp_path):
    pickled = tmp_path / "flux1-tiny.pt"
    torch.save(load_file(str(tiny_files["diffusion_model"])), pickled)
    with pytest.raises(ModelFileError, match=r"flux1-tiny\.pt: pickle .*model\.allow_pickle = true"):
        Session.open(make_config("refused", model={"diffusion_model": str(pickled)}))
    session = Session.open(make_config("opted-in", model={"diffusion_model": str(pickled), "allow_pickle": True},
                                       train={"steps": 1}))
    session.step(1)
    assert session.state.step == 1


class _Payload:
    """What a malicious checkpoint carries: unpickling it runs a command."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_an_opted_in_pickle_with_code_is_refused_and_the_code_never_runs(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.ckpt"
    torch.save({"weight": torch.zeros(2), "payload": _Payload(marker)}, path)
    with pytest.raises(ModelFileError, match=r"evil\.ckpt: refused: the pickle holds more than tensors"):
        read_safetensors([path], "the test model", allow_pickle=True)
    assert not marker.exists()


def test_a_transformer_with_tensors_of_the_wrong_width_names_the_file_and_tensor(tiny_files, tmp_path):
    sd = load_file(tiny_files["diffusion_model"])
    key = next(k for k in sd if k.endswith("img_attn.qkv.weight"))
    sd[key] = torch.zeros(sd[key].shape[0], sd[key].shape[1] * 2)
    path = tmp_path / "flux-mixed.safetensors"
    save_file(sd, path)
    with pytest.raises(ModelFileError, match=r"flux-mixed\.safetensors: tensors of the wrong width "
                                             r"\(transformer_blocks\.0\.attn\.to_q\.weight \(\d+, \d+\), expected"):
        flux.load_transformer(path, torch.float32, False)


@pytest.mark.parametrize("text, message", [
    ("[train]\nnonfinite_patience = 0\n", "train.nonfinite_patience must be at least 1"),
    ("[train]\nkeep_checkpoint_every = -2\n", "train.keep_checkpoint_every must be >= 0"),
    ("[output]\nname = 'sub/lora'\n", "output.name must be a plain file name"),
    ("[output]\nname = '..\\\\lora'\n", "output.name must be a plain file name"),
    ("[output]\nname = '..'\n", "output.name must be a plain file name"),
    ("[output]\nname = ''\n", "output.name must be a plain file name"),
])
def test_impossible_values_name_the_key(tmp_path, text, message):
    path = tmp_path / "run.toml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=message.replace(".", r"\.")):
        load_config(path, check_paths=False)


def test_export_refuses_a_name_that_escapes_the_run_folder(make_config, tmp_path):
    session = Session.open(make_config(train={"steps": 1}))
    session.cfg = replace(session.cfg, output=replace(session.cfg.output, name="../../escaped"))  # unvalidated
    with pytest.raises(ConfigError, match=r"output\.name '\.\./\.\./escaped' must be a plain file name .* it "
                                          r"would be written outside"):
        session.export()
    assert not list(tmp_path.parent.rglob("escaped*"))


def test_a_dataset_folder_with_no_usable_images_says_so(make_config, tmp_path):
    images = tmp_path / "broken"
    images.mkdir()
    (images / "a.png").write_bytes(b"not a png at all")
    (images / "a.txt").write_text("zwx, a caption")
    (images / "notes.md").write_text("no images here")
    with pytest.raises(DatasetError, match=r"broken: no usable images .*unreadable image"):
        Session.open(make_config(data={"images": str(images)}))


def test_paths_with_spaces_and_non_ascii_names_train_and_export(tiny_files, shapes_folder, make_config, tmp_path):
    models = tmp_path / "mödels with spaces 模型"
    models.mkdir()
    moved = {}
    for key in ("diffusion_model", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "vae"):
        source = tiny_files[key]
        moved[key] = str(models / f"é {source.name}")
        (shutil.copytree if source.is_dir() else shutil.copy)(source, moved[key])
    images = tmp_path / "dätä sét" / "画像 folder"
    shutil.copytree(shapes_folder, images)
    cfg = make_config("rün dir 運行", model=moved, data={"images": str(images)}, train={"steps": 2},
                      output={"name": "my lora ✓"})
    path = Session.open(cfg).run()
    assert path.name == "my lora ✓.safetensors" and path.parent.name == "rün dir 運行"
    assert load_file(path)


@pytest.fixture
def read_only_folder(tmp_path):
    """A folder no one can write to: a read-only tmpfs as root (root ignores permissions), else chmod."""
    folder = tmp_path / "read-only"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", "ro,size=1m", "tmpfs", str(folder)], capture_output=True)
    if done.returncode != 0:
        pytest.skip("running as root without permission to mount a read-only tmpfs")
    yield folder
    subprocess.run(["umount", "-l", str(folder)], check=True)


def test_a_read_only_output_folder_is_named_before_any_work(make_config, read_only_folder):
    cfg = make_config(output={"run_dir": str(read_only_folder / "run")})
    with pytest.raises(WriteError, match=r"output\.run_dir: .*read-only/run is not writable \((Read-only file "
                                         r"system|Permission denied)\); choose a folder you can write to"):
        Session.open(cfg)


def test_unknown_config_keys_are_named_with_the_valid_ones():
    with pytest.raises(ConfigError, match=r"unknown key 'train\.keep_every'; valid keys here: .*keep_checkpoint_every"):
        config_from_dict({"train": {"keep_every": 3}})
