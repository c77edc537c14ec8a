"""The core's error hierarchy.  Every message says what went wrong and what to do about it."""


class BulkheadError(Exception):
    """Base of all errors the core reports to a user (CLI prints `str(err)` on one line, exit 2)."""


class ConfigError(BulkheadError):
    """A flag, path or config value is wrong."""


class KvmError(BulkheadError):
    """KVM is missing, refused an ioctl, or lacks a capability we need."""

    errno: int = 0

    def with_errno(self, errno: int) -> "KvmError":
        self.errno = errno
        return self


class GuestMemoryError(BulkheadError):
    """A guest physical address range is not backed by guest RAM.

    Raised only by the checked accessors of `GuestMemory`; device code catches it at the request
    boundary and turns it into a device error status, so it never ends a process by accident.
    """


class BusError(BulkheadError):
    """A bus range overlaps another or is malformed."""


class BootError(BulkheadError):
    """A kernel, initrd or command line cannot be loaded."""
