"""ComfyUI entry point of the LoRA Loom node pack: ComfyUI imports this folder as a package.

pytest also imports this file, alone, when it collects the tests below it: then there is no package to import
from and nothing to register.
"""

if __package__:
    from .loraloom.nodes import NODE_CLASS_MAPPINGS, NODE_DISPLAY_NAME_MAPPINGS
    from .loraloom.nodes.routes import register_routes

    register_routes()
    WEB_DIRECTORY = "./web"
    __all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS", "WEB_DIRECTORY"]
