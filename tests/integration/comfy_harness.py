"""Drive a real ComfyUI from pytest: start a headless server, queue graphs, read results.

ComfyUI is a *test peer*: the developer lays it out (see README / docs) and points
``COMFYUI_PATH`` at it (default ``~/ComfyUI``); its own venv python
(``$COMFYUI_PATH/venv/bin/python``) runs the server.  The pytest process itself only
talks HTTP to it and reads files, so this module imports nothing beyond the stdlib
(Pillow/numpy are optional, for ``load_image``).

Each :class:`ComfyServer` gets a throw-away base directory (``--base-directory``)::

    <base>/custom_nodes/grassmann_lora -> <repo root>     (symlink)
    <base>/models/checkpoints/ , <base>/models/loras/     (tests fill these)
    <base>/input/ output/ temp/ user/                     (isolated from ~/ComfyUI)
    <base>/user/comfyui.db                                (--database-url)
    <base>/server.log                                     (stdout+stderr of the server)

Usage::

    ok, why = comfyui_available()
    with ComfyServer() as srv:
        srv.add_checkpoint(path)                 # symlinks into models/checkpoints
        pid = srv.queue_prompt(api_graph)
        entry = srv.wait_for(pid, timeout=600)   # raises ComfyExecutionError on error
        paths = srv.output_images(entry)
        assert "lora key not loaded" not in srv.log_text()
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path

PACK_NAME = "grassmann_lora"
REPO_ROOT = Path(__file__).resolve().parents[2]


# ----------------------------------------------------------------------------- discovery

def comfyui_path() -> Path:
    return Path(os.path.expanduser(os.environ.get("COMFYUI_PATH", "~/ComfyUI"))).resolve()


def comfyui_python() -> Path:
    return comfyui_path() / "venv" / "bin" / "python"


def comfyui_available() -> tuple[bool, str]:
    """(True, description) when a usable ComfyUI is laid out, else (False, reason)."""
    root = comfyui_path()
    src = "COMFYUI_PATH" if "COMFYUI_PATH" in os.environ else "COMFYUI_PATH unset, default"
    if not (root / "main.py").is_file() or not (root / "comfy" / "sd.py").is_file():
        return False, f"no ComfyUI at {root} ({src}); set COMFYUI_PATH to a ComfyUI checkout with a venv/"
    py = comfyui_python()
    if not os.access(py, os.X_OK):
        return False, f"ComfyUI at {root} ({src}) has no venv python at {py}; create {root}/venv"
    version = "?"
    vf = root / "comfyui_version.py"
    if vf.is_file():
        for line in vf.read_text().splitlines():
            if line.startswith("__version__"):
                version = line.split("=", 1)[1].strip().strip("\"'")
    return True, f"ComfyUI {version} at {root} ({py})"


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


# ----------------------------------------------------------------------------- errors

class ComfyError(RuntimeError):
    pass


class ComfyStartupError(ComfyError):
    pass


class PromptRejected(ComfyError):
    """POST /prompt answered 400 (validation failed); ``.body`` has error/node_errors."""

    def __init__(self, body):
        self.body = body
        err = body.get("error", {}) if isinstance(body, dict) else {}
        msg = err.get("message", "") if isinstance(err, dict) else str(err)
        details = []
        for nid, ne in (body.get("node_errors") or {}).items() if isinstance(body, dict) else []:
            for e in ne.get("errors", []):
                details.append(f"node {nid} ({ne.get('class_type')}): {e.get('message')}: {e.get('details')}")
        super().__init__(f"prompt rejected: {msg}" + ("; " + "; ".join(details) if details else ""))


class ComfyExecutionError(ComfyError):
    """The history entry reports an execution error; carries node id/type and message."""

    def __init__(self, data: dict):
        self.data = data
        self.node_id = data.get("node_id")
        self.node_type = data.get("node_type")
        self.exception_message = data.get("exception_message", "")
        self.exception_type = data.get("exception_type", "")
        tb = "".join(data.get("traceback") or [])
        super().__init__(
            f"execution error in node {self.node_id} ({self.node_type}): "
            f"{self.exception_type}: {self.exception_message}\n{tb}".rstrip()
        )


# ----------------------------------------------------------------------------- server

class ComfyServer:
    """Context manager running ``main.py --cpu`` on 127.0.0.1 with an isolated base dir."""

    def __init__(self, port: int | None = None, startup_timeout: float = 240.0,
                 extra_args: list[str] | tuple[str, ...] = (), link_pack: bool = True,
                 keep: bool | None = None, env: dict | None = None, base_dir: str | None = None):
        self.root = comfyui_path()
        self.python = comfyui_python()
        self.port = port or free_port()
        self.startup_timeout = startup_timeout
        self.extra_args = list(extra_args)
        self.link_pack = link_pack
        self.keep = bool(os.environ.get("GRASSMANN_KEEP_COMFY")) if keep is None else keep
        self.extra_env = dict(env or {})
        self._base_arg = base_dir
        self.proc: subprocess.Popen | None = None
        self._log_fh = None
        self.client_id = uuid.uuid4().hex
        self.startup_seconds: float | None = None

    # -- layout
    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def checkpoints_dir(self) -> Path:
        return self.base / "models" / "checkpoints"

    @property
    def loras_dir(self) -> Path:
        return self.base / "models" / "loras"

    @property
    def output_dir(self) -> Path:
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        return self.base / "temp"

    @property
    def input_dir(self) -> Path:
        return self.base / "input"

    @property
    def custom_nodes_dir(self) -> Path:
        return self.base / "custom_nodes"

    @property
    def log_path(self) -> Path:
        return self.base / "server.log"

    def _layout(self) -> None:
        if self._base_arg:
            self.base = Path(self._base_arg).resolve()
            self.base.mkdir(parents=True, exist_ok=True)
        else:
            self.base = Path(tempfile.mkdtemp(prefix="comfy_it_"))
        for d in (self.checkpoints_dir, self.loras_dir, self.output_dir, self.input_dir,
                  self.custom_nodes_dir, self.base / "user"):
            d.mkdir(parents=True, exist_ok=True)
        if self.link_pack:
            link = self.custom_nodes_dir / PACK_NAME
            if not link.exists():
                link.symlink_to(REPO_ROOT, target_is_directory=True)

    def _command(self) -> list[str]:
        return [
            str(self.python), "main.py", "--cpu",
            "--listen", "127.0.0.1", "--port", str(self.port),
            "--disable-auto-launch", "--disable-api-nodes",
            "--base-directory", str(self.base),
            "--database-url", f"sqlite:///{self.base / 'user' / 'comfyui.db'}",
            *self.extra_args,
        ]

    # -- lifecycle
    def start(self) -> "ComfyServer":
        ok, why = comfyui_available()
        if not ok:
            raise ComfyStartupError(why)
        self._layout()
        env = dict(os.environ)
        env.update({"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "DO_NOT_TRACK": "1",
                    "PYTHONUNBUFFERED": "1"})
        env.pop("PYTHONPATH", None)  # the project's venv paths must not leak into ComfyUI's
        env.update(self.extra_env)
        self._log_fh = open(self.log_path, "ab")
        t0 = time.monotonic()
        self.proc = subprocess.Popen(self._command(), cwd=str(self.root), env=env,
                                     stdin=subprocess.DEVNULL, stdout=self._log_fh,
                                     stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        deadline = t0 + self.startup_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise ComfyStartupError(
                    f"ComfyUI exited with code {self.proc.returncode} during startup; log tail:\n"
                    + self.log_tail())
            try:
                self._request("GET", "/object_info", timeout=10)
                return
            except (urllib.error.URLError, ConnectionError, TimeoutError, OSError):
                time.sleep(0.5)
        raise ComfyStartupError(f"ComfyUI did not answer /object_info within {self.startup_timeout}s; "
                                f"log tail:\n{self.log_tail()}")

    def stop(self, timeout: float = 20.0) -> None:
        p = self.proc
        if p is not None and p.poll() is None:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                p.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(p.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                p.wait(timeout=timeout)
        if self._log_fh is not None:
            self._log_fh.close()
            self._log_fh = None

    def cleanup(self) -> None:
        if not self.keep and not self._base_arg and getattr(self, "base", None) is not None:
            shutil.rmtree(self.base, ignore_errors=True)

    def __enter__(self) -> "ComfyServer":
        return self.start()

    def __exit__(self, exc_type, exc, tb) -> None:
        self.stop()
        if exc_type is not None:
            # keep the base dir (and its server.log) when the test failed
            self.keep = self.keep or os.environ.get("GRASSMANN_KEEP_COMFY_ON_FAIL", "1") != "0"
        self.cleanup()

    # -- HTTP
    def _request(self, method: str, path: str, body=None, timeout: float = 60.0):
        data = None
        headers = {}
        if body is not None:
            data = json.dumps(body).encode()
            headers["Content-Type"] = "application/json"
        req = urllib.request.Request(self.url + path, data=data, method=method, headers=headers)
        with urllib.request.urlopen(req, timeout=timeout) as r:
            raw = r.read()
        return json.loads(raw) if raw else None

    def object_info(self, node_class: str | None = None) -> dict:
        if node_class is None:
            return self._request("GET", "/object_info")
        return self._request("GET", "/object_info/" + urllib.parse.quote(node_class))

    def pack_nodes(self) -> list[str]:
        """Node ids that ComfyUI registered from the linked pack."""
        mod = f"custom_nodes.{PACK_NAME}"
        return sorted(k for k, v in self.object_info().items()
                      if str(v.get("python_module", "")).startswith(mod))

    def pack_import_status(self) -> str:
        """From ComfyUI's custom-node import report: 'imported', 'failed' (ComfyUI says
        IMPORT FAILED) or 'absent' (not tried).  'imported' only means the module ran;
        a pack that catches its own errors still counts, see :meth:`pack_errors`."""
        target = str(self.custom_nodes_dir / PACK_NAME)
        for line in self.log_text().splitlines():
            if line.rstrip().endswith(target) and "seconds" in line:
                return "failed" if "IMPORT FAILED" in line else "imported"
        return "absent"

    def pack_errors(self) -> list[str]:
        """Tracebacks / ERROR blocks in the server log that mention the linked pack."""
        target = str(self.custom_nodes_dir / PACK_NAME)
        blocks, cur = [], []
        for line in self.log_text().splitlines():
            starts = "[ERROR]" in line or "[WARNING]" in line or "[INFO]" in line
            if starts and cur:
                blocks.append("\n".join(cur))
                cur = []
            cur.append(line)
        if cur:
            blocks.append("\n".join(cur))
        return [b for b in blocks if target in b and ("Traceback" in b or "[ERROR]" in b
                                                     or "Cannot import" in b)]

    def queue_prompt(self, api_graph: dict, extra_data: dict | None = None) -> str:
        body = {"prompt": api_graph, "client_id": self.client_id}
        if extra_data:
            body["extra_data"] = extra_data
        try:
            resp = self._request("POST", "/prompt", body)
        except urllib.error.HTTPError as e:
            raw = e.read()
            try:
                parsed = json.loads(raw)
            except ValueError:
                raise ComfyError(f"POST /prompt failed: HTTP {e.code}: {raw[:2000]!r}") from None
            raise PromptRejected(parsed) from None
        return resp["prompt_id"]

    def history(self, prompt_id: str) -> dict | None:
        h = self._request("GET", "/history/" + urllib.parse.quote(prompt_id))
        return (h or {}).get(prompt_id)

    def wait_for(self, prompt_id: str, timeout: float = 600.0, poll: float = 0.5) -> dict:
        """Wait until the prompt is in the history; raise ComfyExecutionError on an error."""
        deadline = time.monotonic() + timeout
        while True:
            if self.proc is not None and self.proc.poll() is not None:
                raise ComfyError(f"ComfyUI exited with code {self.proc.returncode} while running "
                                 f"{prompt_id}; log tail:\n{self.log_tail()}")
            entry = self.history(prompt_id)
            if entry is not None:
                status = entry.get("status") or {}
                for event, data in status.get("messages") or []:
                    if event == "execution_error":
                        raise ComfyExecutionError(data)
                    if event == "execution_interrupted":
                        raise ComfyError(f"execution interrupted at node {data.get('node_id')}")
                if status.get("status_str") == "error":
                    raise ComfyError(f"prompt {prompt_id} ended with status error: {status}")
                if status.get("completed", True):
                    return entry
            if time.monotonic() > deadline:
                raise TimeoutError(f"prompt {prompt_id} not finished after {timeout}s; "
                                   f"log tail:\n{self.log_tail()}")
            time.sleep(poll)

    def run(self, api_graph: dict, timeout: float = 600.0) -> dict:
        return self.wait_for(self.queue_prompt(api_graph), timeout=timeout)

    def interrupt(self) -> None:
        self._request("POST", "/interrupt", {})

    def free(self, unload_models: bool = True, free_memory: bool = True) -> None:
        self._request("POST", "/free", {"unload_models": unload_models, "free_memory": free_memory})

    # -- files
    def _dir_for(self, kind: str) -> Path:
        return {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}[kind]

    def output_images(self, entry: dict, node_id: str | None = None, load: bool = False) -> list:
        """Paths of the images a history entry reports (all nodes or one), or arrays if load."""
        paths = []
        outputs = entry.get("outputs") or {}
        for nid, out in outputs.items():
            if node_id is not None and str(nid) != str(node_id):
                continue
            for img in out.get("images") or []:
                p = self._dir_for(img.get("type", "output")) / (img.get("subfolder") or "") / img["filename"]
                paths.append(p)
        return [load_image(p) for p in paths] if load else paths

    def node_ui(self, entry: dict, node_id: str) -> dict:
        return (entry.get("outputs") or {}).get(str(node_id), {})

    def add_checkpoint(self, path, name: str | None = None) -> str:
        return self._link(Path(path), self.checkpoints_dir, name)

    def add_lora(self, path, name: str | None = None) -> str:
        return self._link(Path(path), self.loras_dir, name)

    @staticmethod
    def _link(src: Path, folder: Path, name: str | None) -> str:
        name = name or src.name
        dst = folder / name
        dst.parent.mkdir(parents=True, exist_ok=True)
        if dst.exists() or dst.is_symlink():
            dst.unlink()
        dst.symlink_to(src.resolve())
        return name

    # -- log
    def log_text(self) -> str:
        if self._log_fh is not None:
            self._log_fh.flush()
        try:
            return self.log_path.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def log_tail(self, n: int = 60) -> str:
        return "\n".join(self.log_text().splitlines()[-n:])


def load_image(path):
    """A saved image as a float32 HxWxC numpy array in [0, 1] (needs numpy + Pillow)."""
    import numpy as np
    from PIL import Image

    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"), dtype=np.float32) / 255.0


def build_checkpoint(out: str | os.PathLike | None = None, verify: bool = False,
                     timeout: float = 900.0, levels: int | None = None) -> Path:
    """Build (or reuse) the random SD1.5 checkpoint with ComfyUI's python; returns its path.
    ``levels``: the reduced-depth SD1.5 of the UNet's first levels (make_sd15_checkpoint.py)."""
    script = Path(__file__).with_name("make_sd15_checkpoint.py")
    name = "sd15_random.safetensors" if levels is None else f"sd15_random_{levels}levels.safetensors"
    out = Path(out) if out else Path.home() / ".cache" / "grassmann_lora" / name
    if out.exists() and not verify:
        return out
    env = dict(os.environ, COMFYUI_PATH=str(comfyui_path()))
    env.pop("PYTHONPATH", None)
    cmd = [str(comfyui_python()), str(script), str(out)] + (["--verify"] if verify else []) \
        + ([f"--levels={levels}"] if levels is not None else [])
    r = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0 or not out.exists():
        raise ComfyError(f"checkpoint build failed ({r.returncode}):\n{r.stdout}\n{r.stderr}")
    return out


# ----------------------------------------------------------------------------- graphs

def txt2img_graph(ckpt_name: str, lora_name: str | None = None, *, strength_model: float = 1.0,
                  strength_clip: float = 1.0, positive: str = "a photo of a cat",
                  negative: str = "blurry", width: int = 64, height: int = 64, steps: int = 3,
                  cfg: float = 5.0, seed: int = 42, sampler: str = "euler", scheduler: str = "normal",
                  filename_prefix: str = "grassmann_it") -> dict:
    """API-format graph: CheckpointLoaderSimple [-> LoraLoader] -> CLIPTextEncode x2 ->
    EmptyLatentImage -> KSampler -> VAEDecode -> SaveImage.  Node ids are fixed strings:
    "1" checkpoint, "2" LoRA, "3"/"4" prompts, "5" latent, "6" sampler, "7" decode, "8" save."""
    model, clip = ["1", 0], ["1", 1]
    g = {"1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt_name}}}
    if lora_name is not None:
        g["2"] = {"class_type": "LoraLoader", "inputs": {
            "model": model, "clip": clip, "lora_name": lora_name,
            "strength_model": strength_model, "strength_clip": strength_clip}}
        model, clip = ["2", 0], ["2", 1]
    g.update({
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": positive}},
        "4": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": negative}},
        "5": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": 1}},
        "6": {"class_type": "KSampler", "inputs": {
            "model": model, "positive": ["3", 0], "negative": ["4", 0], "latent_image": ["5", 0],
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "denoise": 1.0}},
        "7": {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}},
        "8": {"class_type": "SaveImage", "inputs": {"images": ["7", 0], "filename_prefix": filename_prefix}},
    })
    return g
