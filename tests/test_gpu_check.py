"""`make gpu-check DEVICE=cpu`: the GPU check's dry run (bench/gpu_check.py --device cpu --tiny) runs every
part at tiny sizes, writes its JSON and markdown table, says "skipped" for what needs CUDA or vLLM, and exits
non-zero when a correctness check fails."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO

pytestmark = pytest.mark.slow

ROW_KEYS = {"part", "name", "value", "unit", "bound", "status", "gating", "note"}
STATUSES = {"pass", "fail", "measured", "skipped", "error", "timeout"}


def cell(text: str) -> str:
    """`text` as a markdown table cell holds it (a literal | escaped)."""
    return text.replace("|", "\\|")


def dry_run(out: Path, *extra: str) -> tuple[subprocess.CompletedProcess, dict, str]:
    """The dry run into `out` (models cached beside it): the process, gpu-check.json and gpu-check.md."""
    cmd = [sys.executable, "bench/gpu_check.py", "--device", "cpu", "--tiny", "--no-install"]
    cmd += ["--out", str(out), "--cache", str(out.parent / "cache"), *extra]
    result = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=300)
    report = json.loads((out / "gpu-check.json").read_text()) if (out / "gpu-check.json").is_file() else {}
    table = (out / "gpu-check.md").read_text() if (out / "gpu-check.md").is_file() else ""
    return result, report, table


def test_the_dry_run_covers_every_part_and_passes(tmp_path):
    result, report, table = dry_run(tmp_path / "out")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["passed"] is True and report["failed"] == 0 and report["device"] == "cpu"
    assert {"device", "torch", "cuda", "python"} <= report["environment"].keys()
    rows = report["rows"]
    assert all(row.keys() == ROW_KEYS and row["status"] in STATUSES for row in rows), rows
    by_part = {
        part: [r for r in rows if r["part"] == part] for part in ("cuda-tests", "memory", "vllm", "speed")
    }
    assert all(by_part.values()), {part: len(r) for part, r in by_part.items()}
    # What needs CUDA says so; so does vLLM's part.
    assert all(
        r["status"] == "skipped" and r["note"] == "no CUDA" for r in by_part["cuda-tests"] + by_part["vllm"]
    )
    # The CPU stand-ins ran: the plan against the peak RSS of each tiny run, and train-ppo's s/step.
    memory = by_part["memory"]
    assert {"train-sft", "train-rm", "train-ppo"} <= {r["name"].split()[1] for r in memory}
    assert all(r["status"] in ("pass", "fail") and r["value"] > 0 and not r["gating"] for r in memory), memory
    speed = {r["name"]: r for r in by_part["speed"]}
    assert speed["train-ppo s/step, ppo-cli (defaults)"]["value"] > 0
    assert any("grpo" in name and row["value"] for name, row in speed.items())
    # The table: a header naming the device and the result, and one line per row.
    assert "| part | check | value | bound | result | note |" in table and "Result: **PASS**" in table
    assert all(f"| {r['part']} | {cell(r['name'])} |" in table for r in rows)
    assert "skipped: no CUDA" in table and "not failures" in table


def test_a_failing_correctness_check_fails_the_run(tmp_path):
    result, report, table = dry_run(tmp_path / "out", "--parts", "cuda-tests", "--inject-failure")
    assert result.returncode == 1, result.stdout[-3000:] + result.stderr[-3000:]
    assert report["passed"] is False and report["failed"] == 1
    injected = [r for r in report["rows"] if r["part"] == "injected"]
    assert len(injected) == 1 and injected[0]["status"] == "fail" and injected[0]["gating"]
    assert "Result: **FAIL**" in table and "| FAIL |" in table
