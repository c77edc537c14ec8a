"""A device the core fronts for an external vhost-user backend (`--disk vhost-user=S`,
`--vhost-user type=N,socket=S`, `--fs socket=S,tag=T`): its spec turned into the frontend's."""

from __future__ import annotations

import struct
from typing import Any

from ipc_protocol import virtio_mmio as regs

from ..errors import ConfigError
from ..memory import GuestMemory
from ..vhost_frontend.connection import BackendRefused
from ..vhost_frontend.device import FrontendSpec, VhostUserFrontend
from .spec import DeviceSpec

FS_TAG_BYTES = 36
MAX_QUEUES = {"blk": 8, "fs": regs.MAX_QUEUES - 1}


def frontend_spec(spec: DeviceSpec) -> FrontendSpec:
    kind = spec.device_kind
    where = f"--{kind.flag} (device {spec.name})"
    queues = int(spec.params.get("queues") or 1)
    if not 1 <= queues <= MAX_QUEUES.get(spec.kind, regs.MAX_QUEUES):
        raise ConfigError(f"{where}: queues={queues}: give 1 to "
                          f"{MAX_QUEUES.get(spec.kind, regs.MAX_QUEUES)}")
    timeout = spec.params.get("reconnect_timeout")
    if timeout is not None and timeout < 1:
        raise ConfigError(f"{where}: reconnect-timeout={timeout}: give whole seconds, at least 1")
    local_config = None
    virtio_id = kind.virtio_id
    if spec.kind == "vhost-user":
        virtio_id = spec.params["type"]
        if not 1 <= virtio_id <= 63:
            raise ConfigError(f"{where}: type={virtio_id} is not a virtio device id (1..63)")
    if spec.kind == "fs":
        tag = spec.params["tag"].encode()
        if len(tag) > FS_TAG_BYTES:
            raise ConfigError(f"{where}: tag is {len(tag)} bytes, at most {FS_TAG_BYTES}")
        # VIRTIO 1.2 §5.11.4: tag[36] (NUL-padded), le32 num_request_queues.
        local_config = tag.ljust(FS_TAG_BYTES, b"\0") + struct.pack("<I", queues)
    return FrontendSpec(spec.name, spec.frontend_socket or "", virtio_id, spec.queue_count,
                        reconnect=spec.params.get("reconnect") is not False,
                        reconnect_timeout=None if timeout is None else float(timeout),
                        local_config=local_config)


class FrontendBackend:
    """The device manager's handle on one vhost-user frontend device."""

    def __init__(self, spec: DeviceSpec, memory: GuestMemory, irqfd: int, kick_fds: list[int]) -> None:
        self.spec = spec
        self.name = spec.name
        self.device = VhostUserFrontend(frontend_spec(spec), memory, irqfd, kick_fds)
        try:
            self.device.start_backend()
        except (BackendRefused, OSError) as err:
            self.device.close()
            raise ConfigError(f"device {spec.name}: {err}") from None
        self.bus_device = self.device

    def start(self) -> None:
        self.device.start()

    def describe(self) -> dict[str, Any]:
        return self.device.describe()

    def stats(self) -> dict[str, Any]:
        return self.device.stats()

    def close(self) -> None:
        self.device.close()
