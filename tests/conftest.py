import os
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
REAL_LORAS = Path(os.environ.get("GRASSMANN_REAL_LORAS", ROOT.parent / "shared" / "fixtures" / "real_loras"))


@pytest.fixture(scope="session")
def real_loras_dir() -> Path:
    if not REAL_LORAS.is_dir():
        pytest.skip(f"real LoRA fixtures not found at {REAL_LORAS} (set GRASSMANN_REAL_LORAS)")
    return REAL_LORAS
