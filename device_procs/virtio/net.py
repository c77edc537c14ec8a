"""virtio-net on a tap fd (VIRTIO 1.2 §5.1): receiveq 0, transmitq 1, controlq 2.

The device receives an open tap fd (IFF_TAP | IFF_NO_PI | IFF_VNET_HDR, TUNSETVNETHDRSZ 12,
O_NONBLOCK: `vmm_core.devices.tap` makes it) and never opens anything itself.  Frames and their
12-byte `virtio_net_hdr_v1` move between guest buffers and the tap with readv/writev, no copy
and no header rewriting (`net_header` checks them); with MRG_RXBUF the device fills
`num_buffers`.  The only ioctl is TUNSETOFFLOAD on that fd, at FEATURES_OK and reset, so the tap
hands over only what the driver negotiated to receive.  The control queue (`net_ctrl`) takes
the receive mode and MAC filter commands (CTRL_RX) and answers anything else VIRTIO_NET_ERR.

Driven by the host loop (see `VirtioDevice`): `poll_fds()` asks for POLLIN on the tap only while
the driver has posted receive buffers (none posted: the tap is not polled at all, and the next
receiveq kick resumes), and for POLLOUT while a transmit waits for the tap to drain.

Choices:
- Transmit on EAGAIN keeps the chain and retries on POLLOUT rather than drop it: a full tap
  (its socket's send buffer, TUNSETSNDBUF) is back-pressure, and stopping the transmitq is what a
  real NIC with a full ring does: the guest's qdisc queues instead of losing packets.  Other write
  errors drop the frame and count it (the guest cannot fix them by sending again).
- A malformed transmit header (a GSO type not negotiated, a bad gso_size or hdr_len, an oversized
  frame, no header at all) drops that frame and counts it (`tx_dropped_<reason>`); it is never a
  DEVICE_NEEDS_RESET, which is kept for broken rings.
- Receive reads straight into the posted buffers plus a bounce tail: a frame that spills into the
  tail did not fit (the tap silently truncates to the buffer it is given, so the tail is also how
  truncation is seen).  Without MRG_RXBUF such a frame is dropped (`rx_dropped_too_big`: the
  driver's buffers are smaller than §5.1.6.3.1 asks); with it, the frame waits, copied, for more
  buffers.
- A restarted device process resumes at the used index: transmits in flight are sent again (a
  duplicate frame), receives in flight are lost; both are ordinary network events.
"""

from __future__ import annotations

import errno
import fcntl
import logging
import os
import select
import struct
from collections import deque
from typing import Any, Callable

from ipc_protocol.guest_memory import GuestMemory

from . import fastpath
from .device import COMMON_FEATURES, VIRTIO_ID_NET, Interrupt, VirtioDevice
from .errors import DeviceSpecError
from .net_ctrl import ControlCommand, RxFilter, VIRTIO_NET_OK
from .net_header import (GUEST_GSO, HEADER_SIZE, MAX_GSO_FRAME, NUM_BUFFERS_OFFSET, ETH_MAX_MTU,
                         ETH_MIN_MTU, VIRTIO_NET_F_CSUM, VIRTIO_NET_F_CTRL_RX,
                         VIRTIO_NET_F_CTRL_VQ, VIRTIO_NET_F_GUEST_CSUM,
                         VIRTIO_NET_F_GUEST_ECN, VIRTIO_NET_F_GUEST_TSO4, VIRTIO_NET_F_GUEST_TSO6,
                         VIRTIO_NET_F_GUEST_UFO, VIRTIO_NET_F_HOST_ECN, VIRTIO_NET_F_HOST_TSO4,
                         VIRTIO_NET_F_HOST_TSO6, VIRTIO_NET_F_HOST_UFO, VIRTIO_NET_F_MAC,
                         VIRTIO_NET_F_MRG_RXBUF, VIRTIO_NET_F_MTU, VIRTIO_NET_F_STATUS, NetHeader,
                         check_rx, check_tx, effective_features, feature_error, max_plain_frame,
                         tap_offloads)
from .queue import DescriptorChain, Queue, slice_views, write_stream
from .rate_limiter import RateLimiter

log = logging.getLogger(__name__)

RECEIVEQ = 0
TRANSMITQ = 1
CONTROLQ = 2
QUEUE_SIZE = 256
CONTROL_QUEUE_SIZE = 256  # vhost-user frontends (UML) size every ring 256

# TUNSETOFFLOAD = _IOW('T', 208, unsigned int) from <linux/if_tun.h>; the jail policy pins the
# same number by name (jail_configs/net.toml).
TUNSETOFFLOAD = 0x400454D0

VIRTIO_NET_S_LINK_UP = 1
# struct virtio_net_config (§5.1.4) up to mtu: mac[6], status, max_virtqueue_pairs, mtu.
CONFIG = struct.Struct("<6sHHH")

IOV_MAX = 1024
# Frames taken from the tap per wake-up, so one busy tap cannot starve register accesses and
# kicks; the tap stays readable and the next poll comes straight back.
RX_BUDGET = 64
# Errors after which a tap is gone for good (detached, closed): stop using it, report link down.
FATAL_TAP_ERRNOS = (errno.EBADF, errno.EBADFD, errno.EPIPE, errno.ENODEV, errno.ENXIO)

OFFERED = (COMMON_FEATURES | VIRTIO_NET_F_MAC | VIRTIO_NET_F_STATUS | VIRTIO_NET_F_MTU
           | VIRTIO_NET_F_CSUM | VIRTIO_NET_F_GUEST_CSUM
           | VIRTIO_NET_F_HOST_TSO4 | VIRTIO_NET_F_HOST_TSO6 | VIRTIO_NET_F_HOST_ECN
           | VIRTIO_NET_F_HOST_UFO | VIRTIO_NET_F_GUEST_TSO4 | VIRTIO_NET_F_GUEST_TSO6
           | VIRTIO_NET_F_GUEST_ECN | VIRTIO_NET_F_GUEST_UFO | VIRTIO_NET_F_MRG_RXBUF
           | VIRTIO_NET_F_CTRL_VQ | VIRTIO_NET_F_CTRL_RX)

COUNTERS = ("tx_packets", "tx_bytes", "rx_packets", "rx_bytes", "tx_eagain", "rx_buffers",
            "tx_dropped_no_header", "tx_dropped_runt", "tx_dropped_flags", "tx_dropped_csum",
            "tx_dropped_hdr_len", "tx_dropped_gso_type", "tx_dropped_gso_size",
            "tx_dropped_oversize", "tx_dropped_tap_error",
            "rx_dropped_runt", "rx_dropped_csum", "rx_dropped_oversize", "rx_dropped_gso_type",
            "rx_dropped_too_big", "rx_dropped_filtered", "rx_bad_buffers", "rx_starved",
            "tap_errors", "offload_errors", "throttled_tx", "throttled_rx",
            "ctrl_ok", "ctrl_err", "ctrl_malformed", "feature_errors")


def parse_mac(text: str) -> bytes:
    """'52:54:00:12:34:56' -> 6 bytes; a unicast address (bit 0 of the first octet clear)."""
    parts = text.split(":") if isinstance(text, str) else []
    try:
        mac = bytes(int(p, 16) for p in parts) if all(len(p) == 2 for p in parts) else b""
    except ValueError:
        mac = b""
    if len(mac) != 6:
        raise DeviceSpecError(f"net: mac {text!r} is not six hex octets like 52:54:00:12:34:56")
    if mac[0] & 1:
        raise DeviceSpecError(f"net: mac {text!r} is a multicast address; a NIC needs a unicast one")
    return mac


class _RxFrame:
    """A received frame that did not fit the buffers it was read into; it is placed by copy."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data


class _TxFrame:
    """A parsed transmit chain waiting for the tap (EAGAIN) or for tokens."""

    __slots__ = ("chain", "frame_len", "paid")

    def __init__(self, chain: DescriptorChain, frame_len: int) -> None:
        self.chain, self.frame_len, self.paid = chain, frame_len, False


class NetDevice(VirtioDevice):
    """A virtio-net device on `tap_fd`; see the module doc for what it does and why."""

    device_type = VIRTIO_ID_NET
    queue_max_sizes = [QUEUE_SIZE, QUEUE_SIZE, CONTROL_QUEUE_SIZE]

    def __init__(self, tap_fd: int, mac: bytes, *, mtu: int = 1500, owns_fd: bool = True,
                 set_offload: Callable[[int], None] | None = None,
                 tx_limiter: RateLimiter | None = None, rx_limiter: RateLimiter | None = None,
                 native: bool = True) -> None:
        super().__init__()
        if len(mac) != 6:
            raise DeviceSpecError("net: a MAC address is 6 bytes")
        if not ETH_MIN_MTU <= mtu <= ETH_MAX_MTU:
            raise DeviceSpecError(f"net: mtu {mtu} is outside {ETH_MIN_MTU}..{ETH_MAX_MTU} (§5.1.4.1)")
        if os.get_blocking(tap_fd):
            # Checked, not changed: the file description is shared with the core.
            raise DeviceSpecError("net: the tap fd must be non-blocking (open it with O_NONBLOCK)")
        self.tap_fd = tap_fd
        self.mac = mac
        self.mtu = mtu
        self._owns_fd = owns_fd
        self._set_offload = set_offload or self._tunsetoffload
        self.tx_limiter = tx_limiter
        self.rx_limiter = rx_limiter
        self.device_features = OFFERED
        self.link_up = True
        self.offloads: int | None = None  # last TUNSETOFFLOAD value applied
        self.rx_filter = RxFilter(mac)
        # The C loops (`fastpath`) carry the common case; the Python below is the reference and
        # takes whatever they hand back (rate limits, held or spilled frames, huge chains).
        self.native = native and self.native
        self._native_filter = fastpath.NativeFilter() if self.native else None
        self.counters.update({name: 0 for name in COUNTERS})
        self._clear_queues()
        self._bounce = bytearray(HEADER_SIZE + MAX_GSO_FRAME + 1)

    def _clear_queues(self) -> None:
        self._rx_chains: deque[DescriptorChain] = deque()  # popped, not yet used, in order
        self._rx_pending: _RxFrame | None = None
        self._rx_starved = False     # the receiveq ran dry: wait for a kick, do not poll the tap
        self._rx_throttled = False
        self._tx_waiting: _TxFrame | None = None
        self._tx_want_pollout = False
        self._tx_throttled = False

    # -- spec -----------------------------------------------------------------------------------
    @classmethod
    def from_spec(cls, spec: dict[str, Any], fds: dict[str, int]) -> "NetDevice":
        """The tap comes as fd role "tap" (duplicated: the caller keeps its own); the spec has
        "mac" (required: the core picks a stable one), "mtu" (the tap's, default 1500) and
        optional "tx_bandwidth", "tx_ops", "rx_bandwidth", "rx_ops" (`BucketConfig.parse`:
        SIZE/REFILL_MS[/BURST]).  Other keys (the core's "tap" name, "netns") are ignored."""
        if "tap" not in fds:
            raise DeviceSpecError("net: no tap fd was passed (the core opens the tap)")
        if "mac" not in spec:
            raise DeviceSpecError("net spec is missing required field 'mac'")
        mtu = spec.get("mtu", 1500)
        if type(mtu) is not int:
            raise DeviceSpecError(f"net spec field 'mtu' must be an int, not {mtu!r}")
        mac = parse_mac(spec["mac"])
        tx = RateLimiter.from_fields(spec.get("tx_bandwidth"), spec.get("tx_ops"), what="tx_")
        rx = RateLimiter.from_fields(spec.get("rx_bandwidth"), spec.get("rx_ops"), what="rx_")
        fd = os.dup(fds["tap"])
        try:
            return cls(fd, mac, mtu=mtu, tx_limiter=tx, rx_limiter=rx)
        except BaseException:
            os.close(fd)
            raise

    # -- features and config (§5.1.3, §5.1.4) ----------------------------------------------------
    def ack_features(self, value: int) -> None:
        # §5.1.3.1: a feature whose requirement the driver did not accept is treated as not
        # negotiated (the shared transport cannot refuse FEATURES_OK per kind), so a broken set
        # can only make the device do less: no offload the driver cannot complete.
        effective = effective_features(value)
        if effective != value:
            self.counters["feature_errors"] += 1
            log.info("net: %s; acting as if %#x were not negotiated", feature_error(value),
                     value & ~effective)
        super().ack_features(effective)
        self._apply_offloads(tap_offloads(effective))

    def _apply_offloads(self, flags: int) -> None:
        if flags == self.offloads:
            return
        try:
            self._set_offload(flags)
            self.offloads = flags
        except OSError as e:
            # Not fatal: check_rx still drops any frame the driver cannot take.
            self.counters["offload_errors"] += 1
            log.warning("net: TUNSETOFFLOAD %#x failed: %s", flags, e)

    def _tunsetoffload(self, flags: int) -> None:
        fcntl.ioctl(self.tap_fd, TUNSETOFFLOAD, flags)

    def config_bytes(self) -> bytes:
        status = VIRTIO_NET_S_LINK_UP if self.link_up else 0
        return CONFIG.pack(self.mac, status, 1, self.mtu)

    def set_link(self, up: bool) -> None:
        """Change the link status (§5.1.4 `status`), with a config change notification."""
        if up == self.link_up:
            return
        self.link_up = up
        if self.active and self.has_feature(VIRTIO_NET_F_STATUS):
            assert self.interrupt is not None
            self.interrupt.signal_config()

    # -- lifecycle --------------------------------------------------------------------------------
    def activate(self, memory: GuestMemory, queues: list[Queue | None], interrupt: Interrupt) -> None:
        super().activate(memory, queues, interrupt)
        self._clear_queues()

    def reset(self) -> None:
        super().reset()
        self._clear_queues()
        self.rx_filter.reset()
        # The next driver may negotiate less: the tap must not keep offloads it cannot take.
        self._apply_offloads(0)

    def close(self) -> None:
        if self._owns_fd and self.tap_fd >= 0:
            os.close(self.tap_fd)
        self.tap_fd = -1

    def stats(self) -> dict[str, Any]:
        out = super().stats()
        out.update(link_up=self.link_up, mtu=self.mtu, offloads=self.offloads or 0,
                   rx_held_buffers=len(self._rx_chains))
        return out

    @property
    def _mergeable(self) -> bool:
        return self.has_feature(VIRTIO_NET_F_MRG_RXBUF)

    def _queue(self, index: int) -> Queue | None:
        if not self.active or self.broken or index >= len(self.queues):
            return None
        return self.queues[index]

    # -- host loop hooks ---------------------------------------------------------------------------
    def poll_fds(self) -> list[tuple[int, int]]:
        if self.tap_fd < 0:
            return []
        events = 0
        if (self._queue(RECEIVEQ) is not None and not self._rx_starved
                and not self._rx_throttled and self.link_up):
            events |= select.POLLIN
        if self._tx_want_pollout and self._queue(TRANSMITQ) is not None:
            events |= select.POLLOUT
        return [(self.tap_fd, events)] if events else []

    def on_ready(self, fd: int, events: int) -> bool:
        if fd != self.tap_fd or fd < 0:
            return False
        used = False
        # POLLERR/POLLHUP come whatever we asked for: let the read or write see the error.
        if events & select.POLLOUT or (events & (select.POLLERR | select.POLLHUP) and self._tx_want_pollout):
            used |= self.process_queue(TRANSMITQ)
        if events & (select.POLLIN | select.POLLERR | select.POLLHUP):
            used |= self.process_queue(RECEIVEQ)
        return used

    def next_deadline_ns(self) -> int | None:
        deadlines = [rl.deadline_ns() for rl, waiting in ((self.tx_limiter, self._tx_throttled),
                                                          (self.rx_limiter, self._rx_throttled))
                     if rl is not None and waiting]
        present = [d for d in deadlines if d is not None]
        return min(present) if present else None

    def on_timer(self, now_ns: int) -> bool:
        used = False
        if self._tx_throttled:
            used |= self.process_queue(TRANSMITQ)
        if self._rx_throttled:
            used |= self.process_queue(RECEIVEQ)
        return used

    def drain_queue(self, index: int, queue: Queue) -> bool:
        if index == RECEIVEQ:
            return self._drain_rx(queue)
        if index == TRANSMITQ:
            return self._drain_tx(queue)
        return super().drain_queue(index, queue)  # the control queue: one chain at a time

    def handle_chain(self, queue_index: int, chain: DescriptorChain) -> int:
        """A control queue request (§5.1.6.5): execute it and write the ack byte."""
        cmd = ControlCommand.parse(chain)
        if cmd.ack is None:
            self.counters["ctrl_malformed"] += 1  # nowhere to answer: return it unused
            return 0
        ack = self.rx_filter.execute(cmd, self.acked_features)
        cmd.ack[0] = ack
        self.counters["ctrl_ok" if ack == VIRTIO_NET_OK else "ctrl_err"] += 1
        return 1

    # -- transmit (§5.1.6.2) ---------------------------------------------------------------------
    def _drain_tx(self, queue: Queue) -> bool:
        used = False
        self._tx_throttled = False
        while True:
            ring = (self.fast_ring(TRANSMITQ, queue)
                    if self._tx_waiting is None and self.tx_limiter is None else None)
            if ring is not None:
                before = queue.used_idx
                rc, err = ring.net_tx(self.tap_fd, self.acked_features, self.mtu, self.counters)
                used |= queue.used_idx != before
                if rc == fastpath.EMPTY:
                    self._tx_want_pollout = False
                    return used
                if rc == fastpath.EAGAIN:  # nothing consumed: the chain waits in the ring
                    self._tx_want_pollout = True
                    return used
                if rc == fastpath.TAP_ERROR:  # that frame was dropped and used
                    self._tap_error("write", str(OSError(err, os.strerror(err))),
                                    fatal=err in FATAL_TAP_ERRNOS)
                    self._tx_want_pollout = False
                    continue
                # SLOW: the next chain goes through the Python path
            step = self._tx_step(queue)
            if step is None:
                return used
            used |= step

    def _tx_step(self, queue: Queue) -> bool | None:
        """One chain the Python way: whether a buffer went back, None when the transmitq stops
        (the ring is empty, or the frame waits for the tap or for tokens)."""
        frame, self._tx_waiting = self._tx_waiting, None
        if frame is None:
            chain = queue.pop()
            if chain is None:
                return False if queue.enable_notification() else None
            self.counters["chains"] += 1
            frame = self._parse_tx(chain)
            if frame is None:
                queue.add_used(chain.head, 0)
                return True
        if not self._send(frame):
            self._tx_waiting = frame  # the transmitq stops here until POLLOUT or the timer
            return None
        queue.add_used(frame.chain.head, 0)  # §2.7.8: the device wrote nothing
        return True

    def _parse_tx(self, chain: DescriptorChain) -> _TxFrame | None:
        """The frame in `chain`, or None (counted) if it must be dropped."""
        frame_len = chain.readable_len - HEADER_SIZE
        if frame_len < 0:
            # §5.1.6.2: every packet is preceded by the header; without it there is nothing to
            # tell the tap.  (Device-writable buffers on the transmitq are ignored.)
            self.counters["tx_dropped_no_header"] += 1
            return None
        raw = b"".join(bytes(v) for v in slice_views(chain.readable_views, 0, HEADER_SIZE))
        reason = check_tx(NetHeader.unpack(raw), frame_len, self.acked_features, self.mtu)
        if reason is not None:
            self.counters[f"tx_dropped_{reason}"] += 1
            return None
        return _TxFrame(chain, frame_len)

    def _send(self, frame: _TxFrame) -> bool:
        """Write `frame` to the tap; False if it must wait (rate limit, or a full tap)."""
        if self.tx_limiter is not None and not frame.paid:
            if not self.tx_limiter.try_consume(frame.frame_len):
                self._tx_throttled = True
                self.counters["throttled_tx"] += 1
                return False
            frame.paid = True
        views = list(frame.chain.readable_views)
        if len(views) > IOV_MAX:  # a chain of more buffers than writev takes (indirect tables)
            views = [memoryview(frame.chain.read_all())]
        try:
            os.writev(self.tap_fd, views)
        except BlockingIOError:
            self.counters["tx_eagain"] += 1
            self._tx_want_pollout = True
            return False
        except OSError as e:
            # The kernel refused the frame (EINVAL: a header it would not take) or the tap is
            # gone: drop it; the guest cannot fix either by sending again.
            self.counters["tx_dropped_tap_error"] += 1
            self._tap_error("write", str(e), fatal=e.errno in FATAL_TAP_ERRNOS)
            self._tx_want_pollout = False
            return True
        self._tx_want_pollout = False
        self.counters["tx_packets"] += 1
        self.counters["tx_bytes"] += frame.frame_len
        return True

    # -- receive (§5.1.6.3, §5.1.6.4) -------------------------------------------------------------
    def _drain_rx(self, queue: Queue) -> bool:
        # Entered on a kick (buffers were added), a ready tap or the timer: no longer starved.
        self._rx_starved = False
        self._rx_throttled = False
        used = False
        budget = RX_BUDGET
        ring = self.fast_ring(RECEIVEQ, queue) if self._rx_native_ok() else None
        if ring is not None:
            assert self._native_filter is not None
            before = queue.used_idx
            rx_filter = self._native_filter.get(self.rx_filter, self.has_feature(VIRTIO_NET_F_CTRL_RX))
            rc, n = ring.net_rx(self.tap_fd, self.acked_features, self.mtu, rx_filter,
                                self._bounce, RX_BUDGET, self.counters)
            used |= queue.used_idx != before
            if rc == fastpath.EMPTY:
                self._starve()
                return used
            if rc == fastpath.EAGAIN or (rc == fastpath.STOP and n == 0):
                return used  # the tap is empty, or the budget is spent
            if rc == fastpath.TAP_ERROR:
                self._tap_error("read", str(OSError(n, os.strerror(n))) if n else "end of file",
                                fatal=True)
                return used
            if rc == fastpath.STOP:  # a frame that did not fit what the C loop gathered
                used |= self._place_spilled(queue, n, ring.gathered_capacity(), ring.gathered)
                budget -= 1
            # SLOW, or after a spilled frame: the Python path goes on
        for _ in range(budget):
            if self.tap_fd < 0 or not self.link_up:
                break
            if self._rx_pending is not None:
                if not self._deliver_pending(queue):
                    break
                used = True
                continue
            if self.rx_limiter is not None and not self.rx_limiter.ready():
                self._rx_throttled = True
                self.counters["throttled_rx"] += 1
                break
            got = self._receive(queue)
            if got is None:
                break
            used |= got
        return used

    def _rx_native_ok(self) -> bool:
        """The C receive loop holds nothing between frames: only when the Python holds
        nothing either, and no rate limit has to be charged per frame."""
        return (self.rx_limiter is None and not self._rx_chains and self._rx_pending is None
                and self.tap_fd >= 0 and self.link_up)

    def _gather(self, queue: Queue, capacity: int) -> int:
        """Pop receive buffers until `capacity` bytes are held (or the ring is dry); held bytes."""
        held = sum(c.writable_len for c in self._rx_chains)
        while held < capacity and len(self._rx_chains) < IOV_MAX:
            chain = queue.pop()
            if chain is None:
                if queue.enable_notification():
                    continue
                break
            self.counters["chains"] += 1
            if chain.writable_len < HEADER_SIZE:
                # §5.1.6.3.1: every receive buffer holds at least the header.  Give it back
                # empty (the driver drops it) rather than reset the device over it.
                self.counters["rx_bad_buffers"] += 1
                queue.add_used(chain.head, 0)
                continue
            self._rx_chains.append(chain)
            self.counters["rx_buffers"] += 1
            held += chain.writable_len
        return held

    def _max_frame(self) -> int:
        """The largest frame (header included) the driver may be handed."""
        body = MAX_GSO_FRAME if self.acked_features & GUEST_GSO else max_plain_frame(self.mtu)
        return HEADER_SIZE + body

    def _receive(self, queue: Queue) -> bool | None:
        """Read one frame from the tap into the held buffers; None: stop (dry ring or tap)."""
        mergeable = self._mergeable
        self._gather(queue, self._max_frame() if mergeable else 1)
        if not self._rx_chains:
            self._starve()
            return None
        # Whole buffers only, so that what the frame fills is a prefix of `_rx_chains`; one
        # slot is left for the bounce tail.
        views: list[memoryview] = []
        for chain in self._rx_chains if mergeable else [self._rx_chains[0]]:
            if len(views) + len(chain.writable_views) > IOV_MAX - 1:
                break
            views.extend(chain.writable_views)
        capacity = sum(len(v) for v in views)
        try:
            n = os.readv(self.tap_fd, views + [memoryview(self._bounce)])
        except (BlockingIOError, InterruptedError):
            return None
        except OSError as e:
            self._tap_error("read", str(e), fatal=True)
            return None
        if n == 0:
            # A tap never reads 0 bytes (every frame carries its header): this fd is at end of
            # file and would poll readable forever.
            self._tap_error("read", "end of file", fatal=True)
            return None
        if n <= capacity:
            return self._complete(queue, views, n)
        return self._place_spilled(queue, n, capacity, lambda: b"".join(bytes(v) for v in views))

    def _place_spilled(self, queue: Queue, n: int, capacity: int,
                       buffered: Callable[[], bytes]) -> bool:
        """A frame of `n` bytes read into `capacity` bytes of buffers (`buffered()`: their
        bytes) that spilled into the bounce tail; the buffers are not used for it."""
        if n == capacity + len(self._bounce):
            # The tap truncates silently to what it is given: a frame that filled even the
            # bounce tail is longer than any frame may be.
            self.counters["rx_dropped_too_big"] += 1
            return False
        # It is placed by copying, now or once there are buffers.
        data = buffered() + bytes(self._bounce[:n - capacity])
        if not self._accept_rx(data[:HEADER_SIZE + 6], n):
            return False
        self._rx_pending = _RxFrame(data)
        return self._deliver_pending(queue)

    def _accept_rx(self, head: bytes, n: int) -> bool:
        """Check a received frame from its first bytes (header + destination MAC) and length."""
        reason = "runt" if n < HEADER_SIZE else check_rx(
            NetHeader.unpack(head[:HEADER_SIZE]), n - HEADER_SIZE, self.acked_features, self.mtu)
        if reason is None and self.has_feature(VIRTIO_NET_F_CTRL_RX) and not self.rx_filter.accepts(
                head[HEADER_SIZE:HEADER_SIZE + 6]):
            reason = "filtered"  # §5.1.6.5.2: SHOULD drop what matches neither mac nor the table
        if reason is not None:
            self.counters[f"rx_dropped_{reason}"] += 1
        return reason is None

    def _complete(self, queue: Queue, views: list[memoryview], n: int) -> bool:
        """Check the frame the tap put in the held buffers and return them to the driver."""
        head = b"".join(bytes(v) for v in slice_views(views, 0, HEADER_SIZE + 6))
        if not self._accept_rx(head, n):
            return False  # the buffers stay held for the next frame
        lengths = self._spread(n)
        # §5.1.6.3.2 / §5.1.6.4.1: num_buffers is the number of buffers used (1 without
        # MRG_RXBUF); the tap leaves those two bytes of the header alone.
        write_stream(views, NUM_BUFFERS_OFFSET, struct.pack("<H", len(lengths)))
        self._use(queue, lengths, n)
        return True

    def _deliver_pending(self, queue: Queue) -> bool:
        """Copy the waiting frame into held buffers once there are enough of them."""
        assert self._rx_pending is not None
        framed = bytearray(self._rx_pending.data)
        if self._mergeable:
            held = self._gather(queue, len(framed))
            never = len(self._rx_chains) >= queue.size  # the whole ring is with us, still short
        else:
            # §5.1.6.3.2: without MRG_RXBUF the frame goes in a single buffer.
            held = self._gather(queue, 1) and self._rx_chains[0].writable_len
            never = bool(held)
        if held < len(framed):
            if never:
                self.counters["rx_dropped_too_big"] += 1
                self._rx_pending = None
                return False
            self._starve()
            return False
        self._rx_pending = None
        lengths = self._spread(len(framed))
        framed[NUM_BUFFERS_OFFSET:NUM_BUFFERS_OFFSET + 2] = struct.pack("<H", len(lengths))
        pos = 0
        for chain, length in zip(self._rx_chains, lengths):
            write_stream(chain.writable_views, 0, framed[pos:pos + length])
            pos += length
        self._use(queue, lengths, len(framed))
        return True

    def _spread(self, n: int) -> list[int]:
        """Used lengths of the held buffers a frame of `n` bytes fills, first to last.

        §5.1.6.4.1: every buffer but the last is used up to its full length."""
        lengths = []
        for chain in self._rx_chains:
            take = min(chain.writable_len, n)
            lengths.append(take)
            n -= take
            if n == 0:
                break
        return lengths

    def _use(self, queue: Queue, lengths: list[int], n: int) -> None:
        for length in lengths:
            queue.add_used(self._rx_chains.popleft().head, length)
        self.counters["rx_packets"] += 1
        self.counters["rx_bytes"] += n - HEADER_SIZE
        if self.rx_limiter is not None:
            self.rx_limiter.charge(n - HEADER_SIZE)

    def _starve(self) -> None:
        """No (or not enough) receive buffers: stop polling the tap until the next rx kick."""
        if not self._rx_starved:
            self.counters["rx_starved"] += 1
        self._rx_starved = True

    def _tap_error(self, what: str, err: str, *, fatal: bool) -> None:
        self.counters["tap_errors"] += 1
        if fatal:
            # A read error other than EAGAIN would repeat on every poll (a busy loop): the tap is
            # unusable, so say link down (STATUS) and stop polling it.
            log.warning("net: tap %s failed (%s): link down", what, err)
            self.set_link(False)
        else:
            log.info("net: tap %s: %s", what, err)
