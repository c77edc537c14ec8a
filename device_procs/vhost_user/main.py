"""A jailed vhost-user device process: `python -m device_procs.vhost_user.main --type blk ...`.

Started by the `bulkhead device` launcher (`vmm_core.vhost_device`) through `jail.sandbox.spawn`,
once per frontend connection.  Its life, in order:

1. inherit its fds from the launcher: the connected vhost-user socket (accepted outside the jail:
   device policies forbid accept) and the host resources (the disk image, the console output,
   the tap);
2. build the device on duplicates of those fds (it never opens a path), wrap the socket,
   create, seal and map the inflight memfd;
3. **enter the jail** (the marked call site) -- before reading a single frontend byte;
4. with `--resume` (its predecessor died while the frontend stayed connected), replay the
   session from the launcher's journal (`ipc_protocol.vhost_user_journal`);
5. serve the frontend until it leaves (`serve.Server`), journalling every request, then exit:
   0 when it disconnected, 1 when it broke the protocol or the device failed.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys

# Imported now, not on first use: once jailed, open(2) (and so any import) kills the process.
from device_procs.virtio import DeviceSpecError, VirtioDevice, create_device
from jail.errors import JailError
from jail.sandbox import ENV_VAR as JAIL_ENV, enter_jail

from ipc_protocol.vhost_user_journal import DeviceJournal

from .backend import InflightStore, VhostUserBackend
from .serve import EXIT_PROTOCOL, Server, describe

log = logging.getLogger("device_procs.vhost_user")

EXIT_SETUP = 2
DEVICE_TYPES = ("blk", "console", "rng", "net", "vsock")


def parse_args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="device_procs.vhost_user.main")
    p.add_argument("--type", required=True, choices=DEVICE_TYPES, dest="device_type")
    p.add_argument("--socket-fd", type=int, required=True, help="the connected frontend socket")
    p.add_argument("--disk-fd", type=int, help="blk: the image, opened by the launcher")
    p.add_argument("--readonly", action="store_true", help="blk: refuse writes (VIRTIO_BLK_F_RO)")
    p.add_argument("--output-fd", type=int, help="console: where the guest's output goes")
    p.add_argument("--tap-fd", type=int, help="net: the tap, opened by the launcher")
    p.add_argument("--mac", help="net: the guest's MAC")
    p.add_argument("--mtu", type=int, default=1500, help="net: the tap's MTU")
    p.add_argument("--broker-fd", type=int, help="vsock: the launcher's broker socket")
    p.add_argument("--cid", type=int, help="vsock: the guest's CID")
    p.add_argument("--max-connections", type=int, default=256, help="vsock: connections at once")
    p.add_argument("--journal-fd", type=int, help="the launcher's session journal (resumable)")
    p.add_argument("--resume", action="store_true",
                   help="replay the journal first: the predecessor of this process died")
    p.add_argument("--log-level", default="WARNING")
    return p.parse_args(argv)


def build_device(args: argparse.Namespace) -> VirtioDevice:
    """The device, on duplicates of the launcher's fds (which are closed here)."""
    spec: dict = {"type": args.device_type}
    fds: dict[str, int] = {}
    if args.device_type == "blk":
        if args.disk_fd is None:
            raise DeviceSpecError("blk needs --disk-fd")
        spec["readonly"] = args.readonly
        fds["disk"] = args.disk_fd
    elif args.device_type == "console":
        if args.output_fd is None:
            raise DeviceSpecError("console needs --output-fd")
        fds["output"] = args.output_fd
    elif args.device_type == "net":
        if args.tap_fd is None or args.mac is None:
            raise DeviceSpecError("net needs --tap-fd and --mac")
        spec.update(mac=args.mac, mtu=args.mtu)
        fds["tap"] = args.tap_fd
    elif args.device_type == "vsock":
        if args.broker_fd is None or args.cid is None:
            raise DeviceSpecError("vsock needs --broker-fd and --cid")
        spec.update(cid=args.cid, max_connections=args.max_connections)
        fds["broker"] = args.broker_fd
    try:
        return create_device(spec, fds)
    finally:
        for fd in fds.values():
            os.close(fd)


def _set_title(device_type: str) -> None:
    """`bulkhead-vhost:blk` in ps (cosmetic)."""
    try:
        import prctl

        prctl.set_name(f"bhvu:{device_type}")
        prctl.set_proctitle(f"bulkhead-vhost:{device_type}")
    except Exception:  # noqa: BLE001 - never a reason not to serve
        pass


def main(argv: list[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=args.log_level, stream=sys.stderr,
                        format=f"%(asctime)s vhost-{args.device_type}[%(process)d] "
                               "%(levelname)s %(message)s")
    _set_title(args.device_type)
    try:
        conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM, 0, fileno=args.socket_fd)
        device = build_device(args)
        backend = VhostUserBackend(device, inflight_store=InflightStore.create(device))
        journal = DeviceJournal(args.journal_fd) if args.journal_fd is not None else None
    except (OSError, DeviceSpecError) as err:
        log.error("cannot start: %s", err)
        return EXIT_SETUP

    # ---- JAIL ENTRY POINT ---------------------------------------------------------------------
    # Everything is imported, the device holds its fds, the inflight memfd exists; nothing from the
    # frontend has been read.  enter_jail: tmpfs root + pivot_root, capabilities dropped,
    # rlimits, no_new_privs, seccomp (kill by default).  From here on, every fd comes from the
    # frontend over the socket, and nothing can be opened.
    if os.environ.get(JAIL_ENV):
        try:
            enter_jail()
        except JailError as err:
            log.error("%s", err)
            return EXIT_SETUP
    # ---------------------------------------------------------------------------------------------

    try:
        server = Server(backend, conn, journal)
        if args.resume:
            if journal is None:
                log.error("--resume needs --journal-fd")
                return EXIT_SETUP
            server.resume()
        return server.run()
    except Exception as err:  # a device bug: say where, then exit for the next frontend
        log.error("device failed: %s", describe(err))
        return EXIT_PROTOCOL
    finally:
        log.info("session counters: %s; device: %s", backend.stats(),
                 {k: v for k, v in device.stats().items() if v})
        backend.close()
        device.close()
        conn.close()
        if journal is not None:
            journal.close()


if __name__ == "__main__":
    sys.exit(main())
