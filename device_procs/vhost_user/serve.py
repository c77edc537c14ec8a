"""The backend's serve loop: one poll(2) over the connection, the backend channel and the kick fds.

Plain receive -> apply -> reply -> process (crosvm's child loop), single-threaded:

- a frontend message: `backend.handle` it, send the reply, *then* `backend.run_pending()` -- the
  frontend may block on our ack while holding a lock (UML does), so rings start only afterwards;
- a backend-channel message: the frontend's REPLY_ACK to one of our requests (read here, in the
  same loop, never by blocking after sending: the frontend may be sending us a request meanwhile);
- a kick fd: read it once (poll said readable, so the read cannot block even on the frontend's
  blocking file description) and process the ring;
- rings in polling mode (SET_VRING_KICK with NOFD) are processed on every wake-up, at least
  every `POLL_INTERVAL_MS`;
- the device's own host fds and timers (a net device's tap, a rate limiter's refill), kept in
  step with `poll_fds()` / `next_deadline_ns()` after every dispatch (`virtio.hostfds.HostFds`),
  as in a `bulkhead run` device process.

Returns when the frontend disconnects (0) or breaks the protocol (1); the process then exits and
its launcher waits for the next frontend.
"""

from __future__ import annotations

import logging
import os
import select
import socket
from ipc_protocol import vhost_user as vu
from ipc_protocol.errors import PeerGone, ProtocolError
from ipc_protocol.transport.vhost_user_socket import VhostUserSocket

from device_procs.virtio.hostfds import HostFds

from ipc_protocol.vhost_user_journal import DeviceJournal

from .backend import VhostUserBackend

log = logging.getLogger(__name__)

EXIT_DISCONNECTED, EXIT_PROTOCOL = 0, 1
POLL_INTERVAL_MS = 1
_READABLE = select.POLLIN | select.POLLHUP | select.POLLERR


def describe(err: BaseException) -> str:
    """An exception in one line, with where it was raised -- without reading source files (the
    jail has none to read: traceback's line lookups would open(2) and be killed)."""
    tb = err.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    where = f" at {tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else ""
    return f"{type(err).__name__}: {err}{where}"


class Server:
    """Serves one connected frontend for `backend`; `run()` until it leaves."""

    def __init__(self, backend: VhostUserBackend, conn: socket.socket,
                 journal: DeviceJournal | None = None) -> None:
        self.backend = backend
        self.journal = journal
        self.conn = VhostUserSocket(conn, vu.Channel.FRONTEND, incoming="requests")
        self.channel: VhostUserSocket | None = None
        self._generation = -1
        self._poller = select.poll()
        self._kicks: dict[int, int] = {}
        self._host_fds = HostFds(self._poller)

    def _rewatch(self) -> None:
        """Follow the backend's fd set (kick fds, backend channel) when it changed."""
        b = self.backend
        if self._generation == b.generation:
            return
        self._generation = b.generation
        if b.channel_fd is None and self.channel is not None:
            self.channel.sock.detach()  # the backend closed (or handed back) that fd
            self.channel = None
        elif b.channel_fd is not None and (self.channel is None
                                           or self.channel.fileno() != b.channel_fd):
            if self.channel is not None:
                self.channel.sock.detach()  # the backend closed the replaced fd itself
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=b.channel_fd)
            self.channel = VhostUserSocket(sock, vu.Channel.BACKEND, incoming="replies")
        self._kicks = b.kick_fds()
        self._poller = select.poll()
        self._host_fds = HostFds(self._poller)
        for fd in (self.conn.fileno(), *self._kicks):
            self._poller.register(fd, select.POLLIN)
        if self.channel is not None:
            self._poller.register(self.channel.fileno(), select.POLLIN)

    def run(self) -> int:
        try:
            while True:
                self._flush_outbox()
                self._rewatch()
                device = self.backend.device
                self._host_fds.sync(device.poll_fds())
                timeout = self._host_fds.timeout_ms(
                    device.next_deadline_ns(), POLL_INTERVAL_MS if self.backend.polling else None)
                for fd, events in self._poller.poll(timeout):
                    if self._host_fds.owns(fd):
                        device.on_ready(fd, self._host_fds.to_select(events))
                    elif fd == self.conn.fileno():
                        self._on_message()
                        if self._generation != self.backend.generation:
                            break  # fds may have been closed or replaced: poll afresh
                    elif self.channel is not None and fd == self.channel.fileno():
                        self._on_channel()
                    elif fd in self._kicks and events & _READABLE:
                        self._on_kick(fd)
                self._host_fds.fire_timer(device)
                if self.backend.polling:
                    self.backend.poll_rings()
        except PeerGone as err:
            log.info("frontend left: %s", err)
            return EXIT_DISCONNECTED
        except ProtocolError as err:
            log.error("frontend broke the protocol: %s", err)
            return EXIT_PROTOCOL
        finally:
            if self.channel is not None:  # the backend owns (and closes) that fd
                self.channel.sock.detach()
                self.channel = None

    def _on_message(self) -> None:
        msg = self.conn.recv()
        log.debug("<- %r", msg)
        if self.journal is not None:
            self.journal.record(msg)  # before applying it: a successor must see it
        self._apply(msg, reply=True)
        self.backend.run_pending()

    def _apply(self, msg: vu.Message, *, reply: bool) -> None:
        answer = self.backend.handle(msg)
        if answer is not None and reply:
            log.debug("-> %r", answer)
            self.conn.send(answer)
        if self.journal is not None and reply:
            self.journal.done()

    def resume(self) -> None:
        """Rebuild the session from the journal (the frontend is still connected and knows
        nothing): apply every request silently, answer the one the predecessor did not finish,
        then continue each served ring from the guest's used index."""
        assert self.journal is not None
        records = self.journal.replay()
        for msg, unfinished in records:
            self._apply(msg, reply=unfinished)  # rings are not processed before their positions
        self.backend.resume_rings()             # are fixed here
        log.info("resumed the session: %d requests replayed", len(records))

    def _on_channel(self) -> None:
        assert self.channel is not None
        try:
            reply = self.channel.recv()
        except PeerGone:
            log.info("the frontend closed the backend channel")
            self.channel.close()
            self.channel = None
            self.backend.backend_channel_closed()
            return
        self.backend.on_backend_reply(reply)

    def _on_kick(self, fd: int) -> None:
        try:
            os.read(fd, 8)  # an eventfd hands over its counter; a socket or pipe its bytes
        except BlockingIOError:
            return
        except OSError as err:
            log.warning("kick fd of ring %d: %s", self._kicks[fd], err)
            return
        self.backend.kick(self._kicks[fd])

    def _flush_outbox(self) -> None:
        outbox = self.backend.outbox
        while outbox and self.channel is not None:
            msg = outbox.pop(0)
            try:
                self.channel.send(msg)
            except PeerGone:
                self.channel.close()
                self.channel = None
                self.backend.backend_channel_closed()
