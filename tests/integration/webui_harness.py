"""Start a real Stable Diffusion WebUI (A1111 1.10, Forge or Forge Neo) headless on loopback with
the pack copied in as an extension, and talk to it over HTTP. Stdlib only.

A WebUI is a test peer laid out by the developer (never installed by the project):
``WEBUI_PATH`` (default ``~/stable-diffusion-webui``), ``WEBUI_FORGE_PATH``
(default ``~/stable-diffusion-webui-forge``) and ``WEBUI_NEO_PATH`` (default
``~/stable-diffusion-webui-forge-neo``), each with its own ``venv``. How they
were made to run here (offline tokenizer, flags, timings): ../shared/docs/webui.md.
Everything the run writes (config, outputs, the LoRA folder, the extension copy)
goes into a fresh ``--data-dir``; the WebUI's own tree is only read.
"""
from __future__ import annotations

import base64
import io
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

from comfy_harness import free_port

ROOT = Path(__file__).resolve().parents[2]
PACK_FILES = ("scripts/grassmann_lora_webui.py", "sdwebui", "core", "install.py", "requirements.txt",
              "README.md", "style.css")
# Flags of A1111 1.10 and lllyasviel's Forge; Forge Neo dropped these and has its own CPU switches.
LEGACY_FLAGS = ["--use-cpu", "all", "--no-half", "--precision", "full", "--no-download-sd-model"]
KINDS = {
    "a1111": ("WEBUI_PATH", "~/stable-diffusion-webui", LEGACY_FLAGS),
    "forge": ("WEBUI_FORGE_PATH", "~/stable-diffusion-webui-forge", [*LEGACY_FLAGS, "--always-cpu", "--all-in-fp32"]),
    "neo": ("WEBUI_NEO_PATH", "~/stable-diffusion-webui-forge-neo", ["--cpu", "--force-fp32"]),
}
FLAGS = ["--skip-prepare-environment", "--skip-torch-cuda-test", "--skip-python-version-check",
         "--skip-version-check", "--no-hashing", "--server-name", "127.0.0.1", "--api"]
CHECKPOINT = Path(os.environ.get("WEBUI_CKPT", Path.home() / ".cache" / "grassmann_lora" / "sd15_random.safetensors"))


def webui_path(kind: str) -> Path:
    env, default, _ = KINDS[kind]
    return Path(os.path.expanduser(os.environ.get(env, default)))


def available(kind: str) -> tuple[bool, str]:
    env, _, _ = KINDS[kind]
    if os.environ.get("GRASSMANN_WEBUI_TESTS") != "1":
        return False, ("WebUI integration tests are opt-in: set GRASSMANN_WEBUI_TESTS=1 (two server starts "
                       "and several CPU renders: about 5 min for Forge and 5-10 min for A1111 on 2 cores)")
    path = webui_path(kind)
    if not (path / "launch.py").is_file():
        return False, f"no {kind} WebUI at {path} (set {env}; see ../shared/docs/webui.md)"
    if not (path / "venv" / "bin" / "python").is_file():
        return False, f"{path} has no venv/bin/python (the WebUI's own venv)"
    if not CHECKPOINT.is_file():
        return False, (f"no SD1.5 checkpoint at {CHECKPOINT} (set WEBUI_CKPT, or build the random one with "
                       "tests/integration/make_sd15_checkpoint.py)")
    return True, ""


class HTTPError(RuntimeError):
    def __init__(self, status: int, body):
        super().__init__(f"HTTP {status}: {body}")
        self.status, self.body = status, body


class WebUI:
    def __init__(self, kind: str, loras: dict[str, Path], startup_timeout: float = 300.0):
        self.kind, self.root = kind, webui_path(kind)
        self.port = free_port()
        self.data = Path(tempfile.mkdtemp(prefix=f"grassmann-webui-{kind}-"))
        self.lora_dir = self.data / "Lora"
        self.log_path = self.data / "webui.log"
        self.startup_timeout = startup_timeout
        self.proc = None
        self._layout(loras)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _layout(self, loras: dict[str, Path]) -> None:
        ext = self.data / "extensions" / "grassmann_lora"
        for rel in PACK_FILES:
            src, dst = ROOT / rel, ext / rel
            dst.parent.mkdir(parents=True, exist_ok=True)
            if src.is_dir():
                shutil.copytree(src, dst, ignore=shutil.ignore_patterns("__pycache__"))
            else:
                shutil.copy(src, dst)
        self.lora_dir.mkdir(parents=True)
        for name, src in loras.items():
            shutil.copy(src, self.lora_dir / f"{name}{src.suffix}")

    def _checkpoint_flags(self) -> list[str]:
        if self.kind != "neo":
            return ["--ckpt", str(CHECKPOINT)]
        folder = self.data / "checkpoints"     # Neo has no --ckpt: the only model in its folder is used
        folder.mkdir(exist_ok=True)
        (folder / CHECKPOINT.name).symlink_to(CHECKPOINT)
        return ["--ckpt-dirs", str(folder)]

    def start(self) -> "WebUI":
        env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
        env.pop("PYTHONPATH", None)
        cmd = [str(self.root / "venv" / "bin" / "python"), "launch.py", *FLAGS, *KINDS[self.kind][2],
               *self._checkpoint_flags(), "--data-dir", str(self.data), "--lora-dir", str(self.lora_dir),
               "--port", str(self.port)]
        self._log = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(cmd, cwd=str(self.root), env=env, stdin=subprocess.DEVNULL,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        while time.monotonic() < t0 + self.startup_timeout:
            if self.proc.poll() is not None:
                tail = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.kind} exited ({self.proc.returncode}) while starting:\n{tail}")
            try:
                self.get("/grassmann-lora/v1/loras", timeout=10)
                self.startup_seconds = time.monotonic() - t0
                return self
            except (OSError, HTTPError):
                time.sleep(1)
        tail = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.kind} did not answer within {self.startup_timeout} s:\n{tail}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            for sig, wait in ((signal.SIGTERM, 20), (signal.SIGKILL, 20)):
                try:
                    os.killpg(self.proc.pid, sig)
                    self.proc.wait(timeout=wait)
                    break
                except ProcessLookupError:
                    break
                except subprocess.TimeoutExpired:
                    continue
        if getattr(self, "_log", None):
            self._log.close()
        if os.environ.get("GRASSMANN_KEEP_WEBUI_DATA") != "1":
            shutil.rmtree(self.data, ignore_errors=True)

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    # -- HTTP
    def request(self, method: str, path: str, body=None, timeout: float = 600.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                return json.loads(r.read() or b"null")
        except urllib.error.HTTPError as err:
            raw = err.read()
            try:
                payload = json.loads(raw)
            except ValueError:
                payload = raw.decode(errors="replace")
            raise HTTPError(err.code, payload) from None

    def get(self, path: str, timeout: float = 600.0):
        return self.request("GET", path, timeout=timeout)

    def post(self, path: str, body, timeout: float = 600.0):
        return self.request("POST", path, body, timeout)

    def txt2img(self, prompt: str, seed: int = 1234, size: int = 64, steps: int = 2):
        """One image as a uint8 array (pixels only: the PNG's text chunks hold the prompt)."""
        import numpy as np
        from PIL import Image

        answer = self.post("/sdapi/v1/txt2img", {"prompt": prompt, "seed": seed, "steps": steps, "width": size,
                                                 "height": size, "sampler_name": "Euler", "cfg_scale": 7,
                                                 "batch_size": 1, "n_iter": 1})
        return np.asarray(Image.open(io.BytesIO(base64.b64decode(answer["images"][0]))).convert("RGB"))
