"""A named test-guest VM held in the background, driven through the real CLI and control
endpoint: its block write/verify workload (then rng and console checks) while faults are
injected (`bulkhead fault`).  Used by the end-to-end fault and hardening tests."""

from __future__ import annotations

import time

from vmm_core import control_protocol as cp
from vmm_core.cli_control import wait_for_vm
from vmm_core.control import request

from . import TEST_GUEST, BackgroundVm, parse_results, run_bulkhead

DEVICE_TIMEOUT_MS = 500     # the defaults, spelled out: the bounds below are derived from them
HEARTBEAT_TIMEOUT_MS = 500


class FaultyVm:
    """The test guest's blk-workload (then rng and console checks) in a named, held VM."""

    def __init__(self, tmp_path, name: str, *extra: str, rounds: int = 300) -> None:
        disk = tmp_path / "disk.img"
        disk.write_bytes(bytes(1 << 20))
        self.disk = disk
        self.name = name
        self.vm = BackgroundVm(
            "run", "--kernel", TEST_GUEST, "--disk", str(disk), "--rng",
            "--console", str(tmp_path / "console.txt"), "--hold", "--name", name,
            "--device-timeout-ms", str(DEVICE_TIMEOUT_MS),
            "--heartbeat-timeout-ms", str(HEARTBEAT_TIMEOUT_MS), *extra, "--cmdline",
            f"gk.tests=blk-workload,virtio-rng,virtio-console gk.blk_sectors=128 "
            f"gk.blk_rounds={rounds}")
        wait_for_vm(name)
        self.wait_stdout("guest_kit: blk-workload round 1/")  # the guest is in its workload

    def wait_stdout(self, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while not any(text in line for line in self.vm.stdout):
            assert self.vm.proc.poll() is None, self.vm.explain()
            assert time.monotonic() < deadline, f"no {text!r} in {timeout} s\n" + self.vm.explain()
            time.sleep(0.01)

    def devices(self) -> dict[str, dict]:
        return {d["name"]: d for d in request(self.name, cp.Ps())["devices"]}

    def stats(self) -> dict[str, dict]:
        return {d["name"]: d for d in request(self.name, cp.GetStats())["devices"]}

    def fault(self, device: str, *action: str) -> None:
        run = run_bulkhead("fault", self.name, device, *action, timeout=30)
        assert run.returncode == 0, run.explain()

    def wait_restarts(self, device: str, count: int, timeout: float = 10.0) -> float:
        """Seconds until `device` has restarted `count` times and runs again."""
        t0 = time.monotonic()
        while True:
            d = self.devices()[device]
            if d["restarts"] >= count and d["state"] == "running":
                return time.monotonic() - t0
            assert time.monotonic() - t0 < timeout, (d, self.vm.explain())
            time.sleep(0.005)

    def finish(self) -> dict[str, tuple[bool, str]]:
        """Wait for the guest's checks, stop the VM (exit 0) and return the guest's results."""
        self.wait_stdout("GK done", timeout=60)
        request(self.name, cp.Stop())
        assert self.vm.wait(15) == 0, self.vm.explain()
        return parse_results("".join(self.vm.stdout))[0]

    def close(self) -> None:
        self.vm.kill()
