"""`rdmapool stats` argument checks: a bad --interval is a one-line usage error (exit 2), not a traceback."""

from __future__ import annotations

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
