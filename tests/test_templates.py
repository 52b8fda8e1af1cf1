"""The example workflows as a user gets them from ComfyUI's template browser
(no ComfyUI needed): every template has its API twin, a Note saying what to pick
and how to run it on a CPU, no file choice a user would not have (the front end
outlines those in red), and where a thumbnail of the same name exists (what
ComfyUI 0.33's browser shows), a small JPEG."""
import json
from pathlib import Path

import pytest

WORKFLOWS = Path(__file__).resolve().parents[1] / "example_workflows"
TEMPLATES = sorted(WORKFLOWS.glob("*.json"))
MODEL_FILE = (".safetensors", ".ckpt", ".pt", ".pth", ".bin", ".sft", ".onnx", ".gguf")


def _values(node) -> list:
    v = node.get("widgets_values") or []
    return list(v.values()) if isinstance(v, dict) else list(v)


def test_there_are_templates():
    assert len(TEMPLATES) >= 3


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_is_complete_and_picks_no_file(path):
    ui = json.loads(path.read_text(encoding="utf-8"))
    assert ui.get("nodes") and "links" in ui, "not a UI-format workflow"
    notes = [" ".join(map(str, _values(n))) for n in ui["nodes"] if n["type"] in ("Note", "MarkdownNote")]
    assert notes and any("CPU" in text for text in notes), "no Note saying how to run it on a CPU"
    for node in ui["nodes"]:
        if "Save" in node["type"]:
            continue                # a name to write, not a file to have
        for value in _values(node):
            assert not (isinstance(value, str) and value.lower().endswith(MODEL_FILE)), \
                f"node {node['id']} ({node['type']}) picks {value!r}, a file users won't have"
    api = json.loads((WORKFLOWS / "api" / path.name).read_text(encoding="utf-8"))
    for node_id, node in api.items():
        if "Save" in node["class_type"]:
            continue
        for key, value in node["inputs"].items():
            assert not (isinstance(value, str) and value.lower().endswith(MODEL_FILE)), (node_id, key, value)
    thumb = path.with_suffix(".jpg")
    if thumb.is_file():     # made by browser_check.py --shots from a real run
        data = thumb.read_bytes()
        assert data[:3] == b"\xff\xd8\xff" and len(data) < 300_000
