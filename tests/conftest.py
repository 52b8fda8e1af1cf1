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


@pytest.fixture(scope="module")
def one_thread():
    """Run a module's tests with one torch thread (restored after): torch's SVDs and
    QRs with 2 threads on these 2-core machines were erratic and many times slower
    (math.md). Use with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    from core.device import linalg_threads
    with linalg_threads(1):
        yield
