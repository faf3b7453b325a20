"""The `rdmapool sim` contract: one JSON object on the last line; tables and plots for several values."""

from __future__ import annotations

import json
import random

import pytest

from rdmapool.cli import main
from rdmapool.sim import Request, Trace
from rdmapool.sim.trace import dump_trace


@pytest.fixture
def small_trace(tmp_path):
    rng = random.Random(7)
    reqs, convs, t = [], [], 0.0
    for i in range(300):
        t += rng.random()
        if convs and rng.random() < 0.4:
            c = rng.randrange(len(convs))
            keys = convs[c] + [f"{i}-{j}" for j in range(rng.randint(1, 3))]
            convs[c] = keys
        else:
            keys = ["sys"] + [f"{i}-{j}" for j in range(rng.randint(1, 6))]
            convs.append(keys)
        reqs.append(Request(t, tuple(keys), 256 * len(keys) - 100))
    path = tmp_path / "conv.jsonl"
    dump_trace(Trace(tuple(reqs), 256), path)
    return path


def test_json_contract(small_trace, capsys) -> None:
    assert main(["sim", "--trace", str(small_trace), "--policy", "lru", "--capacity", "0.05", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    for field in ("policy", "capacity_blocks", "hit_ratio", "token_hit_ratio", "requests"):
        assert field in out
    assert out["policy"] == "lru" and out["requests"] == 300 and 0 <= out["hit_ratio"] <= 1


def test_table_and_plot(small_trace, tmp_path, capsys) -> None:
    png = tmp_path / "p.png"
    rc = main(["sim", "--trace", str(small_trace), "--policy", "lru,belady", "--policy", "default",
               "--capacity", "0.05", "--capacity", "20%", "--plot", str(png), "--json"])
    assert rc == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert any(line.startswith("belady") for line in lines)
    results = json.loads(lines[-1])["results"]
    assert len(results) == 6
    bound = {r["capacity_blocks"]: r["hit_ratio"] for r in results if r["policy"] == "belady"}
    assert all(r["hit_ratio"] <= bound[r["capacity_blocks"]] + 1e-12 for r in results)
    assert png.stat().st_size > 1000


def test_usage_errors(small_trace, capsys) -> None:
    assert main(["sim", "--trace", str(small_trace), "--policy", "nope"]) == 2
    assert main(["sim", "--trace", str(small_trace), "--capacity", "7"]) == 2
    assert main(["sim", "--trace", "/nonexistent.jsonl"]) == 2
    assert "unknown eviction policy" in capsys.readouterr().err
