"""Check the pack's front end in headless Chromium against a real ComfyUI (run by hand, not by CI).

What it does: starts ComfyUI (``COMFYUI_PATH``, via comfy_harness) with the
random SD1.5 checkpoint and the example workflows' LoRAs, opens the front end
in Debian's ``chromium`` through playwright-core, checks the template browser's
list and thumbnails, adds every pack node, checks that the dynamic LoRA inputs
grow and renumber, loads the two-LoRA template (the UI file, with the test's
LoRAs picked), queues it, and checks that the similarity table and the heatmap
previews render and that the console shows no error from ``web/``. Screenshots
and a JSON report go to the output folder (default
``~/.cache/grassmann_lora/browser_check``, outside the repository).

``--export`` instead regenerates the UI-format example workflows: each
``example_workflows/api/<name>.json`` is loaded with the front end's own
``app.loadApiJson``, laid out, and saved as ``example_workflows/<name>.json``
(and the front end's prompt for it must equal the API graph).

``--shots`` runs every template from its UI file as shipped (only the files
picked), times it, and writes the template browser's thumbnails
(``example_workflows/<name>.jpg``, a square around the result node) and the
README's screenshots (``docs/screenshots/``), then screenshots the template
browser itself.

One-time setup (Debian)::

    apt-get install chromium
    npm install --prefix ~/.cache/grassmann_lora/browser playwright-core

Run (from the repository root, with the project venv)::

    .venv/bin/python tests/integration/browser_check.py            # check
    .venv/bin/python tests/integration/browser_check.py --export   # rewrite example_workflows/*.json
    .venv/bin/python tests/integration/browser_check.py --shots    # thumbnails and screenshots

Environment: ``COMFYUI_PATH`` (default ~/ComfyUI), ``PLAYWRIGHT_CORE_DIR``
(default ~/.cache/grassmann_lora/browser), ``CHROMIUM`` (default /usr/bin/chromium),
``GRASSMANN_REAL_LORAS`` (default ../shared/fixtures/real_loras).
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import comfy_harness as ch  # noqa: E402
import example_graphs as eg  # noqa: E402

CACHE = Path.home() / ".cache" / "grassmann_lora"


SCREENSHOTS = eg.REPO / "docs" / "screenshots"
THUMB_SIZE = 384         # the template browser's cards are smaller
SHOT_WIDTH = 1000
MAX_BYTES = 100_000


def runnable_ui(name: str, out: Path) -> Path:
    """The shipped UI file of ``name`` with the test run's files picked, written to ``out``."""
    ui = json.loads((eg.WORKFLOWS_DIR / f"{name}.json").read_text(encoding="utf-8"))
    for node in ui["nodes"]:
        file = eg.RUN_FILES[name].get(str(node["id"]))
        if file is not None:
            node["widgets_values"][0] = file
    path = out / f"{name}.run.json"
    path.write_text(json.dumps(ui), encoding="utf-8")
    return path


def finish_pictures(out: Path) -> list[str]:
    """Thumbnails to THUMB_SIZE² JPEG, screenshots to SHOT_WIDTH-wide JPEG, each under MAX_BYTES."""
    from PIL import Image

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    done = []
    for k, name in enumerate(eg.WORKFLOWS, 1):
        thumb = eg.WORKFLOWS_DIR / f"{name}.jpg"
        Image.open(thumb).convert("RGB").resize((THUMB_SIZE, THUMB_SIZE), Image.LANCZOS) \
            .save(thumb, "JPEG", quality=80, optimize=True)
        shot = SCREENSHOTS / f"template_{k}.jpg"
        img = Image.open(out / f"{name}.result.png").convert("RGB")
        img = img.resize((SHOT_WIDTH, round(img.height * SHOT_WIDTH / img.width)), Image.LANCZOS)
        img.save(shot, "JPEG", quality=72, optimize=True)
        for path in (thumb, shot):
            size = path.stat().st_size
            assert size < MAX_BYTES, f"{path}: {size} bytes"
            done.append(f"{path.relative_to(eg.REPO)} ({size // 1000} kB)")
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--export", action="store_true", help="regenerate example_workflows/*.json")
    mode.add_argument("--shots", action="store_true", help="run every template; write thumbnails and screenshots")
    ap.add_argument("--out", default=str(CACHE / "browser_check"), help="screenshots and report")
    a = ap.parse_args(argv)

    ok, why = ch.comfyui_available()
    if not ok:
        print(f"browser check skipped: {why}")
        return 2
    fixtures, env = eg.REAL_LORAS, eg.browser_env()
    env["GRASSMANN_TEMPLATES"] = json.dumps(list(eg.WORKFLOWS))
    out = Path(a.out).expanduser()
    out.mkdir(parents=True, exist_ok=True)

    ckpt = ch.build_checkpoint()
    t0 = time.monotonic()
    with ch.ComfyServer(env={"OMP_NUM_THREADS": "1"}) as srv:
        print(f"ComfyUI {srv.url} up in {srv.startup_seconds:.1f}s")
        srv.add_checkpoint(ckpt, eg.CHECKPOINT)
        eg.prepare_loras(srv.loras_dir, fixtures)
        if a.export:
            files = [str(p) for p in eg.write_api_files()]
            for name, layout in eg.LAYOUTS.items():
                (out / f"{name}.layout.json").write_text(json.dumps(layout()))
            mode = "export"
        elif a.shots:
            plan = [{"name": name, "ui": str(runnable_ui(name, out)), "set": {},
                     "focus": [eg.RESULT_NODES[name]], "thumb": str(eg.WORKFLOWS_DIR / f"{name}.jpg")}
                    for name in eg.WORKFLOWS]
            (out / "plan.json").write_text(json.dumps(plan))
            files, mode = [str(out / "plan.json")], "shots"
        else:
            files, mode = [str(runnable_ui(eg.TWO_LORA, out))], "check"
        r = subprocess.run(["node", str(HERE / "browser_check.mjs"), srv.url, str(out), mode, *files], env=env)
        if r.returncode != 0:
            print(f"server log tail:\n{srv.log_tail(40)}")
    if a.export and r.returncode == 0:
        for name in eg.WORKFLOWS:
            shutil.copyfile(out / f"{name}.json", eg.WORKFLOWS_DIR / f"{name}.json")
            print(f"wrote {eg.WORKFLOWS_DIR / f'{name}.json'}")
    if a.shots and r.returncode == 0:
        for line in finish_pictures(out):
            print(f"wrote {line}")
    print(f"{'passed' if r.returncode == 0 else 'FAILED'} in {time.monotonic() - t0:.0f}s; "
          f"report and screenshots in {out}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
