"""ProxyDevice and TransportShadow against an in-thread fake device on real shm rings."""

from __future__ import annotations

import os
import threading

import pytest

from ipc_protocol import virtio_mmio as regs
from ipc_protocol.ring import Op
from ipc_protocol.transport.shm_ring import ShmRings
from vmm_core.devices.proxy import ProxyDevice, TransportShadow


class FakeRegisters:
    """A trivial device: a dict of registers; reads of unknown offsets give the offset back."""

    def __init__(self) -> None:
        self.regs: dict[int, bytes] = {}

    def read(self, offset: int, data: bytearray) -> None:
        data[:] = self.regs.get(offset, offset.to_bytes(8, "little"))[:len(data)]

    def write(self, offset: int, data: bytes) -> None:
        self.regs[offset] = bytes(data).ljust(8, b"\0")


class FakeChild(threading.Thread):
    """Serves the device end of the rings in a thread; `mode` makes it misbehave."""

    def __init__(self, rings: ShmRings, mode: str = "ok") -> None:
        super().__init__(daemon=True)
        self.ring = rings.device_endpoint()
        self.device = FakeRegisters()
        self.mode = mode
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            try:
                slot = self.ring.recv(timeout=0.05)
            except Exception:
                continue
            if slot.op is Op.WRITE:
                self.device.write(slot.offset, slot.data)
            elif self.mode == "silent":
                continue
            elif slot.op is Op.READ:
                data = bytearray(slot.size)
                self.device.read(slot.offset, data)
                answer = slot.answer(bytes(data))
                if self.mode == "wrong_seq":
                    answer = type(answer)(answer.op, answer.seq + 1, answer.offset, answer.size,
                                          answer.data)
                self.ring.send(answer)
            else:
                self.ring.send(slot.answer())


@pytest.fixture
def make_proxy():
    made = []

    def make(mode: str = "ok", timeout: float = 0.2):
        core = ShmRings.create(8)
        device = ShmRings.attach(os.dup(core.memfd), os.dup(core.request_doorbell),
                                 os.dup(core.response_doorbell), 8)
        child = FakeChild(device, mode)
        child.start()
        failures: list[str] = []
        proxy = ProxyDevice("fake0", core.core_endpoint(), timeout=timeout,
                            on_failure=failures.append)
        made.append((core, device, child))
        return proxy, child, failures

    yield make
    for core, device, child in made:
        child.stop.set()
        child.join()
        device.close()
        core.close()


def test_reads_writes_and_sync_through_a_fake_child(make_proxy) -> None:
    proxy, child, failures = make_proxy()
    data = bytearray(4)
    proxy.read(0x10, data)
    assert data == (0x10).to_bytes(4, "little")
    proxy.write(0x10, b"\x01\x02")
    proxy.read(0x10, data)
    assert data == b"\x01\x02\0\0"
    assert proxy.sync() and failures == []
    odd = bytearray(3)
    proxy.read(0, odd)  # not an access size: never sent, reads as absent
    assert odd == b"\xff\xff\xff" and not proxy.failed


@pytest.mark.parametrize("mode, reason", [("silent", "no answer"), ("wrong_seq", "mismatch")])
def test_misbehaving_child_fails_the_device_once(make_proxy, mode: str, reason: str) -> None:
    proxy, _, failures = make_proxy(mode)
    data = bytearray(8)
    proxy.read(0, data)
    assert data == b"\xff" * 8 and proxy.failed
    proxy.read(0, data)
    proxy.write(0, b"\0")
    assert len(failures) == 1 and reason in failures[0]
    assert proxy.stats()["dropped_writes"] == 1


def test_on_failure_exceptions_do_not_escape(make_proxy) -> None:
    proxy, _, _ = make_proxy("silent", timeout=0.05)
    proxy.on_failure = lambda reason: 1 / 0
    proxy.read(0, bytearray(4))
    assert proxy.failed


def w32(shadow: TransportShadow, offset: int, value: int) -> None:
    shadow.record(offset, value.to_bytes(4, "little"))


def test_shadow_decodes_the_register_file() -> None:
    s = TransportShadow([256, 256], device_features=regs.VIRTIO_F_VERSION_1 | 0x1234)
    w32(s, regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
    for sel, half in ((0, 0x1234), (1, 0x1)):
        w32(s, regs.DRIVER_FEATURES_SEL, sel)
        w32(s, regs.DRIVER_FEATURES, half)
    w32(s, regs.QUEUE_SEL, 1)
    w32(s, regs.QUEUE_NUM, 128)
    w32(s, regs.QUEUE_DESC_LOW, 0x1000)
    w32(s, regs.QUEUE_DESC_HIGH, 0x2)
    w32(s, regs.QUEUE_READY, 1)
    w32(s, regs.QUEUE_NOTIFY, 1)  # an event, not state
    s.record(regs.CONFIG + 4, b"\x07")  # config writes are events here: not replayed
    wire = s.transport.to_wire()
    assert wire["driver_features"] == 0x1_0000_1234
    assert wire["queues"] == ((0, 256, 0, 0, 0, 0), (1, 128, 1, 0x2_0000_1000, 0, 0))
    act = s.to_activate(5)
    assert act.queues == wire["queues"] and act.transport_wire() == wire
    w32(s, regs.STATUS, 0)  # reset forgets everything
    assert s.transport.to_wire()["queues"][1] == (1, 256, 0, 0, 0, 0) and s.status == 0


def test_shadow_memory_is_bounded_whatever_the_guest_writes() -> None:
    s = TransportShadow([256])
    for q in range(10_000):
        w32(s, regs.QUEUE_SEL, q)
        w32(s, regs.QUEUE_NUM, 8)
        s.record(regs.CONFIG + q % 0xF00, b"\1")
    assert len(s.transport.queues) == 1
    assert len(s.recent) <= 256 and s.write_count == 30_000


def test_shadow_keeps_only_what_the_device_accepted() -> None:
    """Issue 9, finding 8: a restart replayed queue writes the live device had ignored (a queue
    size of 3 written after QueueReady made every restart end in DEVICE_NEEDS_RESET), and 300
    distinct config-space writes made the shadow too big for Activate, so every restart failed."""
    s = TransportShadow([256], device_features=regs.VIRTIO_F_VERSION_1)
    w32(s, regs.QUEUE_SEL, 0)
    w32(s, regs.QUEUE_NUM, 128)
    w32(s, regs.QUEUE_READY, 1)
    w32(s, regs.QUEUE_NUM, 3)          # ignored by the device: the queue is ready
    w32(s, regs.QUEUE_DESC_LOW, 0x40)  # likewise
    for offset in range(300):
        s.record(regs.CONFIG + offset, b"\x5a")
    w32(s, regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER)
    w32(s, regs.DRIVER_FEATURES_SEL, 1)
    w32(s, regs.DRIVER_FEATURES, 1)
    w32(s, regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK | regs.DRIVER_OK)
    w32(s, regs.QUEUE_NUM, 7)          # after DRIVER_OK: ignored
    assert s.transport.to_wire()["queues"] == ((0, 128, 1, 0, 0, 0),)
    assert s.status & regs.DRIVER_OK
    from ipc_protocol import messages
    assert messages.decode(messages.encode(s.to_activate(1))) == s.to_activate(1)


def test_shadow_refuses_features_the_device_does_not_offer() -> None:
    s = TransportShadow([256], device_features=regs.VIRTIO_F_VERSION_1)
    w32(s, regs.DRIVER_FEATURES_SEL, 0)
    w32(s, regs.DRIVER_FEATURES, 1 << 5)  # not offered
    w32(s, regs.DRIVER_FEATURES_SEL, 1)
    w32(s, regs.DRIVER_FEATURES, 1)
    w32(s, regs.STATUS, regs.ACKNOWLEDGE | regs.DRIVER | regs.FEATURES_OK)
    assert not s.status & regs.FEATURES_OK  # as the device answers: FEATURES_OK stays clear
