"""Models: local weights (`--model PATH`) load without any download and are fingerprinted by their bytes; random
models are reproducible from their seed; the demo command exits non-zero when outputs differ."""

from __future__ import annotations

import argparse

import pytest
import torch

from rdmapool.errors import UsageError
from rdmapool.kv.hf import HFEngine
from rdmapool.kv.models import ModelSpec, chunk_bytes, fingerprint, kv_geometry, load_model


def test_local_weights_load_and_fingerprint(tmp_path) -> None:
    src = load_model(ModelSpec("qwen2", "micro", seed=9))
    src.save_pretrained(tmp_path / "m")
    spec = ModelSpec(path=str(tmp_path / "m"))
    loaded = load_model(spec)
    prompt = list(range(1, 30))
    a = HFEngine(src, "x", "y", None, chunk_tokens=16).run_batch([prompt], 5).outputs
    b = HFEngine(loaded, "x", "y", None, chunk_tokens=16).run_batch([prompt], 5).outputs
    assert a == b
    mid, rev = fingerprint(spec, "cpu", torch.float32)
    assert mid == "m" and len(rev) == 32
    with torch.no_grad():
        next(src.parameters()).add_(1.0)
    src.save_pretrained(tmp_path / "m")
    assert fingerprint(spec, "cpu", torch.float32)[1] != rev  # other weights, other namespace
    assert kv_geometry(spec) == kv_geometry(ModelSpec("qwen2", "micro"))


def test_missing_local_model_is_a_usage_error(tmp_path) -> None:
    with pytest.raises(UsageError, match="config.json"):
        load_model(ModelSpec(path=str(tmp_path)))


def test_random_models_reproducible_and_sized() -> None:
    a = load_model(ModelSpec("gpt2", "micro", seed=4))
    b = load_model(ModelSpec("gpt2", "micro", seed=4))
    assert all(torch.equal(x, y) for x, y in zip(a.parameters(), b.parameters(), strict=True))
    assert fingerprint(ModelSpec("gpt2", "micro", seed=4), "cpu", torch.float32) != fingerprint(
        ModelSpec("gpt2", "micro", seed=5), "cpu", torch.float32)
    eng = HFEngine(a, "x", "y", None, chunk_tokens=16)
    assert chunk_bytes(ModelSpec("gpt2", "micro"), torch.float32, 16) == eng.chunk_bytes


def test_demo_exits_nonzero_when_outputs_differ(monkeypatch, capsys) -> None:
    from rdmapool.commands import demo as command
    from rdmapool.kv import demo

    def fake_run(cfg, progress=True):
        report = demo.DemoReport(cfg)
        report.rows.append(demo.TurnRow(1, 2, 100, 64, 10.0, 5.0, 3.0, 0, 1 << 20, 0.01, 0, identical=False))
        return report

    monkeypatch.setattr(demo, "run_demo", fake_run)
    parser = argparse.ArgumentParser()
    sub = parser.add_subparsers()
    command.register(sub)
    args = parser.parse_args(["demo", "--json", "--no-etcd"])
    assert command.run(args) == 1
    assert '"outputs_identical": false' in capsys.readouterr().out.splitlines()[-1]
