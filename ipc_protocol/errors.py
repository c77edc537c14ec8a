"""The protocol's error hierarchy (after h11's `LocalProtocolError` / `RemoteProtocolError`).

Who broke the protocol decides what the caller does:

- `LocalProtocolError`: *we* misused the API (a bug on our side: a slot too big, a message field
  out of range).  Never caused by the peer, so never caught to "recover".
- `RemoteProtocolError`: the *peer* sent something invalid.  For the core the peer is an untrusted
  device process, so this is an expected event: the core marks that device failed and goes on.
- `TransportTimeout`: the peer said nothing in time (dead, hung or descheduled).

Errors cross the process boundary only as `messages.ErrorReport(code, text)`, never pickled.
"""

from __future__ import annotations


class BulkheadError(Exception):
    """Root of every error Bulkhead reports to a person (one line: what went wrong, what to do).

    Shared by the core and the device processes; each package derives its own family from it."""


class ProtocolError(BulkheadError):
    """Base class; `str(err)` is one line saying what went wrong."""


class LocalProtocolError(ProtocolError):
    """We tried to send or build something the protocol forbids (a bug in the caller)."""


class RemoteProtocolError(ProtocolError):
    """The peer sent bytes that violate the protocol; treat the peer as failed."""


class TransportTimeout(ProtocolError):
    """The peer did not answer within the allotted time."""


class PeerGone(ProtocolError):
    """The peer closed its end or its process exited."""
