"""Registration with the WebUI: the tab, its settings, the txt2img fields Compare copies, the routes."""
from __future__ import annotations

from . import routes, tab


def on_app_started(demo, app) -> None:
    routes.register(app)


def register(script_callbacks) -> None:
    """Called once per (re)load of scripts/grassmann_lora_webui.py."""
    script_callbacks.on_after_component(tab.capture_component)
    script_callbacks.on_ui_tabs(tab.on_ui_tabs)
    script_callbacks.on_ui_settings(tab.on_ui_settings)
    script_callbacks.on_app_started(on_app_started)
