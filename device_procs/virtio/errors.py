"""The virtio package's errors.  The doc text of each class says what it means to the user."""

from __future__ import annotations

from ipc_protocol.errors import BulkheadError


class VirtioError(BulkheadError):
    """Base of the errors raised by `device_procs.virtio`."""


class QueueError(VirtioError):
    """The guest driver broke a virtqueue rule (VIRTIO 1.2 §2.7): the queue cannot be used.

    Raised while validating a queue's configuration or walking a descriptor chain.  The device
    turns it into DEVICE_NEEDS_RESET (§2.1.2); it never escapes `process_queue`.
    """


class DeviceSpecError(VirtioError, ValueError):
    """A device spec (the dict given to `create_device`) is invalid; the message names the field."""
