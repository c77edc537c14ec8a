"""Bulkhead's core <-> device-process protocol.

Pure, sans-I/O parts (h11 style) sit at the top level and work over any buffer:

- `ring`: the MMIO request/response rings (slot layout, SPSC indices, validation).
- `messages`: the control messages (closed set, msgpack codec, version handshake).

The thin transports that move those bytes live in `ipc_protocol.transport`
(`shm_ring`: memfd + eventfds, `zmq_channel`: ZeroMQ, `fds`: SCM_RIGHTS).
"""

from .errors import (LocalProtocolError, PeerGone, ProtocolError, RemoteProtocolError,
                     TransportTimeout)

__all__ = ["ProtocolError", "LocalProtocolError", "RemoteProtocolError", "TransportTimeout",
           "PeerGone"]
