"""Listening on a Unix socket path the user named (vhost-user sockets, the vsock broker)."""

from __future__ import annotations

import os
import socket
import stat

from .errors import BulkheadError


def listen(path: str, what: str = "--socket", backlog: int = 1) -> socket.socket:
    """Listen on `path`; a stale socket (nobody listening) is replaced, anything else refused.
    Errors name `what` (the flag or key that gave the path)."""
    if os.path.lexists(path):
        if not stat.S_ISSOCK(os.lstat(path).st_mode):
            raise BulkheadError(f"{what} {path} exists and is not a socket: remove it or choose "
                                "another path")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        try:
            probe.connect(path)
        except ConnectionRefusedError:
            os.unlink(path)  # a leftover of a backend that is gone
        except OSError as err:
            raise BulkheadError(f"{what} {path}: cannot check the existing socket: {err.strerror}") from None
        else:
            raise BulkheadError(f"{what} {path}: another process is listening there")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        sock.listen(backlog)
    except OSError as err:
        sock.close()
        raise BulkheadError(f"{what} {path}: cannot listen there: {err.strerror}") from None
    return sock
