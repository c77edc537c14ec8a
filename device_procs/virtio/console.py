"""virtio-console (VIRTIO 1.2 §5.3), port 0 only: receiveq 0 and transmitq 1.

Transmitted bytes go to a host fd (a log file or a pipe).  Input arrives through `feed()` or,
when an input fd is given, `on_input_ready()` (the host polls `input_fd`, which `poll_fds()`
lists: the generic hook of `VirtioDevice`); it waits in a bounded buffer until the driver posts
receive buffers.
"""

from __future__ import annotations

import errno
import logging
import os
import select
import struct

from .device import VIRTIO_ID_CONSOLE, VirtioDevice
from .errors import DeviceSpecError
from .queue import DescriptorChain, Queue

log = logging.getLogger(__name__)

# Feature bits (§5.3.3).  We offer EMERG_WRITE only: no SIZE, no MULTIPORT.
VIRTIO_CONSOLE_F_SIZE = 1 << 0
VIRTIO_CONSOLE_F_MULTIPORT = 1 << 1
VIRTIO_CONSOLE_F_EMERG_WRITE = 1 << 2

RECEIVEQ = 0
TRANSMITQ = 1
QUEUE_SIZE = 256
MAX_PENDING_INPUT = 64 * 1024  # input beyond this, with no receive buffers posted, is dropped
CONFIG = struct.Struct("<HHII")  # cols, rows, max_nr_ports, emerg_wr
EMERG_WR_OFFSET = 8


class ConsoleDevice(VirtioDevice):
    """`output_fd` receives what the guest transmits; `input_fd` (optional) is read on demand."""

    device_type = VIRTIO_ID_CONSOLE
    queue_max_sizes = [QUEUE_SIZE, QUEUE_SIZE]

    def __init__(self, output_fd: int, input_fd: int | None = None, *, owns_fds: bool = True) -> None:
        super().__init__()
        self.device_features |= VIRTIO_CONSOLE_F_EMERG_WRITE
        self.output_fd = output_fd
        self.input_fd = input_fd
        self._owns_fds = owns_fds
        self.pending_input = bytearray()
        self._input_eof = False
        self.counters.update(tx_bytes=0, rx_bytes=0, dropped_input=0, dropped_output=0)

    @classmethod
    def open(cls, path: str, input_path: str | None = None) -> "ConsoleDevice":
        try:
            out = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise DeviceSpecError(f"console: cannot open output {path!r}: {e.strerror}") from None
        inp = None
        if input_path is not None:
            try:
                inp = os.open(input_path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                os.close(out)
                raise DeviceSpecError(f"console: cannot open input {input_path!r}: {e.strerror}") from None
        return cls(out, inp)

    @classmethod
    def from_spec(cls, spec: dict, fds: dict[str, int]) -> "ConsoleDevice":
        """Output and input from the core's fds (duplicated: the caller keeps its own), else
        opened from the spec's paths."""
        if "output" not in fds:
            device = cls.open(spec["path"], spec.get("input_path") if "input" not in fds else None)
            if "input" in fds:
                device.input_fd = os.dup(fds["input"])
            return device
        out = os.dup(fds["output"])
        inp = os.dup(fds["input"]) if "input" in fds else None
        if inp is None and spec.get("input_path"):
            try:
                inp = os.open(spec["input_path"], os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            except OSError as e:
                os.close(out)
                raise DeviceSpecError(f"console: cannot open input {spec['input_path']!r}: "
                                      f"{e.strerror}") from None
        return cls(out, inp)

    def config_bytes(self) -> bytes:
        return CONFIG.pack(0, 0, 1, 0)

    def write_config(self, offset: int, data: bytes) -> None:
        # §5.3.4: a write to emerg_wr outputs its low byte, usable before queues are set up.
        if offset == EMERG_WR_OFFSET and self.has_feature(VIRTIO_CONSOLE_F_EMERG_WRITE) and data:
            self._output(data[:1])

    # -- transmit -----------------------------------------------------------------------------
    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        if queue_index == TRANSMITQ:
            for view in chain.readable_views:
                self._output(view)
        # Writable buffers on the transmitq are a driver bug; nothing is written to them.
        return 0

    def _output(self, data: memoryview | bytes) -> None:
        view = memoryview(data)
        while view:
            try:
                n = os.write(self.output_fd, view)
            except OSError as e:
                # A full non-blocking pipe or a closed reader must not stall the guest.
                if e.errno not in (errno.EAGAIN, errno.EPIPE, errno.EIO):
                    log.warning("console: output failed: %s", e)
                self.counters["dropped_output"] += len(view)
                return
            self.counters["tx_bytes"] += n
            view = view[n:]

    # -- receive ------------------------------------------------------------------------------
    def feed(self, data: bytes) -> bool:
        """Queue input for the guest and deliver what fits; True if buffers were used."""
        room = MAX_PENDING_INPUT - len(self.pending_input)
        if len(data) > room:
            self.counters["dropped_input"] += len(data) - max(room, 0)
            data = data[:max(room, 0)]
        self.pending_input += data
        return self.process_queue(RECEIVEQ)

    def poll_fds(self) -> list[tuple[int, int]]:
        # Input is read whether or not the driver is ready: it waits in `pending_input`.
        # At end of input (a closed pipe polls readable forever) it stops asking, and while the
        # buffer is full it leaves input in the fd rather than read and drop it.
        if self.input_fd is None or self._input_eof or len(self.pending_input) >= MAX_PENDING_INPUT:
            return []
        return [(self.input_fd, select.POLLIN)]

    def on_ready(self, fd: int, events: int) -> bool:
        return self.on_input_ready() if fd == self.input_fd else False

    def on_input_ready(self) -> bool:
        """The host saw `input_fd` readable: read what is there and deliver it."""
        if self.input_fd is None:
            return False
        try:
            data = os.read(self.input_fd, MAX_PENDING_INPUT)
        except BlockingIOError:
            return False
        if not data:
            self._input_eof = True
            return False
        return self.feed(data)

    def drain_queue(self, index: int, queue: Queue) -> bool:
        if index != RECEIVEQ:
            return super().drain_queue(index, queue)
        # Receive buffers are consumed only when there is input for them.
        used = False
        while self.pending_input:
            chain = queue.pop()
            if chain is None:
                if not queue.enable_notification():
                    break
                continue
            written = 0
            for view in chain.writable_views:
                n = min(len(view), len(self.pending_input) - written)
                view[:n] = self.pending_input[written:written + n]
                written += n
                if written == len(self.pending_input):
                    break
            del self.pending_input[:written]
            self.counters["rx_bytes"] += written
            queue.add_used(chain.head, written)
            used = True
        return used

    def close(self) -> None:
        if self._owns_fds:
            for fd in (self.output_fd, self.input_fd):
                if fd is not None and fd >= 0:
                    os.close(fd)
        self.output_fd = -1
        self.input_fd = None
