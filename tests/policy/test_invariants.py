"""Every online policy keeps its bookkeeping consistent under arbitrary insert/access/remove/evict sequences:
len and contains match the resident set, the victim is always resident, remove forgets a key."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmapool.errors import UsageError
from rdmapool.policy import DEFAULT, BlockInfo, create, names

ONLINE = [n for n in names() if n != "belady"]

ops = st.lists(st.tuples(st.sampled_from(["get", "get", "get", "remove", "evict"]), st.integers(0, 40),
                         st.integers(1, 512)), min_size=1, max_size=300)


def drive(policy, operations, capacity: int = 12) -> None:
    resident: set[int] = set()
    now = 0.0
    for op, key, tokens in operations:
        now += 1.0
        if op == "get":
            if key in resident:
                policy.on_access(key, now)
            else:
                parent = key - 1 if key % 5 else None
                info = BlockInfo(key, parent=parent, depth=key % 5, tokens=tokens)
                if len(resident) >= capacity:
                    if not policy.admit(info, now):
                        continue
                    v = policy.victim(now)
                    assert v in resident, f"{policy.name}: victim {v!r} not resident"
                    resident.discard(v)
                    policy.on_remove(v)
                resident.add(key)
                policy.on_insert(info, now)
        elif op == "remove" and key in resident:
            resident.discard(key)
            policy.on_remove(key)
            assert key not in policy
        elif op == "evict" and resident:
            v = policy.victim(now)
            assert v in resident
            policy.on_access(v, now)  # a leased victim is moved out of the way; asking again must still work
            v2 = policy.victim(now)
            assert v2 in resident
            resident.discard(v2)
            policy.on_remove(v2)
        assert len(policy) == len(resident), policy.name
        for k in resident:
            assert k in policy
    if not resident:
        assert policy.victim(now) is None


@pytest.mark.parametrize("name", ONLINE)
@settings(max_examples=60, deadline=None)
@given(operations=ops)
def test_invariants(name: str, operations) -> None:
    drive(create(name), operations)


@pytest.mark.parametrize("name", ONLINE)
def test_remove_unknown_key_is_harmless(name: str) -> None:
    p = create(name)
    p.on_remove("never-seen")
    assert len(p) == 0
    assert p.victim(0.0) is None


def test_unknown_policy_and_bad_options() -> None:
    with pytest.raises(UsageError, match="unknown eviction policy"):
        create("nope")
    with pytest.raises(UsageError, match="bad options"):
        create("lru", bogus=1)
    with pytest.raises(UsageError, match="needs the future"):
        create("belady")
    with pytest.raises(UsageError):
        create("ttl", ttl=0)


def test_default_is_online() -> None:
    assert DEFAULT != "belady"
    assert create("default").name == DEFAULT
