"""The encoders of a run, behind their on-disk caches: images → raw latents, captions → text embeddings.

The engine's own encoders load the family's files named in ``model``. A front end may give a run others (the
node pack wraps ComfyUI's CLIP and VAE) that compute the same things. Every encoder has an ``id`` that names its
cache folder, so equal ids must mean equal outputs: the engine's derive it from their files, an encoder without
files from its outputs on a fixed probe (:func:`probe_id`).
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from ..loaders.cache import EncoderCache, text_key
from ..loaders.dataset import TrainingData
from ..loaders.files import fingerprint
from ..loaders.images import DatasetError, decode_batches
from . import distributed
from .config import DataConfig, ModelConfig
from .families.base import Family

ENCODE_BATCH = 8  # images per VAE call while building the latent cache
IMAGES_PER_WORKER = 32  # fewer missing latents than this per worker decode in-process (no start-up cost)
TEXT_CHUNK = 256  # captions per cache pass at start-up
TEXT_FILES = ("text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2")
PROBE_TEXT = "a photo of a red circle on a grey background, simple flat colour, centred"


class TextEncoder(Protocol):
    id: str  # names the cache folder: equal ids mean equal embeddings

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        """One entry per text: the family's embeddings without a batch dimension, float32 on the CPU (the keys and
        shapes are the family's; see :mod:`.families.base`). Shapes are the same for every text of a run."""
        ...

    def release(self) -> None:
        """Free what encoding holds in memory; the next call loads again."""
        ...


class ImageEncoder(Protocol):
    id: str  # names the cache folder: equal ids mean equal latents

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Pixels (B, 3, H, W) in [-1, 1] → raw latents (B, C, H/f, W/f), float32 on the CPU: the VAE's latent
        mean, before the family's scale and shift."""
        ...


@dataclass(frozen=True)
class Encoders:
    """Encoders given to a run from outside; None: the family's own, from the model files."""
    text: TextEncoder | None = None
    image: ImageEncoder | None = None


class FamilyTextEncoder:
    """The family's text encoders from ``model``'s files, loaded on the first call."""

    def __init__(self, family: Family, model: ModelConfig, device: torch.device):
        self.family, self.model, self.device = family, model, device
        # bf16 on a GPU (a T5-XXL in fp32 needs 19 GB); the dtype changes the embeddings, so it is in the id.
        self.dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
        self.fingerprints = {f"model.{name}": fingerprint(path) for name in TEXT_FILES
                             if (path := getattr(model, name))}
        prompt = [hashlib.sha256(model.system_prompt.encode()).hexdigest()[:8]] if model.system_prompt else []
        self.id = "-".join([*(f[:8] for f in self.fingerprints.values()), str(model.text_length), *prompt,
                            str(self.dtype).removeprefix("torch.")])
        self._encoders = None

    @property
    def loaded(self) -> bool:
        return self._encoders is not None

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        if self._encoders is None:
            encoders = self.family.load_text_encoder(self.model, self.dtype)
            self.family.text_encoder_to(encoders, self.device)
            self._encoders = encoders
        with torch.no_grad():
            return [{k: v[0] for k, v in self.family.encode_text(self._encoders, [t]).items()} for t in texts]

    def release(self) -> None:
        self._encoders = None


class FamilyImageEncoder:
    """The family's VAE from ``model.vae``, loaded on the first use (previews decode with it too)."""

    def __init__(self, family: Family, model: ModelConfig, device: torch.device):
        self.family, self.model, self.device = family, model, device
        self.fingerprints = {"model.vae": fingerprint(model.vae)}
        # The precision changes the latents; fp32 (the default) keeps the ids caches were written under.
        self.id = "-".join([self.fingerprints["model.vae"], *([model.vae_precision] * (model.vae_precision != "fp32"))])
        self._vae = None

    @property
    def vae(self):
        if self._vae is None:
            self._vae = self.family.load_vae(self.model).to(self.device)
        return self._vae

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.family.encode_images(self.vae, pixels).cpu()


class CachedOnly:
    """An encoder of another process, known by its id: its outputs are read from the cache and it cannot encode.

    A worker process gets this in place of a front end's encoder, which cannot cross the process boundary.
    """

    def __init__(self, encoder_id: str):
        self.id = encoder_id

    def encode_texts(self, texts: list[str]) -> list[dict[str, torch.Tensor]]:
        raise DatasetError(f"{len(texts)} caption(s), e.g. {texts[0]!r}, are not in the cache of text encoder "
                           f"{self.id}, and this process cannot run it; encode them in the process that has it")

    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        raise DatasetError(f"{len(pixels)} image(s) are not in the cache of image encoder {self.id}, and this "
                           "process cannot run it; encode them in the process that has it")

    def release(self) -> None:
        pass


def probe_id(name: str, outputs: Iterable[torch.Tensor]) -> str:
    """An encoder id from its outputs on a fixed probe input: ``name-<hash>``.

    For encoders without files (a front end's model objects). The same weights, patches, dtype and device give
    the same id in every process; changed weights give another (a cache miss, never a stale hit). Outputs are
    hashed in bfloat16, so a last-bit difference in float32 rarely changes the id.
    """
    h = hashlib.sha256(name.encode())
    for tensor in outputs:
        t = tensor.detach().float().cpu().contiguous()
        h.update(str(tuple(t.shape)).encode())
        h.update(t.to(torch.bfloat16).view(torch.int16).numpy().tobytes())
    return f"{name}-{h.hexdigest()[:16]}"


def probe_pixels(size: int = 64) -> torch.Tensor:
    """A fixed picture (1, 3, size, size) in [-1, 1] for :func:`probe_id` of image encoders: smooth colour ramps."""
    ramp = torch.linspace(-1, 1, size)
    y, x = torch.meshgrid(ramp, ramp, indexing="ij")
    return torch.stack([x, y, (x * y * 3).sin()])[None]


class CachedEncoders:
    """A run's text and image encoders behind their caches (``<root>/latents|text/<encoder id>/``).

    ``fingerprints`` are what checkpoints record of them: the model files for the engine's own encoders, the id
    of a given one.
    """

    def __init__(self, family: Family, model: ModelConfig, root: Path, given: Encoders, device: torch.device):
        self.text = given.text or FamilyTextEncoder(family, model, device)
        self.image = given.image or FamilyImageEncoder(family, model, device)
        self.fingerprints = {
            **(self.text.fingerprints if isinstance(self.text, FamilyTextEncoder) else {"encoders.text": self.text.id}),
            **(self.image.fingerprints if isinstance(self.image, FamilyImageEncoder)
               else {"encoders.image": self.image.id})}
        self.latent_cache = EncoderCache(root, "latents", self.image.id)
        self.text_cache = EncoderCache(root, "text", self.text.id)

    def encode_latents(self, data: TrainingData, settings: DataConfig) -> None:
        """Make sure every record's latent (each flip too) is cached; decoding runs in DataLoader workers.

        Records whose image does not decode are dropped from ``data``. With several ranks each encodes every
        world-th entry, then all learn which images failed to decode."""
        cache = self.latent_cache
        flips = (False, True) if data.bucket_settings.flip else (False,)
        rank, world = distributed.rank_and_world()
        rows = np.repeat(np.arange(len(data)), len(flips))[rank::world]
        flipped = np.tile(flips, len(data))[rank::world]
        missing = [(int(rows[i]), bool(flipped[i])) for i in cache.missing(data.latent_keys(rows, flipped))]
        specs = [data.latent_spec(row, flip) for row, flip in missing]
        workers = min(settings.workers, len(missing) // IMAGES_PER_WORKER)  # a handful decodes in-process
        failed: set[int] = set()
        with torch.no_grad():
            for done, pixels, bad in decode_batches(specs, ENCODE_BATCH, workers, settings.background):
                failed.update(missing[i][0] for i in bad)
                if pixels is not None:
                    for i, latent in zip(done, self.image.encode_images(pixels)):
                        cache.put(specs[i].key, {"latent": latent})
        failed = set().union(*distributed.all_gather(failed))  # waits for every rank's share, like a barrier
        data.drop(sorted(failed), "unreadable image")

    def latents(self, data: TrainingData, rows: Sequence[int], flips: Sequence[bool]) -> list[torch.Tensor]:
        def vanished(missing: list[int]) -> list[dict[str, torch.Tensor]]:
            raise DatasetError(f"{data.paths[rows[missing[0]]].as_py()}: its cached latent disappeared from "
                               f"{self.latent_cache.folder} during the run; reopen the session to rebuild it")
        return [e["latent"] for e in self.latent_cache.get_many(data.latent_keys(rows, flips), vanished)]

    def cache_texts(self, texts: list[str]) -> None:
        """Encode the texts missing from the cache, in chunks: a million embeddings never sit in memory.

        With several ranks each encodes every world-th text, then waits for the others' shares."""
        rank, world = distributed.rank_and_world()
        share = texts[rank::world]
        for start in range(0, len(share), TEXT_CHUNK):
            self.embed(share[start:start + TEXT_CHUNK])
        distributed.barrier()

    def embed(self, texts: list[str], store: bool = True) -> list[dict[str, torch.Tensor]]:
        """Text embeddings from the cache, encoding the missing ones (stored unless ``store`` is False)."""
        if not store:
            return self.text.encode_texts(texts)
        return self.text_cache.get_many([text_key(t) for t in texts],
                                        lambda missing: self.text.encode_texts([texts[i] for i in missing]))
