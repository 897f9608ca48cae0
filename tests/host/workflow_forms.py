"""The UI form of an example workflow (what ComfyUI's template browser opens), generated from its API form
(what the host tests POST) and the server's ``/object_info``, so the two cannot disagree."""

from __future__ import annotations

from typing import Any

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
COLUMN_WIDTH, ROW_GAP = 380, 40
ROW, MULTILINE = 26, 90  # a slot or widget row; a multiline text box
# Nodes that grow while the graph runs (images arrive; the Train node's chart, status and previews, sized in
# web/loraloom.js) go last in their column, with room for what they show.
GROWS = {"LoraLoomTrainSteps": 46 + 190 + 340, "PreviewImage": 300, "SaveImage": 300, "PreviewAny": 160}


def _is_link(value: Any) -> bool:
    return isinstance(value, list) and len(value) == 2 and isinstance(value[0], str) and isinstance(value[1], int)


def _is_widget(spec: list) -> bool:
    return isinstance(spec[0], list) or spec[0] in WIDGET_TYPES


def _default(spec: list) -> Any:
    options = spec[1] if len(spec) > 1 else {}
    return options.get("default", spec[0][0] if isinstance(spec[0], list) else None)


def _has_seed_control(name: str, spec: list) -> bool:
    """The front end adds a 'control after generate' value after such an input (the legacy name rule too)."""
    options = spec[1] if len(spec) > 1 else {}
    return spec[0] == "INT" and (options.get("control_after_generate") or name in ("seed", "noise_seed"))


def _columns(api: dict[str, dict]) -> dict[str, int]:
    """Each node's column: the length of the longest chain of links feeding it."""
    depth: dict[str, int] = {}

    def visit(node_id: str) -> int:
        if node_id not in depth:
            sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
            depth[node_id] = 1 + max((visit(s) for s in sources), default=-1)
        return depth[node_id]

    for node_id in api:
        visit(node_id)
    return depth


def ui_from_api(api: dict[str, dict], object_info: dict[str, dict]) -> dict[str, Any]:
    columns = _columns(api)
    order = sorted(api, key=lambda n: (columns[n], api[n]["class_type"] in GROWS, int(n)))
    nodes, links, column_y = {}, [], {}
    for position, node_id in enumerate(order):
        entry, info = api[node_id], object_info[api[node_id]["class_type"]]
        inputs, widgets, extra = [], [], 0
        for section in ("required", "optional"):
            for name in info["input_order"].get(section, []):
                spec = info["input"][section][name]
                value = entry["inputs"].get(name)
                if _is_link(value):
                    links.append([len(links) + 1, int(value[0]), value[1], int(node_id), len(inputs),
                                  "COMBO" if isinstance(spec[0], list) else spec[0]])
                    inputs.append({"name": name, "type": links[-1][5], "link": links[-1][0]})
                elif _is_widget(spec):
                    # The front end fills widgets by position: an optional one the API form leaves out still
                    # takes its slot, with its default.
                    widgets.append(value if name in entry["inputs"] else _default(spec))
                    if _has_seed_control(name, spec):
                        widgets.append("fixed")
                    if len(spec) > 1 and spec[1].get("multiline"):
                        extra += MULTILINE - ROW
        col = columns[node_id]
        height = 46 + ROW * (max(len(inputs), len(info["output"])) + len(widgets)) + extra
        height += GROWS.get(entry["class_type"], 0)
        y = column_y.get(col, 40)
        column_y[col] = y + height + ROW_GAP
        nodes[node_id] = {
            "id": int(node_id), "type": entry["class_type"], "pos": [40 + col * COLUMN_WIDTH, y],
            "size": [COLUMN_WIDTH - 40, height], "flags": {}, "order": position, "mode": 0, "inputs": inputs,
            "outputs": [{"name": name, "type": kind, "links": [], "slot_index": i}
                        for i, (kind, name) in enumerate(zip(info["output"], info["output_name"]))],
            "properties": {"Node name for S&R": entry["class_type"]}, "widgets_values": widgets,
        }
        title = entry.get("_meta", {}).get("title")
        if title and title != info["display_name"]:
            nodes[node_id]["title"] = title
    for link_id, source, slot, *_ in links:
        nodes[str(source)]["outputs"][slot]["links"].append(link_id)
    return {"last_node_id": max(int(n) for n in api), "last_link_id": len(links),
            "nodes": [nodes[n] for n in sorted(nodes, key=int)], "links": links, "groups": [], "config": {},
            "extra": {}, "version": 0.4}
