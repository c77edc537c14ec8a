"""A real device process (virtio-rng) behind a ProxyDevice: MMIO, kicks, interrupts, failures.

No KVM: the test plays the guest with `VirtioDriver` over the proxy's read/write, kicks through
the kick eventfd (what a KVM ioeventfd would do) and watches the irqfd eventfd.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import threading
import time
from typing import Iterator

import pytest

from device_procs.testing.driver import VirtioDriver
from vmm_core.testing.process import DeviceLab
from device_procs.virtio import mmio as regs
from ipc_protocol import messages as m
from ipc_protocol.errors import RemoteProtocolError
from ipc_protocol.transport.shm_ring import drain_eventfd
from ipc_protocol.transport.zmq_channel import PeerProtocolError
from vmm_core.devices.spawn import DeviceFds, DeviceProcess, DeviceStartError, start_device

TIMEOUT = 0.3  # the proxy's read timeout in these tests


class Harness(DeviceLab):
    """One irqfd and kick eventfd shared by every generation of an rng device (as after restarts)."""

    def __init__(self) -> None:
        super().__init__(tag="e2e")
        self.irqfd, kicks = self.eventfds("rng")
        self.kick = kicks[0]
        self.failures: list[str] = []

    def start(self, generation: int = 1, **kwargs) -> DeviceProcess:  # type: ignore[override]
        return super().start("rng0", {"type": "rng"}, irqfd=self.irqfd, kicks=[self.kick],
                             generation=generation, allow_faults=True, **kwargs)

    def proxy(self, proc: DeviceProcess):
        return proc.make_proxy(timeout=TIMEOUT, on_failure=self.failures.append)

    def driver(self, proxy) -> VirtioDriver:
        return VirtioDriver(proxy.read, proxy.write, self.memory,
                            kick=lambda index: os.eventfd_write(self.kick, 1))


@pytest.fixture
def harness() -> Iterator[Harness]:
    h = Harness()
    yield h
    h.close()


def read32(proxy, offset: int) -> int:
    data = bytearray(4)
    proxy.read(offset, data)
    return int.from_bytes(data, "little")


def test_registers_virtqueue_kicks_and_interrupts_through_a_device_process(harness: Harness) -> None:
    proc = harness.start()
    proxy = harness.proxy(proc)
    assert read32(proxy, regs.MAGIC_VALUE) == regs.MAGIC
    assert read32(proxy, regs.DEVICE_ID) == 4  # virtio-rng
    driver = harness.driver(proxy)
    driver.init()
    done = driver.queue(0).submit([], [32])
    assert len(done.writable_data(harness.memory)) == 32
    assert drain_eventfd(harness.irqfd) >= 1  # the child signalled the irqfd itself
    assert driver.ack_interrupt() & regs.INT_USED_BUFFER
    # QueueNotify as a plain register write goes through the ring instead of the kick eventfd.
    driver.kick = lambda index: driver.write_reg(regs.QUEUE_NOTIFY, index)
    assert len(driver.queue(0).submit([], [8]).writable_data(harness.memory)) == 8
    stats = harness.request(proc, m.Stats(7))
    assert isinstance(stats, m.StatsReply) and stats.request_id == 7
    assert stats.counters["requests"] == 2 and stats.counters["kicks"] == 1
    assert harness.request(proc, m.Heartbeat(99)) == m.HeartbeatAck(99)
    assert not proxy.failed and harness.failures == []


def test_reads_observe_earlier_posted_writes_in_fifo_order(harness: Harness) -> None:
    proxy = harness.proxy(harness.start())
    proxy.write(regs.DEVICE_FEATURES_SEL, (1).to_bytes(4, "little"))
    assert read32(proxy, regs.DEVICE_FEATURES) & 1  # VIRTIO_F_VERSION_1 is bit 32
    proxy.write(regs.DEVICE_FEATURES_SEL, (0).to_bytes(4, "little"))
    assert read32(proxy, regs.DEVICE_FEATURES) & 1 == 0
    for _ in range(200):  # more posted writes than ring slots: the proxy waits for room
        proxy.write(regs.QUEUE_SEL, (0).to_bytes(4, "little"))
    assert proxy.sync()
    assert read32(proxy, regs.QUEUE_NUM_MAX) == 256


def test_concurrent_vcpu_threads_are_serialized(harness: Harness) -> None:
    proxy = harness.proxy(harness.start())
    errors: list[int] = []

    def hammer() -> None:
        for _ in range(200):
            value = read32(proxy, regs.MAGIC_VALUE)
            if value != regs.MAGIC:
                errors.append(value)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and not proxy.failed


def test_the_shadow_records_what_the_driver_programmed(harness: Harness) -> None:
    proxy = harness.proxy(harness.start())
    driver = harness.driver(proxy)
    driver.init()
    q = driver.queue(0)
    state = proxy.shadow.state()
    assert state["status"] & regs.DRIVER_OK
    assert state["driver_features"] == driver.negotiated
    assert state["queues"][0] == {"size": 256, "ready": 1, "desc": q.desc, "driver": q.avail,
                                  "device": q.used}


def test_killed_child_reads_all_ones_within_the_timeout_and_reports_once(harness: Harness) -> None:
    proc = harness.start()
    proxy = harness.proxy(proc)
    assert read32(proxy, regs.MAGIC_VALUE) == regs.MAGIC
    os.kill(proc.pid, signal.SIGKILL)
    proc.popen.wait()
    start = time.monotonic()
    assert read32(proxy, regs.MAGIC_VALUE) == 0xFFFFFFFF
    assert time.monotonic() - start < TIMEOUT  # the pidfd ends the wait early
    assert proxy.failed and len(harness.failures) == 1 and "exited" in harness.failures[0]
    proxy.write(regs.STATUS, (1).to_bytes(4, "little"))  # dropped, but still shadowed
    assert read32(proxy, regs.STATUS) == 0xFFFFFFFF
    assert proxy.shadow.status == 1 and len(harness.failures) == 1


def ring_read(proxy) -> bytes:
    """A read the core cannot answer from the register page: Status right after a posted
    write the device has not applied yet, so it crosses the ring."""
    proxy.write(regs.QUEUE_SEL, bytes(4))
    data = bytearray(4)
    proxy.read(regs.STATUS, data)
    return bytes(data)


def test_hung_child_times_out(harness: Harness) -> None:
    proc = harness.start()
    proxy = harness.proxy(proc)
    harness.control.send(proc.identity, m.Fault("hang", {}))
    time.sleep(0.1)
    start = time.monotonic()
    # Config space and most registers are answered from the register page without the device
    # (a hung device is the heartbeat's to find); a read after a posted write still asks it.
    assert ring_read(proxy) == b"\xff\xff\xff\xff"
    assert TIMEOUT * 0.9 <= time.monotonic() - start < TIMEOUT + 0.5
    assert harness.failures and "no answer" in harness.failures[0]


def test_garbage_on_the_response_ring_marks_the_device_failed(harness: Harness) -> None:
    proc = harness.start()
    proxy = harness.proxy(proc)
    harness.control.send(proc.identity, m.Fault("garbage_response", {}))
    time.sleep(0.1)
    assert ring_read(proxy) == b"\xff\xff\xff\xff"
    assert harness.failures and "invalid answer" in harness.failures[0]
    assert read32(proxy, regs.MAGIC_VALUE) == 0xFFFFFFFF  # failed: all ones, even from the page


def test_malformed_control_message_from_the_child_is_rejected(harness: Harness) -> None:
    proc = harness.start()
    harness.control.send(proc.identity, m.Fault("garbage_control", {}))
    with pytest.raises(RemoteProtocolError) as info:
        while True:  # the device logs the fault it injects (Log messages) before the garbage
            _, got = harness.control.recv(2.0)
            assert isinstance(got, m.Log), got
    assert isinstance(info.value, PeerProtocolError) and info.value.peer == proc.identity


def test_malformed_control_message_to_the_child_is_reported_not_fatal(harness: Harness) -> None:
    proc = harness.start()
    harness.control.socket.send_multipart([proc.identity, b"\x92\x01\x02"])
    _, reply = harness.control.recv(2.0, peer=proc.identity)
    assert isinstance(reply, m.ErrorReport) and reply.code == m.E_PROTOCOL
    assert read32(harness.proxy(proc), regs.MAGIC_VALUE) == regs.MAGIC


def test_process_title_and_clean_shutdown(harness: Harness) -> None:
    proc = harness.start()
    with open(f"/proc/{proc.pid}/comm") as f:
        assert f.read().strip() == "bhdev:rng0"
    with open(f"/proc/{proc.pid}/cmdline") as f:
        assert f.read().startswith("bulkhead-dev:rng0")
    assert proc.shutdown(harness.control) == 0


def test_bad_spec_is_a_start_error_with_the_childs_reason(harness: Harness) -> None:
    with pytest.raises(DeviceStartError, match="bad-config"):
        start_device(harness.control, "blk0", {"type": "blk", "path": "/nonexistent/disk.img"},
                     harness.memory, DeviceFds(harness.memory.fd, harness.irqfd, [harness.kick]))


def test_restarted_child_resumes_from_the_shadow(harness: Harness) -> None:
    first = harness.start()
    proxy = harness.proxy(first)
    driver = harness.driver(proxy)
    driver.init()
    assert driver.queue(0).submit([], [16])
    first.kill()
    first.popen.wait()
    assert read32(proxy, regs.STATUS) == 0xFFFFFFFF and proxy.failed
    second = harness.start(generation=2)
    reply = harness.request(second, proxy.shadow.to_activate(second.next_request_id()))
    assert isinstance(reply, m.Ack)
    proxy.attach(second.rings.core_endpoint(), watch_fds=[second.pidfd])
    assert read32(proxy, regs.STATUS) & regs.DRIVER_OK
    assert len(driver.queue(0).submit([], [16]).writable_data(harness.memory)) == 16


PARENT_SCRIPT = """
import os, sys, time
from vmm_core.memory import GuestMemory, create_guest_memory
from vmm_core.devices.spawn import DeviceFds, spawn_device
from ipc_protocol.transport.shm_ring import make_eventfd
mem = create_guest_memory(1 << 20)
proc = spawn_device("rng9", "rng", control_endpoint=sys.argv[1],
                    fds=DeviceFds(mem.fd, make_eventfd(), [make_eventfd()]))
print(proc.pid, flush=True)
time.sleep(60)
"""


def test_device_process_dies_with_the_core(harness: Harness) -> None:
    core = subprocess.Popen([sys.executable, "-c", PARENT_SCRIPT, harness.control.endpoint],
                            stdout=subprocess.PIPE, text=True,
                            cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    child_pid = int(core.stdout.readline())
    harness.control.recv(5.0, peer=b"rng9.1")  # its Hello: the child is up and armed
    core.kill()
    core.wait()
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        try:
            with open(f"/proc/{child_pid}/stat") as f:
                if f.read().split(") ")[1].startswith("Z"):
                    break  # dead, waiting for init to reap it
        except FileNotFoundError:
            break
        time.sleep(0.02)
    else:
        os.kill(child_pid, signal.SIGKILL)
        pytest.fail("the device process outlived its core")
    core.stdout.close()
