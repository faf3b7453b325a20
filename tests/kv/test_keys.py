"""Chained prefix keys: stable across processes, chained, namespaced, partial chunks unkeyed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from rdmapool.errors import UsageError
from rdmapool.kv.keys import KEY_BYTES, Namespace, chunk_keys, content_key

NS = Namespace("llama-tiny", "rev1", "hf", "float32", chunk_tokens=4)


def test_partial_chunk_gets_no_key() -> None:
    assert len(chunk_keys(NS, list(range(11)))) == 2
    assert chunk_keys(NS, [1, 2, 3]) == []


def test_keys_name_the_whole_prefix() -> None:
    a = chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8])
    b = chunk_keys(NS, [9, 2, 3, 4, 5, 6, 7, 8])  # same second chunk, different first
    assert a[1] != b[1] and a[0] != b[0]
    c = chunk_keys(NS, [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12])
    assert c[:2] == a and all(len(k.raw) == KEY_BYTES for k in c)
    assert [k.index for k in c] == [0, 1, 2]


def test_chain_continues_from_a_key() -> None:
    toks = list(range(100, 116))
    whole = chunk_keys(NS, toks)
    assert chunk_keys(NS, toks[8:], start=whole[1]) == whole[2:]


def test_container_does_not_matter() -> None:
    toks = [5, 70000, 3, 2**31 + 7]
    ref = chunk_keys(NS, toks)
    assert chunk_keys(NS, np.array(toks, dtype=np.int64)) == ref
    assert chunk_keys(NS, torch.tensor(toks, dtype=torch.int64)) == ref
    assert chunk_keys(NS, np.array(toks, dtype=np.uint32)) == ref


@pytest.mark.parametrize("field,value", [
    ("model_id", "other"), ("revision", "rev2"), ("layout", "vllm-nhd"), ("dtype", "bfloat16"),
    ("tp_size", 2), ("tenant", "bob"), ("chunk_tokens", 2),
])
def test_every_namespace_field_changes_every_key(field: str, value: object) -> None:
    fields = {f: getattr(NS, f) for f in NS.__slots__}
    fields[field] = value
    other = Namespace(**fields)
    toks = list(range(8))
    assert not set(chunk_keys(NS, toks)) & set(chunk_keys(other, toks))


def test_same_keys_in_another_process() -> None:
    code = ("from rdmapool.kv.keys import Namespace, chunk_keys;"
            "ns = Namespace('llama-tiny', 'rev1', 'hf', 'float32', chunk_tokens=4);"
            "print(','.join(k.hex() for k in chunk_keys(ns, range(12))))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True,
                         env={"PYTHONHASHSEED": "12345", "PATH": ""},
                         cwd=Path(__file__).resolve().parents[2])
    assert out.stdout.strip() == ",".join(k.hex() for k in chunk_keys(NS, range(12)))


def test_pinned_value() -> None:
    # The scheme is a stored-data format: this value may only change with KEY_DOMAIN.
    assert chunk_keys(NS, [0, 1, 2, 3])[0].hex() == "fe83f327b9b79901701c3594cab79756"



@settings(max_examples=50, deadline=None)
@given(st.lists(st.integers(0, 2**32 - 1), max_size=40), st.lists(st.integers(0, 2**32 - 1), max_size=40))
def test_shared_prefix_iff_shared_tokens(a: list[int], b: list[int]) -> None:
    ka, kb = chunk_keys(NS, a), chunk_keys(NS, b)
    for i in range(min(len(ka), len(kb))):
        assert (ka[i] == kb[i]) == (a[: 4 * (i + 1)] == b[: 4 * (i + 1)])


def test_bad_input() -> None:
    with pytest.raises(UsageError, match="token ids"):
        chunk_keys(NS, [-1, 0, 0, 0])
    with pytest.raises(UsageError, match="integers"):
        chunk_keys(NS, [0.5, 1.0, 2.0, 3.0])
    with pytest.raises(UsageError, match="tp_rank"):
        Namespace("m", "r", "hf", "float32", tp_rank=2, tp_size=2)
    with pytest.raises(UsageError, match="model_id"):
        Namespace("", "r", "hf", "float32")


def test_content_key() -> None:
    x = torch.arange(6, dtype=torch.float32)
    assert content_key(NS, x) == content_key(NS, x.clone())
    assert content_key(NS, x) != content_key(NS, x.reshape(2, 3))
    assert content_key(NS, x) != content_key(NS, x.view(torch.int32))
    assert content_key(NS, x) != content_key(Namespace("m", "r", "hf", "float32", tenant="b"), x)
    assert content_key(NS, x.numpy()) == content_key(NS, x.numpy().copy())
