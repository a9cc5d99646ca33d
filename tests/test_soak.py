"""tools/soak.py's step verdicts (the 30-minute run itself is not a test: see docs/reliability.md)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _soak():
    spec = importlib.util.spec_from_file_location("soak_tool", ROOT / "tools" / "soak.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules["soak_tool"] = mod
    spec.loader.exec_module(mod)
    return mod


def _row(step: int, wall: float, seconds: float, deadline: float = 0.05) -> dict:
    return {"step": step, "wall": wall, "seconds": seconds, "deadline": deadline, "gather_seconds": deadline,
            "control_seconds": 0.001, "params_seconds": 0.001, "lost_chunks": 0, "chunks": 10, "lost_gradients": 0}


def test_late_warmup_steps_are_reported_but_a_late_steady_step_fails() -> None:
    soak = _soak()
    rows = [_row(0, 0.0, 2.5), _row(1, 1.0, 0.8), *(_row(i, 10.0 + i, 0.06) for i in range(2, 50))]
    st = soak.check_steps(rows, slack=0.5, skip=1, f=1, ready_cap=2.0, warmup_s=5.0)
    assert st["ok"] and st["bounded_ok"] and st["steady_ok"]
    assert [r["step"] for r in st["warmup_over_deadline_plus_slack"]] == [1]
    assert st["not_checked"][0]["step"] == 0
    rows[30]["seconds"] = 0.7  # after the warm-up: someone was waited for
    st = soak.check_steps(rows, slack=0.5, skip=1, f=1, ready_cap=2.0, warmup_s=5.0)
    assert not st["ok"] and st["bounded_ok"] and not st["steady_ok"] and st["over_deadline_plus_slack"] == 1
    assert "after the warm-up" in soak.step_problems(st)[0]
    rows[1]["seconds"] = 2.7  # beyond what the server allows any step: ready-wait cap + deadline + slack
    st = soak.check_steps(rows, slack=0.5, skip=1, f=1, ready_cap=2.0, warmup_s=5.0)
    assert not st["bounded_ok"] and st["over_bound"] == 1
