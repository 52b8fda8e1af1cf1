"""compare()'s progress callback: one call per shared module, in order, and an
exception raised inside it stops the comparison (how ComfyUI cancels)."""
import threading

import pytest
import torch

from core.similarity import compare
from core.synthetic import perturbed_lora, random_lora

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("workers", [1, 2])
def test_progress_counts_shared_modules_and_raising_in_it_aborts(workers):
    a = random_lora("sd1", 4, 0, limit=12)
    b = perturbed_lora(random_lora("sd1", 4, 0, limit=9), 0.3, 1)     # 9 shared modules
    calls = []
    report = compare(a, b, side="both", workers=workers, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 9) for i in range(1, 10)] and len(report.results) == 18

    class Stop(Exception):
        pass

    started = []
    real = torch.linalg.svd

    def counting_svd(*args, **kwargs):            # counts module work started after the cancel
        started.append(threading.get_ident())
        return real(*args, **kwargs)

    def cancel(done, total):
        if done == 2:
            started.clear()
            raise Stop
    torch.linalg.svd = counting_svd
    try:
        with pytest.raises(Stop):
            compare(a, b, side="both", workers=workers, progress=cancel)
    finally:
        torch.linalg.svd = real
    # at most the modules already running in the pool finish (2 SVDs each); the rest never start
    assert len(started) <= 2 * workers
    assert torch.get_num_threads() == 1
