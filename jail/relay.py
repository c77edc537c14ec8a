"""The device's control channel goes through its launcher: a relay whose memory a flood can fill.

libzmq bounds a message per *frame* (MAXMSGSIZE) and counts the high-water mark in *complete*
messages, so a device writing raw ZMTP frames that all say "more" makes whoever receives them
buffer without limit (measured: 460 MB in 4 s).  The core must never be that receiver.  So each
jailed device's DEALER connects to a ROUTER that its own launcher binds (outside the jail, before
the device can connect), and the launcher forwards complete, single-frame, size-checked messages
to the core's ROUTER under the device's routing id, and the core's answers back.  The launcher
runs under an address-space limit (`RELAY_HEADROOM` above what it maps at start): a flood ends
in the launcher failing to allocate and dying, which takes its device with it (PR_SET_PDEATHSIG)
and shows the core a device exit — the core's memory stays flat.

Runs in the launcher after it has forked the device (libzmq starts threads; nothing forks after).
"""

from __future__ import annotations

import ctypes
import os
import resource
from typing import Callable

import zmq

MAX_PAYLOAD = 64 * 1024          # ipc_protocol.messages.MAX_MESSAGE_BYTES (not imported: leaf)
RELAY_HEADROOM = 128 << 20       # bytes of address space the relay may add to what it has
M_ARENA_MAX = -8                 # <malloc.h>


def address_space() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[0]) * resource.getpagesize()


class Relay:
    """Binds the device's endpoint and connects upstream; `run` forwards until told to stop."""

    def __init__(self, downstream: str, upstream: str, identity: bytes) -> None:
        # One malloc arena: glibc reserves 64 MiB of address space per thread arena, which
        # the limit below would count against libzmq's two threads.
        ctypes.CDLL(None).mallopt(M_ARENA_MAX, 1)
        limit = address_space() + RELAY_HEADROOM
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
        self.identity = identity
        self.context = zmq.Context(io_threads=1)
        self.down = self.context.socket(zmq.ROUTER)
        self.down.setsockopt(zmq.LINGER, 0)
        self.down.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD + 1024)
        self.down.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self.down.bind(downstream)
        path = downstream[len("ipc://"):]
        os.chmod(path, 0o600)
        self.path = path
        self.up = self.context.socket(zmq.DEALER)
        self.up.setsockopt(zmq.LINGER, 200)  # a device's last word (an ErrorReport) still leaves
        self.up.setsockopt(zmq.MAXMSGSIZE, MAX_PAYLOAD + 1024)
        self.up.setsockopt(zmq.ROUTING_ID, identity)
        self.up.connect(upstream)
        self.forwarded = 0

    def run(self, watch: list[int], on_watch: Callable[[int], bool],
            kill_device: Callable[[str], None]) -> None:
        """Forward both ways; each readable fd of `watch` goes to `on_watch`, whose True ends
        the relay.  A device that breaks the channel's rules is killed (`kill_device`)."""
        poller = zmq.Poller()
        poller.register(self.down, zmq.POLLIN)
        poller.register(self.up, zmq.POLLIN)
        for fd in watch:
            poller.register(fd, zmq.POLLIN)
        while True:
            for what, _ in poller.poll():
                if what is self.down:
                    if not self._from_device():
                        kill_device("broke the control channel's framing")
                        return
                elif what is self.up:
                    self._from_core()
                elif on_watch(what):
                    return

    def _from_device(self) -> bool:
        while True:
            try:
                frames = self.down.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return True
            if len(frames) != 2 or frames[0] != self.identity or len(frames[1]) > MAX_PAYLOAD:
                return False
            try:
                self.up.send(frames[1], zmq.NOBLOCK)
                self.forwarded += 1
            except zmq.Again:
                pass  # the core is not reading: a message lost, as on a full ring

    def _from_core(self) -> None:
        while True:
            try:
                frames = self.up.recv_multipart(zmq.NOBLOCK, copy=True)
            except zmq.Again:
                return
            if len(frames) != 1:
                continue
            try:
                self.down.send_multipart([self.identity, frames[0]], zmq.NOBLOCK)
            except zmq.ZMQError:
                pass  # the device is not connected (yet, or any more)

    def close(self) -> None:
        self.down.close(linger=0)
        self.up.close()
        self.context.term()
