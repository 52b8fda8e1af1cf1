"""The example workflows as a user gets them from ComfyUI's template browser
(no ComfyUI needed): every template has its API twin, a Note saying what to pick
and how to run it on a CPU, no file choice a user would not have (the front end
outlines those in red), and a thumbnail of the same name (what ComfyUI 0.33's
browser shows), a small JPEG."""
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


@pytest.mark.parametrize("path", TEMPLATES, ids=lambda p: p.stem)
def test_template_has_its_thumbnail(path):
    """``<name>.jpg`` beside the template: what the front end fetches for a
    custom node's template (``/api/workflow_templates/<pack>/<name>.jpg``),
    made by browser_check.py --shots from a real run."""
    from PIL import Image

    thumb = path.with_suffix(".jpg")
    assert thumb.is_file(), f"no thumbnail {thumb.name}: run tests/integration/browser_check.py --shots"
    assert thumb.stat().st_size < 100_000, "keep thumbnails small"
    with Image.open(thumb) as im:
        assert im.format == "JPEG" and im.width == im.height >= 256, (im.format, im.size)
        colours = im.convert("L").getextrema()
    assert colours[1] - colours[0] > 64, "a blank thumbnail"
