"""Packaging of the node pack: registry metadata, and requirements that never touch ComfyUI's torch."""

from __future__ import annotations

import re
import sys
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

ROOT = Path(__file__).resolve().parents[1]


def test_requirements_are_the_dependencies_without_torch():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = [ln for ln in (ROOT / "requirements.txt").read_text().splitlines() if ln and not ln.startswith("#")]
    assert lines == [d for d in project["dependencies"] if re.split(r"[<>=; \[]", d)[0] != "torch"]
    assert not any(re.split(r"[<>=; \[]", ln)[0].startswith("torch") for ln in lines)


def test_registry_metadata():
    data = tomllib.loads((ROOT / "pyproject.toml").read_text())
    comfy = data["tool"]["comfy"]
    assert comfy["PublisherId"] and comfy["DisplayName"] == "LoRA Loom"
    assert data["project"]["urls"]["Repository"].startswith("https://github.com/")


def test_entry_point_exports_the_nodes_and_the_web_folder():
    text = (ROOT / "__init__.py").read_text()
    assert 'WEB_DIRECTORY = "./web"' in text and "NODE_CLASS_MAPPINGS" in text


def test_every_optional_package_names_its_features_when_missing(monkeypatch):
    from loraloom import nodes

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    optional = {re.split(r"[<>=; \[]", d)[0] for name, deps in extras.items() if name != "dev" for d in deps}
    assert optional == set(nodes.OPTIONAL_FEATURES)
    assert nodes.unavailable_features() == []  # the test install has every extra
    monkeypatch.setattr(nodes.importlib.util, "find_spec", lambda name: None)
    assert nodes.unavailable_features() == [
        "the 8-bit optimizers (adamw8bit, lion8bit) and the nf4 base precision are unavailable: bitsandbytes is "
        "not installed in this Python (pip install bitsandbytes)"]
