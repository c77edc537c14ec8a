"""vhost-user backends: Bulkhead's virtio devices served to any vhost-user frontend.

- `backend.VhostUserBackend`: the transport state machine over a `VirtioDevice` (pure but for a
  small fd port, `BackendIo`); `inflight`: the inflight I/O tracking buffer and `InflightQueue`;
- `serve.Server`: the poll loop over the connection, the backend channel and the kick fds;
- `main`: the jailed process the `bulkhead device` launcher starts for each frontend.

The codec is `ipc_protocol.vhost_user`; the socket transport `ipc_protocol.transport.vhost_user_socket`.
"""

from .backend import BackendIo, InflightStore, OsIo, VhostUserBackend
from .errors import VhostUserError

__all__ = ["VhostUserBackend", "BackendIo", "OsIo", "InflightStore", "VhostUserError"]
