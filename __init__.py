"""ComfyUI entry point of the LoRA Loom node pack: ComfyUI imports this folder as a package.

pytest imports this file too (the repository root is a package to it) when it sets up the tests below it;
the nodes are registered only inside ComfyUI, which has imported its ``comfy`` package by then.
"""

import sys

if __package__ and "comfy" in sys.modules:
    import logging

    from .loraloom.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS, unavailable_features
    from .loraloom.nodes.routes import register_routes

    register_routes()
    for line in unavailable_features():
        logging.warning("LoRA Loom: %s", line)
    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
