"""`bulkhead run --metrics PATH`: one JSON record per line while the VM runs, one at exit, with
the per-device counters `bulkhead stats` shows (the orchestrator contract's metrics file)."""

from __future__ import annotations

import json

import pytest

from vmm_core.testing import TEST_GUEST, run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(120)]


def test_metrics_file_has_a_record_per_interval_and_one_at_exit(tmp_path) -> None:
    path = tmp_path / "metrics.jsonl"
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64", "--rng", "--hold",
                       "--timeout", "2.5", "--metrics", str(path), "--metrics-interval", "0.5",
                       "--cmdline", "gk.tests=virtio-rng", timeout=60)
    assert run.results["virtio-rng"][0], run.explain()
    records = [json.loads(line) for line in path.read_text().splitlines()]
    assert len(records) >= 4, records  # ~4 intervals + the last one
    assert [r["uptime_s"] for r in records] == sorted(r["uptime_s"] for r in records)
    last = records[-1]
    rng = {d["name"]: d for d in last["devices"]}["rng0"]
    assert rng["state"] == "running" and rng["bytes"] >= 64 and rng["mode"] == "sandboxed"


def test_a_metrics_path_that_cannot_be_opened_is_one_line_and_status_2(tmp_path) -> None:
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--metrics", str(tmp_path / "no" / "such" / "dir.jsonl"),
                       "--cmdline", "gk.tests=pio", timeout=60)
    assert run.returncode == 2, run.explain()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "--metrics" in lines[0] and "cannot open" in lines[0], run.stderr
