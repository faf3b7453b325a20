"""LazyHeap: the order it gives matches a plain model, and its compaction is spread over pushes."""

from __future__ import annotations

import random

from rdmapool.policy._structs import COMPACT_STEP, LazyHeap


def test_lazy_heap_matches_a_model_through_compactions() -> None:
    rng = random.Random(7)
    heap, model = LazyHeap(), {}
    compactions = 0
    for step in range(20000):
        key = rng.randrange(300)
        r = rng.random()
        if r < 0.8:
            prio = (rng.random(), step)  # distinct priorities: the minimum is one key
            heap.push(key, prio)
            model[key] = prio
        elif r < 0.9:
            heap.discard(key)
            model.pop(key, None)
        else:
            want = min(model.items(), key=lambda kv: kv[1]) if model else None
            got = heap.peek()
            assert got == (want if want is None else (want[0], want[1]))
        compactions += heap._old is not None
        assert len(heap) == len(model) and (key in heap) == (key in model)
    assert compactions > 0  # the test went through compactions in progress


def test_a_push_moves_at_most_a_step_of_the_old_entries() -> None:
    heap, model = LazyHeap(), {}
    steps = 0
    for t in range(10):
        for k in range(1000):
            at = heap._old_at if heap._old is not None else None
            heap.push(k, float(t * 1000 + k))
            model[k] = float(t * 1000 + k)
            if at is not None and heap._old is not None:
                assert heap._old_at - at <= COMPACT_STEP
                steps += 1
    assert steps > 100  # compactions were spread over many pushes
    assert heap.peek() == min(model.items(), key=lambda kv: kv[1])
    assert len(heap._heap) <= 2 * len(heap) + 64
