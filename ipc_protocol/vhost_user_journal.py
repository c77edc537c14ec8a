"""The session journal: how a vhost-user device process can be replaced without the frontend noticing.

A frontend such as UML's `virtio_uml` never reconnects: when its backend's socket closes, the
device is gone until the guest reboots.  So the `bulkhead device` launcher keeps its own copy of
the connection, and the device process tells it, over a SOCK_SEQPACKET socketpair, every request
the frontend sent (with the request's fds) *before* applying it.  When the device process dies
while the frontend is still connected, the launcher starts a fresh one on the same connection
and plays the journal to it: the new process applies every request again (sending no replies),
resumes each served ring from the used index it finds in guest memory (or from its inflight
records), and serves on.  The frontend sees a pause.

Records (one datagram each; fds as SCM_RIGHTS):

    device -> launcher   b"M" + message   a request, about to be applied (its fds attached)
                         b"D"             the last request is applied and its reply is out
    launcher -> device   b"M" + message   a request to apply again, silently
                         b"U" + message   the last one, which its predecessor did not finish:
                                          apply it and send its reply
                         b"E"             end of the journal

`message` is the request as `vhost_user.encode` writes it on the wire.  This module is shared by
both ends; the launcher never applies a record, it only keeps them (and the device that wrote
them is no more trusted than any other: records are bounded in number, size and fds).
"""

from __future__ import annotations

import array
import os
import socket
from dataclasses import dataclass, field

from . import vhost_user as vu
from .errors import RemoteProtocolError
from .transport.fds import fds_from_ancdata

MAX_RECORD = 64 * 1024   # larger than any request (a full memory table is 8 + 8 * 32 bytes)
MAX_RECORDS = 4096       # a session longer than this is no longer kept (replay would be slow)
MAX_FDS = 512
_ANCILLARY = socket.CMSG_SPACE(vu.MAX_FDS * array.array("i").itemsize)

MESSAGE, DONE, UNFINISHED, END = b"M", b"D", b"U", b"E"
# Requests that change no state: dropped from the journal once answered (UML sends GET_CONFIG
# once per config byte it reads).
_PURE = frozenset((vu.Request.GET_FEATURES, vu.Request.GET_PROTOCOL_FEATURES,
                   vu.Request.GET_QUEUE_NUM, vu.Request.GET_CONFIG,
                   vu.Request.GET_MAX_MEM_SLOTS, vu.Request.GET_STATUS))


def send_record(sock: socket.socket, tag: bytes, data: bytes = b"", fds: list[int] | tuple[int, ...] = ()) -> None:
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] if fds else []
    sock.sendmsg([tag + data], anc)


def recv_record(sock: socket.socket, flags: int = 0) -> tuple[bytes, bytes, list[int]]:
    """(tag, data, fds); (b"", b"", []) at EOF.  A truncated record is a protocol error."""
    data, ancdata, msg_flags, _ = sock.recvmsg(MAX_RECORD + 1, _ANCILLARY,
                                               socket.MSG_CMSG_CLOEXEC | flags)
    fds, other = fds_from_ancdata(ancdata)
    if msg_flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC) or other:
        for fd in fds:
            os.close(fd)
        raise RemoteProtocolError("journal record too large, with too many fds or other "
                                  "control data")
    return data[:1], data[1:], fds


def decode(data: bytes, fds: list[int]) -> vu.Message:
    """A journalled request (as the frontend sent it); its fds go with the message."""
    if len(data) < vu.HEADER_SIZE:
        raise RemoteProtocolError("journal record shorter than a vhost-user header")
    header = vu.parse_header(data[:vu.HEADER_SIZE])
    return vu.decode_request(header, data[vu.HEADER_SIZE:], fds, vu.Channel.FRONTEND)


class DeviceJournal:
    """The device's end: `record` before applying a request, `done` once its reply is out,
    `replay` (at start, when resuming) the launcher's copy."""

    def __init__(self, fd: int) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)

    def record(self, msg: vu.Message) -> None:
        data, fds = vu.encode(msg)
        send_record(self.sock, MESSAGE, data, fds)

    def done(self) -> None:
        self.sock.send(DONE)

    def replay(self) -> list[tuple[vu.Message, bool]]:
        """The launcher's records: (request, unfinished) in order."""
        out: list[tuple[vu.Message, bool]] = []
        while True:
            tag, data, fds = recv_record(self.sock)
            if tag == END:
                return out
            if tag not in (MESSAGE, UNFINISHED):
                for fd in fds:
                    os.close(fd)
                raise RemoteProtocolError(f"journal replay: unexpected record {tag!r}")
            out.append((decode(data, fds), tag == UNFINISHED))

    def close(self) -> None:
        self.sock.close()


@dataclass
class Record:
    data: bytes
    fds: list[int]

    @property
    def request(self) -> int:
        return int.from_bytes(self.data[:4], "little") if len(self.data) >= 4 else -1


@dataclass
class SessionJournal:
    """The launcher's copy of one frontend session (it owns the records' fds)."""

    records: list[Record] = field(default_factory=list)
    open_record: bool = False   # the last record has no DONE yet
    overflow: str | None = None  # why the session can no longer be resumed

    def fd_count(self) -> int:
        return sum(len(r.fds) for r in self.records)

    def take(self, sock: socket.socket) -> bool:
        """Read one record from the device; False at EOF (the device is gone)."""
        try:
            tag, data, fds = recv_record(sock, socket.MSG_DONTWAIT)
        except BlockingIOError:
            return True
        except RemoteProtocolError as err:
            self._give_up(str(err))
            return True
        except OSError:
            return False
        if not tag:
            return False
        if tag == MESSAGE and self.overflow is None:
            self.records.append(Record(data, fds))
            self.open_record = True
            if len(self.records) > MAX_RECORDS or self.fd_count() > MAX_FDS:
                self._give_up(f"the session passed {MAX_RECORDS} requests or {MAX_FDS} fds")
        elif tag == DONE and self.records and self.open_record:
            self.open_record = False
            if self.records[-1].request in _PURE:
                self._drop(self.records.pop())
        else:
            for fd in fds:
                os.close(fd)
            if tag not in (MESSAGE, DONE):
                self._give_up(f"the device sent a record it should not ({tag!r})")
        return True

    def play(self, sock: socket.socket) -> None:
        """Send every record to a fresh device process (the last one as UNFINISHED if it is)."""
        for i, record in enumerate(self.records):
            last = i == len(self.records) - 1
            send_record(sock, UNFINISHED if last and self.open_record else MESSAGE,
                        record.data, record.fds)
        sock.send(END)

    def _drop(self, record: Record) -> None:
        for fd in record.fds:
            os.close(fd)
        record.fds = []

    def _give_up(self, why: str) -> None:
        if self.overflow is None:
            self.overflow = why
        self.clear()

    def clear(self) -> None:
        for record in self.records:
            self._drop(record)
        self.records = []
        self.open_record = False
