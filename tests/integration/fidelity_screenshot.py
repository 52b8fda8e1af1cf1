"""Make docs/fidelity_node.png: workflow 4 run at test size in a real ComfyUI and
photographed in headless Chromium (run by hand, not by CI; same setup as
browser_check.py).

    .venv/bin/python tests/integration/fidelity_screenshot.py [OUT.png]
"""
from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_harness as ch  # noqa: E402
import example_graphs as eg  # noqa: E402


def small_graph() -> dict:
    """Workflow 4 at 64×64, one sampling step, one seed × two noise levels."""
    g = eg.runnable(eg.MERGE_FIDELITY)     # the shipped graph leaves the files to pick
    g["10"]["inputs"].update(width=64, height=64)
    for k in range(len(eg.MERGE_FIDELITY_MERGES)):
        g[str(22 + 10 * k)]["inputs"].update(steps=1, cfg=1.0)
    g["90"]["inputs"].update(width=64, height=64, seeds=1, timesteps=2)
    return g


def main(argv=None) -> int:
    out = Path((argv or sys.argv[1:] or [str(eg.REPO / "docs" / "fidelity_node.png")])[0]).resolve()
    ok, why = ch.comfyui_available()
    if not ok:
        print(f"skipped: {why}")
        return 2
    fixtures, env = eg.REAL_LORAS, eg.browser_env()
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp, ch.ComfyServer(env={"OMP_NUM_THREADS": "1"}) as srv:
        srv.add_checkpoint(ch.build_checkpoint(), eg.CHECKPOINT)
        eg.prepare_loras(srv.loras_dir, fixtures, [eg.LORA_A, eg.LORA_B])
        graph = Path(tmp) / "graph.json"
        graph.write_text(json.dumps(small_graph()))
        r = subprocess.run(["node", str(HERE / "fidelity_screenshot.mjs"), srv.url, str(graph), str(out)], env=env)
        if r.returncode != 0:
            print(srv.log_tail(40))
    if r.returncode == 0:       # a small PNG for the README: the two nodes, 128 colours
        from PIL import Image
        with Image.open(out) as im:
            shot = im.convert("RGB").crop((0, 0, im.width, min(im.height, 930)))
        shot.quantize(colors=128, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE).save(out, optimize=True)
    print(f"{'wrote' if r.returncode == 0 else 'FAILED:'} {out}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
