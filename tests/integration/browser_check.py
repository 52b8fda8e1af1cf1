"""Check the pack's front end in headless Chromium against a real ComfyUI (run by hand, not by CI).

What it does: starts ComfyUI (``COMFYUI_PATH``, via comfy_harness) with the
random SD1.5 checkpoint and the example workflows' LoRAs, opens the front end
in Debian's ``chromium`` through playwright-core, adds every pack node, checks
that the dynamic LoRA inputs grow and renumber, loads
``example_workflows/3_two_lora_analysis.json`` (the UI file), queues it, and
checks that the similarity table and the heatmap previews render and that the
console shows no error from ``web/``. Screenshots and a JSON report go to the
output folder (default ``~/.cache/grassmann_lora/browser_check``, outside the
repository).

``--export`` instead regenerates the UI-format example workflows: each
``example_workflows/api/<name>.json`` is loaded with the front end's own
``app.loadApiJson``, laid out, and saved as ``example_workflows/<name>.json``
(and the front end's prompt for it must equal the API graph).

One-time setup (Debian)::

    apt-get install chromium
    npm install --prefix ~/.cache/grassmann_lora/browser playwright-core

Run (from the repository root, with the project venv)::

    .venv/bin/python tests/integration/browser_check.py            # check
    .venv/bin/python tests/integration/browser_check.py --export   # rewrite example_workflows/*.json

Environment: ``COMFYUI_PATH`` (default ~/ComfyUI), ``PLAYWRIGHT_CORE_DIR``
(default ~/.cache/grassmann_lora/browser), ``CHROMIUM`` (default /usr/bin/chromium),
``GRASSMANN_REAL_LORAS`` (default ../shared/fixtures/real_loras).
"""
from __future__ import annotations

import argparse
import json
import os
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


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--export", action="store_true", help="regenerate example_workflows/*.json")
    ap.add_argument("--out", default=str(CACHE / "browser_check"), help="screenshots and report")
    a = ap.parse_args(argv)

    ok, why = ch.comfyui_available()
    if not ok:
        print(f"browser check skipped: {why}")
        return 2
    fixtures = Path(os.environ.get("GRASSMANN_REAL_LORAS", eg.REPO.parent / "shared" / "fixtures" / "real_loras"))
    env = dict(os.environ)
    env.setdefault("PLAYWRIGHT_CORE_DIR", str(CACHE / "browser"))
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
        else:
            files = [str(eg.WORKFLOWS_DIR / "3_two_lora_analysis.json")]
            mode = "check"
        r = subprocess.run(["node", str(HERE / "browser_check.mjs"), srv.url, str(out), mode, *files], env=env)
        if r.returncode != 0:
            print(f"server log tail:\n{srv.log_tail(40)}")
    if a.export and r.returncode == 0:
        for name in eg.WORKFLOWS:
            shutil.copyfile(out / f"{name}.json", eg.WORKFLOWS_DIR / f"{name}.json")
            print(f"wrote {eg.WORKFLOWS_DIR / f'{name}.json'}")
    print(f"{'passed' if r.returncode == 0 else 'FAILED'} in {time.monotonic() - t0:.0f}s; "
          f"report and screenshots in {out}")
    return r.returncode


if __name__ == "__main__":
    sys.exit(main())
