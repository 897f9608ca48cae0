"""HTTP routes the front end calls, registered on ComfyUI's server by the pack's entry point."""

from __future__ import annotations

from . import host
from .runs import metrics_response


def register_routes() -> None:
    from aiohttp import web
    from server import PromptServer

    @PromptServer.instance.routes.get("/loraloom/runs/{name}/metrics")
    async def run_metrics(request: web.Request) -> web.Response:
        """Every metrics record of a run, so the chart can be redrawn after a page reload."""
        name = request.match_info["name"]
        body = metrics_response(host.output_dir(), name)
        if body is None:
            return web.json_response({"error": f"no run named {name!r}"}, status=404)
        return web.json_response(body)
