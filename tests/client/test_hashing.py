"""Checksums on worker threads: the native pool (`rdmapool._hashpool`) gives exactly xxhash's digests, in any
order of waiting, with the caller hashing what no worker started; a dropped batch lets go of its buffers only
after the workers are done with them; timeouts are TimeoutError; a forked child starts its own pool. The Python
fallback (futures) gives the same results through the same `Hasher` calls."""

from __future__ import annotations

import os
import random
import time

import pytest
import xxhash

from rdmapool.client import hashing
from rdmapool.client.hashing import THREAD_MIN, Hasher

hashpool = pytest.importorskip("rdmapool._hashpool", reason="the native hash pool is not built (setup.py build_ext)")


def payloads(n: int, size: int = THREAD_MIN) -> list[bytes]:
    rng = random.Random(n)
    return [rng.randbytes(size + rng.randrange(4096)) for _ in range(n)]


def test_batch_digests_equal_xxhash_in_any_waiting_order() -> None:
    hashpool.start(2)
    bufs = payloads(40)
    want = [xxhash.xxh3_128_digest(b) for b in bufs]
    b = hashpool.Batch(bufs)
    order = list(range(len(bufs)))
    random.Random(1).shuffle(order)  # waiting out of order: the caller hashes blocks no worker reached yet
    got = {i: b.wait(i, 10.0) for i in order}
    assert [got[i] for i in range(len(bufs))] == want
    assert all(b.done(i) for i in range(len(bufs))) and len(b) == len(bufs)
    with pytest.raises(IndexError):
        b.done(len(bufs))
    with pytest.raises(TypeError):
        hashpool.Batch([object()])  # not a buffer


def test_memoryviews_of_one_region_and_empty_payloads() -> None:
    hashpool.start(2)
    region = bytearray(os.urandom(8 * THREAD_MIN))
    view = memoryview(region)
    parts = [view[i * THREAD_MIN : (i + 1) * THREAD_MIN] for i in range(8)] + [view[:0]]
    b = hashpool.Batch(parts)
    assert [b.wait(i, 10.0) for i in range(len(parts))] == [xxhash.xxh3_128_digest(p) for p in parts]
    del b
    for p in [*parts, view]:
        p.release()
    region.extend(b"x")  # the batch's buffer exports are gone with it: the region may resize again


def test_dropping_a_batch_early_waits_for_the_workers_then_releases_the_buffers() -> None:
    hashpool.start(2)
    for _ in range(50):
        region = bytearray(16 * THREAD_MIN)
        view = memoryview(region)
        b = hashpool.Batch([view[i * THREAD_MIN : (i + 1) * THREAD_MIN] for i in range(16)])
        del b
        view.release()
        region.extend(b"x")  # BufferError if a worker's export were still held


def test_a_timeout_is_timeout_error() -> None:
    hashpool.start(1)
    big = bytes(256 << 20)  # ~20 ms to hash: a worker that claimed it is not done within a microsecond
    timed_out = 0
    for _ in range(20):  # waiting on a block no worker claimed yet hashes it here instead (no timeout)
        b = hashpool.Batch([big])
        time.sleep(0.002)
        try:
            b.wait(0, 1e-6)
        except TimeoutError:
            timed_out += 1
            assert b.wait(0, 30.0) == xxhash.xxh3_128_digest(big)
            break
    assert timed_out


@pytest.mark.parametrize("native", [True, False], ids=["native", "futures"])
def test_hasher_gives_the_same_checksums_either_way(native: bool) -> None:
    h = Hasher(2, native=native)
    try:
        bufs = payloads(12) + [b"small"]
        pending = [h.submit(b) for b in bufs]
        assert isinstance(pending[-1], bytes)  # small: hashed inline
        assert h.submit_large(b"small") is None
        assert [h.result(p, 10.0) for p in pending] == [xxhash.xxh3_128_digest(b) for b in bufs]
        assert all(isinstance(p, bytes) or p.done() for p in pending)
    finally:
        h.close()


@pytest.mark.parametrize("native", [True, False], ids=["native", "futures"])
def test_small_payloads_go_to_the_native_workers_together(native: bool) -> None:
    """`submit_many` hands small payloads to the native pool in one batch; without it they are hashed at once."""
    h = Hasher(2, native=native)
    try:
        bufs = [os.urandom(1000 + i) for i in range(20)] + [b""]
        pending = h.submit_many(bufs)
        assert all(isinstance(p, bytes) for p in pending) is not native
        assert [h.result(p, 10.0) for p in pending] == [xxhash.xxh3_128_digest(b) for b in bufs]
        assert all(isinstance(p, bytes) or p.done() for p in pending)
        assert h.submit_many([]) == []
        assert Hasher(0).submit_many(bufs[:2]) == [xxhash.xxh3_128_digest(b) for b in bufs[:2]]
    finally:
        h.close()


def test_a_forked_child_hashes_with_its_own_pool() -> None:
    hashpool.start(2)
    h = Hasher(2)
    data = payloads(6)
    assert [h.result(h.submit(d), 10.0) for d in data] == [xxhash.xxh3_128_digest(d) for d in data]
    pid = os.fork()
    if pid == 0:  # child: the parent's workers did not come along; the parent's Hasher starts new ones
        try:
            ok = [h.result(h.submit(d), 10.0) for d in data] == [xxhash.xxh3_128_digest(d) for d in data]
            os._exit(0 if ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    assert hashing._hashpool is hashpool


def test_a_waiter_hashes_unclaimed_blocks_while_a_worker_has_the_one_it_waits_for() -> None:
    """With one worker busy on a large block 0, `wait(0)` hashes the small blocks behind it instead of sleeping:
    they are all done when it returns (without that, the worker would only then start on them). In a forked
    child, whose pool has exactly one worker."""
    pid = os.fork()
    if pid == 0:
        try:
            hashpool.start(1)
            bufs = [bytes(256 << 20)] + payloads(40, 64 << 10)
            b = hashpool.Batch(bufs)
            time.sleep(0.01)  # the worker claims block 0 (~20-50 ms of hashing) before this thread waits
            b.wait(0, 30.0)
            done = all(b.done(i) for i in range(len(bufs)))
            ok = [b.wait(i, 10.0) for i in range(len(bufs))] == [xxhash.xxh3_128_digest(x) for x in bufs]
            os._exit(0 if done and ok else 1)
        except BaseException:
            os._exit(2)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0


@pytest.mark.parametrize(("cpus", "workers"), [(1, 2), (2, 2), (7, 2), (8, 4), (16, 4)])
def test_client_hash_workers_default_to_four_only_on_eight_or_more_cpus(monkeypatch, cpus: int,
                                                                          workers: int) -> None:
    from rdmapool.config import ClientConfig

    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(cpus)))
    assert ClientConfig(token="t").hash_threads == workers
    assert ClientConfig(token="t", hash_threads=1).hash_threads == 1  # an explicit count is kept
