"""The vhost-user backend's errors.  The doc text of each class says what it means to the user."""

from __future__ import annotations

from ipc_protocol.errors import BulkheadError


class VhostUserError(BulkheadError):
    """The frontend asked for something this backend cannot do (a bad memory table, a ring outside
    it, an unsupported feature): the request is refused -- a non-zero REPLY_ACK status when the
    frontend asked for one, else the connection is closed, since the frontend would otherwise
    carry on believing it succeeded."""
