"""Encoders given to a run from outside (as the node pack gives ComfyUI's CLIP and VAE), on the tiny Flux."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from loraloom.loaders.images import DatasetError
from loraloom.training.encoders import CachedOnly, Encoders, probe_id, probe_pixels
from loraloom.training.families import flux, parts
from loraloom.training.session import Session, encode_data

REPO = Path(__file__).resolve().parents[1]


class TextObject:
    """Text encoders held as model objects, without file paths: identified by what they compute."""

    def __init__(self, model):
        self.encoders = flux.load_text_encoders(model, torch.float32)
        self.calls = 0
        self.id = probe_id("test-text", self.encode_texts(["a probe"])[0].values())
        self.calls = 0

    def encode_texts(self, texts):
        self.calls += len(texts)
        return [{k: v[0] for k, v in flux.encode_prompts(self.encoders, [t]).items()} for t in texts]

    def release(self):
        pass


class ImageObject:
    def __init__(self, model):
        self.vae = parts.load_vae(model.vae)
        self.calls = 0
        self.id = probe_id("test-vae", [self.encode_images(probe_pixels())])
        self.calls = 0

    def encode_images(self, pixels):
        self.calls += len(pixels)
        return parts.encode_images(self.vae, pixels)


def trained(make_config, run, encoders=None, steps=2):
    session = Session.open(make_config(run, data={"cache_dir": str(make_config.root / run / "cache")},
                                       train={"steps": steps}), encoders=encoders)
    session.step(steps)
    return session


@pytest.fixture
def config(make_config, tmp_path):
    make_config.root = tmp_path  # every run gets its own cache: each encoder encodes for itself
    return make_config


@pytest.mark.parametrize("given", ["text", "image", "both"])
def test_given_encoders_train_the_same_adapter_as_the_engines_own(config, given):
    model = config("probe").model
    text = TextObject(model) if given in ("text", "both") else None
    image = ImageObject(model) if given in ("image", "both") else None
    own = trained(config, "own")
    other = trained(config, "given", Encoders(text=text, image=image))
    for encoder in (text, image):
        assert encoder is None or encoder.calls > 0  # the given encoders did the encoding
    a, b = own.adapter.state(), other.adapter.state()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    if text:
        assert other.encoding.text_cache.folder.name == text.id
        assert other.model_fingerprints["encoders.text"] == text.id and "model.text_encoder" not in \
            other.model_fingerprints


def test_a_second_open_reads_the_cache_and_a_worker_trains_from_it(config):
    model = config("probe").model
    text, image = TextObject(model), ImageObject(model)
    summary = encode_data(config("ahead", data={"cache_dir": str(config.root / "shared")}), Encoders(text, image))
    assert summary.images == 8 and summary.latents_encoded == 8 and summary.texts_encoded > 0
    assert not summary.per_step_captions
    text.calls = image.calls = 0
    again = encode_data(config("ahead", data={"cache_dir": str(config.root / "shared")}), Encoders(text, image))
    assert (again.latents_encoded, again.texts_encoded, again.latents_cached) == (0, 0, 8)
    session = Session.open(config("run", data={"cache_dir": str(config.root / "shared")}, train={"steps": 2}),
                           encoders=Encoders(text, image))
    session.step(2)
    assert text.calls == 0 and image.calls == 0  # everything came from the cache
    # A process without the encoder objects (the node pack's worker) trains from the cache by their ids.
    worker = Session.open(config("worker", data={"cache_dir": str(config.root / "shared")}, train={"steps": 2}),
                          encoders=Encoders(CachedOnly(text.id), CachedOnly(image.id)))
    worker.step(2)
    a, b = session.adapter.state(), worker.adapter.state()
    assert all(torch.equal(a[k], b[k]) for k in a)
    with pytest.raises(DatasetError, match="not in the cache of text encoder"):
        Session.open(config("missing", data={"cache_dir": str(config.root / "shared")},
                            sample={"prompts": ("a prompt never encoded",)}),
                     encoders=Encoders(CachedOnly(text.id), CachedOnly(image.id)))


PROBE_IN_A_NEW_PROCESS = """
import sys
from loraloom.training.encoders import probe_id, probe_pixels
from loraloom.training.families import flux, parts
vae = parts.load_vae(sys.argv[1])
print(probe_id("test-vae", [parts.encode_images(vae, probe_pixels())]))
"""


def test_the_probe_id_is_stable_across_processes_and_changes_with_the_weights(config, tiny_files, tmp_path):
    image = ImageObject(config("probe").model)
    assert ImageObject(config("probe").model).id == image.id
    out = subprocess.run([sys.executable, "-c", PROBE_IN_A_NEW_PROCESS, str(tiny_files["vae"])],
                         capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(REPO)}).stdout
    assert out.strip() == image.id
    with torch.no_grad():
        image.vae.encoder.conv_in.weight[0, 0, 0, 0] += 0.01
    assert probe_id("test-vae", [image.encode_images(probe_pixels())]) != image.id
    text = TextObject(config("probe").model)
    token = text.encoders.t5_tokenizer("a").input_ids[0]
    with torch.no_grad():
        text.encoders.t5.shared.weight[token] += 0.01
    assert probe_id("test-text", text.encode_texts(["a probe"])[0].values()) != text.id
