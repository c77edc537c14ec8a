"""The control channel: ZeroMQ over an `ipc://` endpoint in a private per-VM runtime directory.

Socket pattern: the core binds one **ROUTER** per VM; every device process connects a **DEALER**
whose routing id names the device *and its incarnation* (``b"blk0.1"``, ``b"blk0.2"`` after a
restart).  Why not one PAIR per device:

- one bound socket and one poll target serve every device (the supervisor's loop stays small);
- a restarted child gets a new routing id, so a late message from its killed predecessor is
  recognisable and dropped instead of being mistaken for the new child's (PAIR has no identity
  and accepts one peer only, which makes replacing a peer fragile);
- ROUTER_MANDATORY turns "send to a device that is gone" into an error instead of a silent drop.

Every receive is bounded by a timeout and validated: exactly two frames on the ROUTER (id,
payload), one on the DEALER, payload size-limited (also enforced by libzmq with MAXMSGSIZE, which
drops a peer sending more) and decoded by `messages.decode`.

ZeroMQ sockets are not thread-safe: each object here guards its socket with a lock, so use one
from several threads only for short sends; run receives from one thread (the supervisor).
"""

from __future__ import annotations

import collections
import os
import stat
import tempfile
import threading
import time
from pathlib import Path

import zmq

from ..errors import LocalProtocolError, RemoteProtocolError, TransportTimeout
from ..messages import MAX_MESSAGE_BYTES, Message, decode, encode

SUN_PATH_MAX = 107  # sizeof(sockaddr_un.sun_path) - 1 on Linux
MAX_PEER_ID = 64
INBOX_LIMIT = 256   # messages buffered per peer before the oldest is dropped


class PeerProtocolError(RemoteProtocolError):
    """A message from the peer `peer` (routing id) was invalid."""

    def __init__(self, peer: bytes, text: str) -> None:
        super().__init__(f"{peer.decode(errors='replace')}: {text}")
        self.peer = peer


def make_runtime_dir(vm_name: str, base: str | os.PathLike[str] | None = None) -> Path:
    """Create a fresh private directory (mode 0700) for one VM's sockets.

    `mkdtemp` creates it atomically with a unique name and mode 0700, so no other user can plant a
    socket or symlink there; we still verify owner and mode because `base` may be anything.
    """
    if not vm_name.isascii() or not vm_name.replace("-", "").replace("_", "").isalnum() or len(vm_name) > 32:
        raise LocalProtocolError(f"VM name {vm_name!r} must be 1-32 letters, digits, '-' or '_'")
    parent = base if base is not None else os.environ.get("XDG_RUNTIME_DIR") or tempfile.gettempdir()
    path = Path(tempfile.mkdtemp(prefix=f"bulkhead-{vm_name}-", dir=parent))
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode) or st.st_uid != os.getuid() or stat.S_IMODE(st.st_mode) != 0o700:
        raise LocalProtocolError(f"runtime directory {path} is not a private 0700 directory")
    return path


def ipc_endpoint(runtime_dir: Path, name: str = "control") -> str:
    path = str(Path(runtime_dir) / f"{name}.sock")
    if len(path.encode()) > SUN_PATH_MAX:
        raise LocalProtocolError(
            f"socket path {path} is longer than {SUN_PATH_MAX} bytes: use a shorter runtime directory")
    return f"ipc://{path}"


def _configure(sock: zmq.Socket) -> None:
    sock.setsockopt(zmq.LINGER, 200)  # let a last Shutdown/Ack leave, but never hang at exit
    sock.setsockopt(zmq.MAXMSGSIZE, MAX_MESSAGE_BYTES + 1024)


class ControlServer:
    """The core's end: a ROUTER bound in the runtime directory, talking to every device."""

    def __init__(self, runtime_dir: Path, name: str = "control",
                 context: zmq.Context | None = None) -> None:
        self.endpoint = ipc_endpoint(runtime_dir, name)
        self._context = context or zmq.Context.instance()
        self._sock = self._context.socket(zmq.ROUTER)
        _configure(self._sock)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        self._sock.bind(self.endpoint)
        os.chmod(self.endpoint[len("ipc://"):], 0o600)
        self._lock = threading.Lock()
        self._inbox: dict[bytes, collections.deque[Message]] = collections.defaultdict(
            lambda: collections.deque(maxlen=INBOX_LIMIT))

    @property
    def socket(self) -> zmq.Socket:
        """For a `zmq.Poller` in the owner's loop."""
        return self._sock

    def send(self, peer: bytes, msg: Message) -> None:
        data = encode(msg)
        with self._lock:
            try:
                self._sock.send_multipart([peer, data], flags=zmq.NOBLOCK)
            except zmq.ZMQError as err:  # EHOSTUNREACH: peer gone (ROUTER_MANDATORY); EAGAIN: full
                raise TransportTimeout(f"cannot send {msg.TAG} to {peer!r}: {err}") from None

    def _recv_one(self, timeout: float) -> tuple[bytes, Message]:
        if not self._sock.poll(max(0, int(timeout * 1000))):
            raise TransportTimeout(f"no control message within {timeout * 1000:.0f} ms")
        frames = self._sock.recv_multipart(flags=zmq.NOBLOCK, copy=True)
        if len(frames) != 2:
            peer = frames[0] if frames else b"?"
            raise PeerProtocolError(peer, f"control message has {len(frames) - 1} payload frames, not 1")
        peer, payload = frames
        if not 0 < len(peer) <= MAX_PEER_ID:
            raise PeerProtocolError(b"?", "control message from a peer with a bad routing id")
        try:
            return peer, decode(payload)
        except RemoteProtocolError as err:
            raise PeerProtocolError(peer, str(err)) from None

    def recv(self, timeout: float, peer: bytes | None = None) -> tuple[bytes, Message]:
        """The next message (from `peer` only, if given; others are kept for later calls)."""
        deadline = time.monotonic() + timeout
        with self._lock:
            while True:
                for who, box in self._inbox.items():
                    if box and (peer is None or who == peer):
                        return who, box.popleft()
                who, msg = self._recv_one(max(0.0, deadline - time.monotonic()))
                if peer is None or who == peer:
                    return who, msg
                self._inbox[who].append(msg)

    def forget(self, peer: bytes) -> None:
        """Drop anything buffered from `peer` (a dead incarnation)."""
        with self._lock:
            self._inbox.pop(peer, None)

    def close(self) -> None:
        with self._lock:
            self._sock.close(linger=0)


class ControlClient:
    """The device's end: a DEALER connected to the core's ROUTER with routing id `identity`."""

    def __init__(self, endpoint: str, identity: bytes,
                 context: zmq.Context | None = None) -> None:
        if not 0 < len(identity) <= MAX_PEER_ID or identity[:1] == b"\0":
            raise LocalProtocolError(f"bad routing id {identity!r} (1..{MAX_PEER_ID} bytes, no leading NUL)")
        self._context = context or zmq.Context.instance()
        self._sock = self._context.socket(zmq.DEALER)
        _configure(self._sock)
        self._sock.setsockopt(zmq.ROUTING_ID, identity)
        self._sock.connect(endpoint)
        self._lock = threading.Lock()

    @property
    def socket(self) -> zmq.Socket:
        return self._sock

    def send(self, msg: Message, timeout: float = 1.0) -> None:
        data = encode(msg)
        with self._lock:
            if not self._sock.poll(int(timeout * 1000), zmq.POLLOUT):
                raise TransportTimeout(f"cannot send {msg.TAG}: the core is not accepting messages")
            self._sock.send(data, flags=zmq.NOBLOCK)

    def try_recv(self) -> Message | None:
        with self._lock:
            try:
                frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
            except zmq.Again:
                return None
        if len(frames) != 1:
            raise RemoteProtocolError(f"control message has {len(frames)} frames, not 1")
        return decode(frames[0])

    def recv(self, timeout: float) -> Message:
        with self._lock:
            ready = self._sock.poll(max(0, int(timeout * 1000)))
        if not ready:
            raise TransportTimeout(f"no control message within {timeout * 1000:.0f} ms")
        msg = self.try_recv()
        if msg is None:
            raise TransportTimeout("control message vanished")
        return msg

    def close(self, linger_ms: int = 200) -> None:
        with self._lock:
            self._sock.close(linger=linger_ms)
