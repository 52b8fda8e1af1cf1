"""Installs the pack's own requirements (run by ComfyUI-Manager). Never torch."""
import os
import subprocess
import sys

here = os.path.dirname(os.path.abspath(__file__))
subprocess.check_call([sys.executable, "-m", "pip", "install", "-r", os.path.join(here, "requirements.txt")])
