"""A real device process under a real virtio workload, for `learn` and the jail's device tests.

`device_harness(device)` starts the device the way the core does (`ProcessHarness`: fresh
interpreter through `spawn_device`, fds by SCM_RIGHTS, ZeroMQ handshake); `run_workload(h)`
plays the guest with the host-side `VirtioDriver` through every request type the device serves,
so the syscalls seen are those of production, not of a stand-in.
"""

from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

DEVICES = ("blk", "rng", "console")
IMAGE_BYTES = 1 << 20


@contextmanager
def device_harness(device: str, **spawn_kwargs: Any) -> Iterator[Any]:
    """A `ProcessHarness` for `device` with a scratch image / console file, removed afterwards."""
    from vmm_core.testing.process import ProcessHarness  # the core's side: import on demand

    if device not in DEVICES:
        raise ValueError(f"device {device!r}: choose one of {', '.join(DEVICES)}")
    with tempfile.TemporaryDirectory(prefix="bulkhead-workload-") as scratch:
        spec: dict[str, Any] = {"type": device}
        if device == "blk":
            spec["path"] = os.path.join(scratch, "disk.img")
            with open(spec["path"], "wb") as f:
                f.truncate(IMAGE_BYTES)
        elif device == "console":
            spec["path"] = os.path.join(scratch, "console.txt")
        harness = ProcessHarness(spec, **spawn_kwargs)
        try:
            yield harness
        finally:
            harness.close()


def run_workload(harness: Any, rounds: int = 2) -> dict[str, bool]:
    """Drive every request type of the harness's device; {check: passed}."""
    d = harness.driver
    kind = harness.spec["type"]
    d.init()
    out: dict[str, bool] = {}
    for r in range(rounds):
        if kind == "blk":
            data = bytes((i * 7 + r) & 0xFF for i in range(4096))
            out["write"] = d.blk_write(8, data) == 0
            out["read"] = d.blk_read(8, 4096).data == data
            out["flush"] = d.blk_flush() == 0
            out["get_id"] = d.blk_get_id().status == 0
            out["discard"] = d.blk_discard([(64, 8, 0)]) in (0, 2)  # 2 = UNSUPP where it is off
            out["write_zeroes"] = d.blk_discard([(72, 8, 0)], write_zeroes=True) in (0, 2)
            out["read_after"] = d.blk_read(0, 512).status == 0
        elif kind == "rng":
            out["read"] = len(d.rng_read(64)) == 64
        elif kind == "console":
            d.console_write(b"jail workload line\n")
            out["write"] = True
        out["interrupt"] = harness.wait_interrupt(2.0)
        out["alive"] = harness.alive
    return out
