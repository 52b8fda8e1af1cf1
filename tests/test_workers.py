"""Modules in parallel (core.workers): results in order and identical to one
worker, cancellation stops the pool, the host's thread setting survives."""
import threading
import time

import pytest
import torch

import core.merge.run as run
from core.device import linalg_threads
from core.errors import LoraError
from core.merge import merge
from core.synthetic import perturbed_lora, random_lora
from core.workers import MAX_WORKERS, ordered_map, worker_count


def test_worker_count():
    assert worker_count(None, torch.device("cuda")) == 1 and worker_count(4, torch.device("cuda")) == 1
    assert worker_count(3, torch.device("cpu")) == 3 and worker_count(0, torch.device("cpu")) == 1
    assert worker_count(3, torch.device("cpu"), threads=None) == 1 and worker_count(3, torch.device("cpu"), 2) == 1
    assert 1 <= worker_count(None, torch.device("cpu")) <= MAX_WORKERS


def test_worker_count_from_the_environment(monkeypatch):
    monkeypatch.setenv("GRASSMANN_LORA_WORKERS", "3")
    assert worker_count(None, torch.device("cpu")) == 3 and worker_count(1, torch.device("cpu")) == 1
    assert worker_count(None, torch.device("cuda")) == 1
    for bad in ("0", "two", "-1"):
        monkeypatch.setenv("GRASSMANN_LORA_WORKERS", bad)
        with pytest.raises(LoraError, match=f"GRASSMANN_LORA_WORKERS .*'{bad}'"):
            worker_count(None, torch.device("cpu"))


def test_ordered_map_keeps_order_raises_in_place_and_pins_each_worker():
    seen = []

    def slow_first(i):
        time.sleep(0.02 * (5 - i))           # later items finish first
        seen.append(torch.get_num_threads())
        return i * i

    with linalg_threads(2):                  # a host with 2 threads, the caller pins 1 for the pool
        with linalg_threads(1), ordered_map(slow_first, range(6), 3) as results:
            assert list(results) == [i * i for i in range(6)]
        assert torch.get_num_threads() == 2
    assert seen == [1] * 6

    def fails_at_3(i):
        if i == 3:
            raise ValueError("item 3")
        return i

    got = []
    with pytest.raises(ValueError, match="item 3"), ordered_map(fails_at_3, range(6), 2) as results:
        for r in results:
            got.append(r)
    assert got == [0, 1, 2]


def test_leaving_the_block_drops_items_not_started():
    started = []
    lock = threading.Lock()

    def work(i):
        with lock:
            started.append(i)
        time.sleep(0.01)
        return i

    class Stop(Exception):
        pass

    with pytest.raises(Stop), ordered_map(work, range(200), 2) as results:
        for r in results:
            if r == 3:
                raise Stop
    count = len(started)
    time.sleep(0.05)
    assert len(started) == count < 20      # nothing runs on after the block; most items never started


def _sources():
    a = random_lora("sd1", 4, 0, limit=10)
    b = perturbed_lora(random_lora("sd1", 4, 0, limit=8), 0.3, 1)       # 2 modules only in a: copied
    c = perturbed_lora(random_lora("sd1", 6, 2, limit=10), 0.3, 3)
    dead = next(iter(c.modules.values()))
    dead.up.zero_()                                                       # one source dead there
    return [a, b, c]


@pytest.mark.parametrize("method", ["svd", "ties", "dare", "karcher", "chordal", "flag-median", "linear", "tsv",
                                    "knots-dare"])
def test_two_workers_give_one_workers_result_bit_for_bit(method):
    srcs = _sources()
    rank = None if method == "linear" else 4
    one, two = (merge(srcs, [0.5, 0.3, 0.2], method=method, rank=rank, workers=n) for n in (1, 2))
    assert list(one.lora.modules) == list(two.lora.modules) and len(one.lora.modules) == 10
    for name, m in one.lora.modules.items():
        other = two.lora.modules[name]
        assert torch.equal(m.up, other.up) and torch.equal(m.down, other.down) and m.alpha == other.alpha
    assert one.report.to_dict() == two.report.to_dict()


def test_progress_in_order_and_cancel_stops_the_workers(monkeypatch):
    srcs = _sources()
    prepared = []
    real = run.prepare

    def counting(*args, **kwargs):
        prepared.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(run, "prepare", counting)
    calls = []
    merge(srcs, method="svd", rank=4, workers=2, progress=lambda d, t: calls.append((d, t)))
    assert calls == [(i, 10) for i in range(1, 11)]

    class Stop(Exception):
        pass

    def cancel(done, total):
        if done == 2:
            prepared.clear()
            raise Stop
    with linalg_threads(2):                  # the host's setting is restored after a cancelled run
        with pytest.raises(Stop):
            merge(srcs, method="svd", rank=4, workers=2, progress=cancel)
        assert torch.get_num_threads() == 2
    # the pool had queued every module; only those already running finish after the cancel
    assert len(prepared) <= 2


def test_kernel_statistics_with_two_workers_equal_one():
    from core.kernel_matrix import pair_statistics
    srcs = _sources()
    one, two = (pair_statistics(srcs, side="out", workers=n) for n in (1, 2))
    assert [t.module for t in one.terms] == [t.module for t in two.terms] and len(one.terms) == 10
    for a, b in zip(one.terms, two.terms):
        assert (a.members == b.members).all() and (a.s == b.s).all()
    assert (one.live == two.live).all() and (one.dead == two.dead).all() and (one.shared == two.shared).all()


def _in_new_thread(fn):
    out = []
    t = threading.Thread(target=lambda: out.append(fn()))
    t.start()
    t.join()
    return out[0]


def test_threads_the_host_starts_during_a_pinned_run_keep_its_count():
    """torch.set_num_threads also sets the count every thread takes at its first torch call:
    a thread the host starts while a merge runs pinned (A1111 serves a request on a new worker
    thread) must get the host's count, and keep it after the merge, not the merge's 1."""
    host = torch.get_num_threads()
    go, seen = threading.Event(), []

    def host_thread():
        seen.append(torch.get_num_threads())
        go.wait()
        seen.append(torch.get_num_threads())

    def item(i):
        time.sleep(0.05)
        return torch.get_num_threads()

    try:
        torch.set_num_threads(2)                     # the host's setting
        with linalg_threads(1):
            born = threading.Thread(target=host_thread)
            born.start()
            inside = torch.get_num_threads()
            with ordered_map(item, range(4), 2) as results:
                workers = [next(results)]
                during_pool = _in_new_thread(torch.get_num_threads)
                workers += list(results)
        go.set()
        born.join()
        assert inside == 1 and workers == [1] * 4
        assert seen == [2, 2] and during_pool == 2
        assert torch.get_num_threads() == 2 and _in_new_thread(torch.get_num_threads) == 2
    finally:
        go.set()
        torch.set_num_threads(host)
