"""`rdmapool stats`: a bad --interval is a one-line usage error (exit 2), not a traceback; the table shows the settings."""

from __future__ import annotations

import json

import pytest

from rdmapool import cli
from rdmapool.commands import stats as stats_cmd

SNAPSHOT = {"server": {"server_id": "srv"}, "tenants": {}, "counters": {"commits": 1}}


@pytest.mark.parametrize("interval", ["0", "-1", "nan", "inf", "-inf"])
def test_bad_interval_is_a_usage_error(interval: str, monkeypatch, capsys) -> None:
    monkeypatch.setattr(stats_cmd, "fetch", lambda address, token: SNAPSHOT)
    calls, real_sleep = [], stats_cmd.time.sleep

    def sleep(seconds: float) -> None:  # the real one (it raises on bad lengths), ending the loop after a few rounds
        calls.append(seconds)
        if len(calls) > 3:
            raise KeyboardInterrupt
        real_sleep(min(seconds, 0.01))

    monkeypatch.setattr(stats_cmd.time, "sleep", sleep)
    rc = cli.main(["stats", "127.0.0.1:1", "--token", "t", f"--interval={interval}"])
    err = capsys.readouterr().err
    assert rc == 2 and err.count("\n") == 1 and "--interval" in err and "Traceback" not in err


def test_good_interval_runs(monkeypatch, capsys) -> None:
    monkeypatch.setattr(stats_cmd, "fetch", lambda address, token: SNAPSHOT)
    assert cli.main(["stats", "127.0.0.1:1", "--token", "t", "--interval", "0.5", "--once"]) == 0
    assert "commits" in capsys.readouterr().out


def test_policy_options_are_shown(monkeypatch, capsys) -> None:
    snap = {**SNAPSHOT, "config": {"lease_s": 2.5, "grace_s": 0, "reservation_s": 10.0, "ttl_s": 3600.0,
                                   "idle_ttl_s": None, "policy": "ttl", "policy_options": {"ttl": 600},
                                   "size_classes": [65536, 1 << 20], "max_keys": 4096, "idle_timeout_s": 300.0}}
    monkeypatch.setattr(stats_cmd, "fetch", lambda address, token: snap)
    assert cli.main(["stats", "127.0.0.1:1", "--token", "t", "--once"]) == 0
    out = capsys.readouterr().out
    assert "lease 2.5s" in out and "ttl 3600s" in out and "policy ttl ttl=600" in out and "classes 64KiB,1MiB" in out
    assert cli.main(["stats", "127.0.0.1:1", "--token", "t", "--once", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == snap["config"]
