"""Stable Diffusion WebUI (A1111, Forge) adapter of the pack, loaded by scripts/grassmann_lora_webui.py
under a private package name. Imports WebUI modules (``modules.*``, the Lora extension's
``networks``) only inside functions, so it can be imported and tested without a WebUI."""
