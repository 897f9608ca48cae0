"""Reading model files safely: safetensors only, errors that name the file and the fix."""

from __future__ import annotations

import hashlib
import os
import pickle
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save

PICKLE_SUFFIXES = {".ckpt", ".pt", ".pth", ".bin"}


class ModelFileError(ValueError):
    """A model file that cannot be used; the message names the file and what was expected."""


class WriteError(OSError):
    """An output that could not be written (disk full, read-only folder); nothing was half-written."""


def find_weights(folder: Path, allow_pickle: bool = False) -> list[Path]:
    """The safetensors shards of a diffusers/transformers folder (or, opted in, its pickle shards)."""
    files = sorted(folder.glob("*.safetensors"))
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not files and pickles and allow_pickle:
        return pickles
    if not files:
        extra = f" (found pickle files {[p.name for p in pickles]}: convert them to safetensors)" if pickles else ""
        raise ModelFileError(f"{folder}: no .safetensors weights in this folder{extra}")
    return files


def read_safetensors(paths: Iterable[Path], what: str, allow_pickle: bool = False,
                     prefixes: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """All tensors of one or more safetensors files, in their stored dtype (fp8 stays fp8).

    With ``prefixes``, a file whose keys use one of them (the first that any key uses) gives only the
    tensors under it, the prefix dropped, and the rest is never read: all-in-one checkpoints bundle the
    diffusion model, text encoders and VAE under prefixes (``model.diffusion_model.``, ``vae.``, ...).

    Pickle files (.ckpt/.pt/.pth/.bin) are refused unless ``allow_pickle``; then they are read with
    ``torch.load(weights_only=True)``, which unpickles tensors and plain containers only, never code.
    """
    out: dict[str, torch.Tensor] = {}
    for path in paths:
        path = Path(path)
        if path.suffix in PICKLE_SUFFIXES and not allow_pickle:
            raise ModelFileError(f"{path}: pickle checkpoints are not loaded by default (they can run code). "
                                 f"Convert it to .safetensors, use a .safetensors release of {what}, or opt in "
                                 "to loading it as plain tensors (weights_only; config: model.allow_pickle = true).")
        if not path.is_file():
            raise ModelFileError(f"{path}: file not found (expected {what})")
        if path.suffix in PICKLE_SUFFIXES:
            data = _read_pickle_weights(path, what)
            prefix = _component_prefix(data, prefixes)
            out.update((k[len(prefix):], v) for k, v in data.items() if k.startswith(prefix))
            continue
        try:
            with safe_open(str(path), framework="pt") as f:
                keys = list(f.keys())
                prefix = _component_prefix(keys, prefixes)
                for k in keys:
                    if k.startswith(prefix):
                        out[k[len(prefix):]] = f.get_tensor(k)
        except (SafetensorError, OSError, RuntimeError) as e:
            raise ModelFileError(f"{path}: not a readable .safetensors file ({e}); the file may be truncated "
                                 f"or corrupt: download {what} again") from None
    return out


def _component_prefix(keys: Iterable[str], prefixes: tuple[str, ...]) -> str:
    keys = list(keys)
    return next((p for p in prefixes if any(k.startswith(p) for k in keys)), "")


def _read_pickle_weights(path: Path, what: str) -> dict[str, torch.Tensor]:
    try:
        data = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ModelFileError(f"{path}: refused: the pickle holds more than tensors ({str(e).splitlines()[0]}); "
                             f"only plain weights are loaded. Use a .safetensors release of {what}.") from None
    except (OSError, RuntimeError, EOFError) as e:
        raise ModelFileError(f"{path}: not a readable checkpoint ({e}); the file may be truncated or corrupt: "
                             f"download {what} again") from None
    if isinstance(data, dict) and isinstance(data.get("state_dict"), dict):  # Lightning / A1111 checkpoints
        data = data["state_dict"]
    if not isinstance(data, dict) or not all(isinstance(v, torch.Tensor) for v in data.values()):
        raise ModelFileError(f"{path}: expected a dict of tensors (a state dict), found {type(data).__name__}")
    return data


def strip_prefix(sd: dict[str, torch.Tensor], prefixes: tuple[str, ...]) -> dict[str, torch.Tensor]:
    """Drop the first of ``prefixes`` that every key starts with (ComfyUI/A1111 checkpoint prefixes)."""
    for p in prefixes:
        if sd and all(k.startswith(p) for k in sd):
            return {k[len(p):]: v for k, v in sd.items()}
    return sd


def fingerprint(path: str | Path, chunk: int = 1 << 20) -> str:
    """A fast identity of a model file or folder: sha256 over name-independent size, head and tail bytes.

    Safetensors headers list every tensor's name, dtype, shape and offset, so head + tail + size changes
    whenever the weights are swapped, without reading a 20 GB file.
    """
    path = Path(path)
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    h = hashlib.sha256()
    for f in files:
        size = f.stat().st_size
        h.update(f"{f.relative_to(path) if path.is_dir() else ''}:{size}".encode())
        with open(f, "rb") as fh:
            h.update(fh.read(chunk))
            if size > chunk:
                fh.seek(max(chunk, size - chunk))
                h.update(fh.read(chunk))
    return h.hexdigest()[:16]


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so a reader sees the old file or the whole new one, never a part."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        raise WriteError(e.errno, f"{path}: could not be written ({e.strerror or e}); the previous file, if "
                                  "any, is unchanged. Free disk space or choose a folder you can write to.") from e
    finally:
        tmp.unlink(missing_ok=True)
    fsync_dir(path.parent)


def writable_folder(folder: str | Path, key: str) -> Path:
    """Create ``folder`` if needed and prove it accepts files; the error names the config ``key``."""
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test-{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as e:
        raise WriteError(e.errno, f"{key}: {folder} is not writable ({e.strerror or e}); choose a folder you "
                                  f"can write to, or fix its permissions") from None
    return folder


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | Path,
                            metadata: dict[str, str] | None = None) -> None:
    """safetensors.torch.save, written atomically."""
    tensors = {k: v.detach().contiguous().cpu() for k, v in tensors.items()}
    atomic_write_bytes(path, save(tensors, metadata=metadata))


def fsync_dir(folder: Path) -> None:
    """Make a rename in ``folder`` durable (no-op where directories cannot be opened)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
