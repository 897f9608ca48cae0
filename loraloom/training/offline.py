"""Imports that stay off the network.

bitsandbytes (which peft and diffusers' models import too) asks the Hugging Face Hub for a CPU kernel as it
loads, on CPUs with AVX512-BF16 where the ``kernels`` package is installed (transformers >= 5.25 brings it). A run
never downloads: with the Hub switched to offline mode for the import, that lookup reads the local cache only and
bitsandbytes falls back to its own kernel when the cache has none. That expected miss is not logged: its two
warnings would only alarm. The switch and the log levels are restored afterwards, so other nodes in the same
ComfyUI process keep their settings.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import sys
from types import ModuleType

# Loggers that report the offline lookup's miss (kernels: the skipped trust check; bitsandbytes: its fallback).
QUIET_WHILE_OFFLINE = ("kernels", "bitsandbytes")


def import_offline(name: str) -> ModuleType:
    """``importlib.import_module(name)`` with the Hugging Face Hub offline while it runs, and without the
    warnings of :data:`QUIET_WHILE_OFFLINE`."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    loggers = [logging.getLogger(n) for n in QUIET_WHILE_OFFLINE]
    levels = [logger.level for logger in loggers]
    constants.HF_HUB_OFFLINE = True
    for logger in loggers:
        logger.setLevel(logging.ERROR)
    try:
        return importlib.import_module(name)
    finally:
        constants.HF_HUB_OFFLINE = saved
        for logger, level in zip(loggers, levels, strict=True):
            logger.setLevel(level)


# Libraries that ask the Hub for something as they are imported.
ASK_HUB_ON_IMPORT = ("bitsandbytes",)


def import_hub_askers_offline() -> None:
    """Import :data:`ASK_HUB_ON_IMPORT` (those installed, not yet imported) offline, before anything that loads
    models imports them the ordinary way."""
    for name in ASK_HUB_ON_IMPORT:
        if name not in sys.modules and importlib.util.find_spec(name) is not None:
            import_offline(name)
