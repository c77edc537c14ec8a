"""The core's error hierarchy.  Every message says what went wrong and what to do about it.

`BulkheadError` (the root, which the CLI prints on one line with exit status 2) and
`GuestMemoryError` are shared with the device processes and live in `ipc_protocol`.
"""

from ipc_protocol.errors import BulkheadError
from ipc_protocol.guest_memory import GuestMemoryError

__all__ = ["BulkheadError", "ConfigError", "KvmError", "GuestMemoryError", "BusError", "BootError"]


class ConfigError(BulkheadError):
    """A flag, path or config value is wrong."""


class KvmError(BulkheadError):
    """KVM is missing, refused an ioctl, or lacks a capability we need."""

    errno: int = 0

    def with_errno(self, errno: int) -> "KvmError":
        self.errno = errno
        return self


class BusError(BulkheadError):
    """A bus range overlaps another or is malformed."""


class BootError(BulkheadError):
    """A kernel, initrd or command line cannot be loaded."""
