"""Stable Diffusion WebUI entry (A1111 1.10, Forge): the "Grassmann LoRA" tab and HTTP routes.

The WebUI executes every ``.py`` in ``scripts/`` by file path, as a lone module
whose name is the file name: no package, no relative imports, and one
``sys.modules`` shared by every extension (a top-level ``core`` would collide
with any other extension's ``core``). So this file makes the repository root a
package under a private name and imports the pack from there
(``_grassmann_lora_webui_pack.core``, ``….sdwebui``). It never imports the ComfyUI side
(``nodes/``, the root ``__init__.py``).
"""
import importlib
import importlib.machinery
import importlib.util
import logging
import os
import sys

PACKAGE = "_grassmann_lora_webui_pack"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_pack(name: str = PACKAGE, root: str = ROOT):
    """The repository root as a package ``name`` whose ``__init__`` is never run
    (it is the ComfyUI entry); its sub-packages import with relative imports."""
    pack = sys.modules.get(name)
    if pack is None or list(getattr(pack, "__path__", [])) != [root]:
        spec = importlib.machinery.ModuleSpec(name, None, is_package=True)
        spec.submodule_search_locations = [root]
        pack = importlib.util.module_from_spec(spec)
        sys.modules[name] = pack
    return pack


def load_core(name: str = PACKAGE):
    """``core`` under the private name ``<name>.core``, loaded from its file."""
    load_pack(name)
    full = f"{name}.core"
    if full not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            full, os.path.join(ROOT, "core", "__init__.py"),
            submodule_search_locations=[os.path.join(ROOT, "core")])
        module = importlib.util.module_from_spec(spec)
        sys.modules[full] = module
        try:
            spec.loader.exec_module(module)
        except BaseException:
            sys.modules.pop(full, None)
            raise
    return sys.modules[full]


def register():
    """Hook the tab, the settings and the routes into the WebUI's callbacks."""
    from modules import script_callbacks

    load_core()
    ext = importlib.import_module(f"{PACKAGE}.sdwebui.extension")
    ext.register(script_callbacks)


if __name__ != "__main__":
    try:
        register()
    except ImportError as exc:   # a dependency missing in the host's venv
        logging.getLogger("grassmann_lora").error(
            "Grassmann LoRA: disabled, a dependency is missing (%s); run the extension's install.py "
            "or pip install -r requirements.txt in the WebUI's venv", exc)
    except Exception:   # noqa: BLE001 - a broken extension must not break the WebUI
        logging.getLogger("grassmann_lora").exception("Grassmann LoRA: failed to register; extension disabled")
