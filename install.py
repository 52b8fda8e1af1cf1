"""Installs what the pack needs and the host lacks; safe to run on every start.

- A1111 / Forge run this file with the WebUI's venv on every start: it asks the
  WebUI's own ``launch.is_installed`` / ``launch.run_pip`` and installs only a
  missing package, unpinned, so the WebUI's pins (torch, numpy, Pillow,
  safetensors) are never touched.
- ComfyUI-Manager installs requirements.txt itself before running this file:
  everything is then present and nothing is installed again.
- By hand (``python install.py``): installs the missing ones from requirements.txt.
torch is never installed: the host provides it; without it a clear message says so.
"""
import importlib.util
import os
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
IMPORT_NAMES = {"safetensors": "safetensors", "numpy": "numpy", "pillow": "PIL"}


def requirements() -> dict:
    """requirement line by package name (lower case), from requirements.txt."""
    out = {}
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                name = line.split(">")[0].split("=")[0].split("<")[0].split("[")[0].strip()
                out[name.lower()] = line
    return out


def webui_launch():
    """The WebUI's ``launch`` module when this runs inside A1111/Forge, else None."""
    if "launch" not in sys.modules and importlib.util.find_spec("launch") is None:
        return None
    try:
        import launch
    except Exception:   # noqa: BLE001 - some other module named launch
        return None
    return launch if hasattr(launch, "is_installed") and hasattr(launch, "run_pip") else None


def main() -> int:
    if importlib.util.find_spec("torch") is None:
        print("Grassmann LoRA: torch is not installed in this Python; install the host (ComfyUI or the "
              "WebUI) first — this pack never installs torch.", file=sys.stderr)
        return 1
    launch = webui_launch()
    for name, line in requirements().items():
        module = IMPORT_NAMES.get(name, name)
        if launch is not None:
            if not launch.is_installed(module if module != "PIL" else "Pillow"):
                launch.run_pip(f"install {name}", f"{name} for Grassmann LoRA")
        elif importlib.util.find_spec(module) is None:
            try:
                subprocess.check_call([sys.executable, "-m", "pip", "install", line])
            except (OSError, subprocess.CalledProcessError) as err:
                print(f"Grassmann LoRA: could not install {line} ({err}); install it into this "
                      f"Python ({sys.executable}) by hand.", file=sys.stderr)
                return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
