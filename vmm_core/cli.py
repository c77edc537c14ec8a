"""`bulkhead`: the command line.  Bad input gets one clear line on stderr and exit status 2."""

from __future__ import annotations

import argparse
import logging
import math
import os
import sys

from .boot import DEFAULT_LINUX_CMDLINE
from .devices.options import DEFAULT_DEVICE_CPU_QUOTA, DEFAULT_DEVICE_MEMORY, DEFAULT_START_TIMEOUT
from .errors import BulkheadError

EXIT_USAGE = 2

RUN_EXAMPLES = f"""\
examples:
  bulkhead run --kernel guest_kit/build/testguest.elf --cmdline 'gk.tests=pio,mmio'
  bulkhead run --kernel vmlinuz --initrd initrd.img --mem 512 --vcpus 2
      (a Linux kernel without --cmdline gets:
       {DEFAULT_LINUX_CMDLINE})
  bulkhead guest fetch          # Debian's cloud kernel + a busybox initramfs, cached
  bulkhead demo
  bulkhead run --kernel guest_kit/build/testguest.elf --rng --hold --name web1 --allow-faults
  bulkhead ps                              # running VMs, their device processes and restarts
  bulkhead stats web1 [--json]             # per-device counters, recovery times, read latency
  bulkhead fault web1 rng0 kill            # kill|hang|slow MS|bad-reply|crash-in-request|seccomp
  bulkhead stop web1                       # the VM exits with status 0

exit status: the guest's own code (test guest EXIT register / debug port 0x501), 0 on ACPI
power-off, 65 guest reset, 66 fatal vCPU error, 67 a device failure stopped the VM,
129 SIGHUP, 130 Ctrl-C, 143 SIGTERM (each a full teardown), 2 bad input.
"""


class _Parser(argparse.ArgumentParser):
    """argparse that prints one line and exits 2 (not a usage dump) on bad input."""

    def error(self, message: str) -> None:  # type: ignore[override]
        print(f"bulkhead: {message} (see --help)", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _positive_int(text: str) -> int:
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"{value} must be at least 1")
    return value


def _seconds(text: str) -> float:
    from .devices.options import MAX_TIMEOUT
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds") from None
    if not math.isfinite(value) or not 0 < value <= MAX_TIMEOUT:
        raise argparse.ArgumentTypeError(f"{text} must be above 0 and at most {MAX_TIMEOUT:g} s")
    return value


def _milliseconds(text: str) -> int:
    value = _positive_int(text)
    if value > 60_000:
        raise argparse.ArgumentTypeError(f"{value} ms is more than a minute: give at most 60000")
    return value


def _spin_us(text: str) -> int:
    from .devices.options import MAX_RING_SPIN_US
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not 0 <= value <= MAX_RING_SPIN_US:
        raise argparse.ArgumentTypeError(f"{value}: give 0 to {MAX_RING_SPIN_US} microseconds")
    return value


def _jail_id(text: str) -> int:
    from jail.options import MAX_JAIL_ID, valid_jail_id
    try:
        value = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if not valid_jail_id(value):
        raise argparse.ArgumentTypeError(
            f"{value}: choose an unprivileged id from 1 to {MAX_JAIL_ID} (the jail also uses the "
            "next id up), not 0, 65533 or 65534")
    return value


def _tenant(text: str) -> str:
    from .registry import valid_name
    if not valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1-32 ASCII letters, digits, '-' or '_'")
    return text


def _vm_name(text: str) -> str:
    from .registry import valid_name
    if text and not valid_name(text):
        raise argparse.ArgumentTypeError(f"{text!r}: use 1-32 ASCII letters, digits, '-' or '_'")
    return text


def _add_device_args(p: argparse.ArgumentParser) -> None:
    """One flag per device kind, from its declaration (`ipc_protocol.kinds`)."""
    from ipc_protocol.kinds import KINDS
    for k in KINDS.values():
        keys = ",".join(f.name + ("=..." if f.type is not bool else "") for f in k.fields)
        if not k.fields:
            p.add_argument(f"--{k.flag}", action="append_const", const="", default=[],
                           dest=k.flag, help=k.help)
            continue
        short = f"{k.shorthand.upper()}[,...]|" if k.shorthand else ""
        p.add_argument(f"--{k.flag}", action="append", default=[], dest=k.flag,
                       metavar=f"{short}{keys},id=NAME,on-crash=POLICY", help=k.help)


def default_guest_path() -> str:
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    return os.path.join(root, "guest_kit", "build", "testguest.elf")


def _add_vm_args(p: argparse.ArgumentParser, kernel_required: bool) -> None:
    p.add_argument("--config", metavar="FILE", action="append",
                   help="a VM config file (TOML: every flag is a key, devices are tables; flags "
                        "given here override it; see `bulkhead config check`)")
    p.add_argument("--firecracker-config", metavar="FILE", action="append",
                   help="a Firecracker JSON config (boot-source, machine-config, drives, "
                        "network-interfaces, vsock; anything else is refused by name)")
    p.add_argument("--kernel", required=kernel_required, metavar="PATH",
                   help="test guest ELF, Linux bzImage or vmlinux")
    p.add_argument("--initrd", metavar="PATH", help="initramfs for a Linux kernel")
    p.add_argument("--cmdline", default=None, metavar="STR", help="kernel command line")
    p.add_argument("--mem", type=_positive_int, default=256, metavar="MIB", help="guest RAM in MiB (default 256)")
    p.add_argument("--vcpus", type=_positive_int, default=1, metavar="N", help="number of vCPUs (default 1)")
    p.add_argument("--serial", default="stdout", metavar="stdout|FILE", help="where COM1 output goes")
    p.add_argument("--name", default="", metavar="NAME", type=_vm_name,
                   help="a name for the VM, for `bulkhead ps|stats|stop|fault` (default vm<pid>)")
    p.add_argument("--timeout", type=_seconds, default=None, metavar="SECONDS",
                   help="stop the VM after this long (exit 143)")
    _add_device_args(p)
    p.add_argument("--no-sandbox", action="store_true",
                   help="run the virtio devices inside the core process (the baseline for benchmarks)")
    p.add_argument("--on-device-crash", choices=("restart", "fail", "stop-vm"), default="restart",
                   help="what a device failure does (default restart; per device with "
                        "--disk PATH,on-crash=POLICY)")
    p.add_argument("--device-timeout-ms", type=_milliseconds, default=500, metavar="MS",
                   help="how long a vCPU waits for a device register read before the device is "
                        "declared failed (default 500)")
    p.add_argument("--max-restarts", type=_positive_int, default=100, metavar="N",
                   help="with restart: after N failures within --restart-window the device fails "
                        "instead (default 100)")
    p.add_argument("--restart-window", type=_seconds, default=30.0, metavar="SECONDS",
                   help="window for --max-restarts (default 30)")
    p.add_argument("--heartbeat-timeout-ms", type=_milliseconds, default=500, metavar="MS",
                   help="a device that leaves a heartbeat (sent every 250 ms) unanswered this long "
                        "is failed with cause `heartbeat timeout` (default 500)")
    p.add_argument("--device-start-timeout", type=_seconds, default=DEFAULT_START_TIMEOUT,
                   metavar="SECONDS",
                   help="how long a device process (a restart's too) may take from spawn to ready "
                        f"before its start counts as failed (default {DEFAULT_START_TIMEOUT:g})")
    p.add_argument("--allow-faults", action="store_true",
                   help="testing only: let `bulkhead fault` inject faults into this VM's devices")
    p.add_argument("--ring-spin-us", type=_spin_us, default=100, metavar="US",
                   help="how long the core and each device busy-wait on the register ring before "
                        "sleeping on its eventfd (default 100; 0 = always sleep)")
    p.add_argument("--spawn-method", choices=("zygote", "exec"), default="zygote",
                   help="how device processes start: fork from a per-VM pre-imported zygote "
                        "(default, ~20 ms) or a fresh interpreter each time (~170 ms)")
    p.add_argument("--seccomp", choices=("kill", "trap", "log", "off"), default="kill",
                   help="seccomp action on a syscall outside a device's policy (default kill; "
                        "trap names the syscall in the log)")
    p.add_argument("--jail-uid", type=_jail_id, metavar="UID",
                   help="host uid the device processes run as (default: a free pair allocated "
                        "from --uid-range, held while the VM runs)")
    p.add_argument("--jail-gid", type=_jail_id, metavar="GID", help="host gid (default as --jail-uid)")
    p.add_argument("--uid-range", metavar="START-END",
                   help="where this VM's jail uid/gid pair is allocated (default "
                        "0x78000000-0x7FFFFFFD); give a tenant's VMs their own range")
    p.add_argument("--no-jail", action="store_true",
                   help="debugging only: device processes without namespaces, seccomp or dropped caps")
    # The same three limits for one VM's cgroup and for all of a tenant's VMs together.
    for prefix, whose, pids_default in (("cgroup", "the VM's cgroup (core + devices)", " (default 512)"),
                                        ("tenant", "all of the tenant's VMs together "
                                                   "(bulkhead/tenant-NAME; needs --tenant)", "")):
        p.add_argument(f"--{prefix}-memory-mib", type=_positive_int, metavar="MIB",
                       help=f"memory limit of {whose}")
        p.add_argument(f"--{prefix}-pids-max", type=_positive_int, metavar="N",
                       help=f"tasks limit of {whose}{pids_default}")
        p.add_argument(f"--{prefix}-cpu-quota", type=float, metavar="CPUS",
                       help=f"CPU quota of {whose}, e.g. 1.5")
    for flag, what in (("read-bps", "bytes/s read"), ("write-bps", "bytes/s written"),
                       ("read-iops", "read requests/s"), ("write-iops", "write requests/s")):
        p.add_argument(f"--cgroup-io-{flag}", type=_positive_int, metavar="N",
                       help=f"cgroup io limit, {what}, on each block device holding a disk image "
                            "(direct and read-from-disk I/O; see docs/deploy.md)")
    p.add_argument("--tenant", type=_tenant, metavar="NAME",
                   help="the tenant this VM belongs to: its cgroup is bulkhead/tenant-NAME/VM and "
                        "its jail uid/gid come from the tenant's --uid-range")
    p.add_argument("--no-cgroup", action="store_true", help="do not create a per-VM cgroup")
    p.add_argument("--device-memory-mib", type=int, default=DEFAULT_DEVICE_MEMORY >> 20,
                   metavar="MIB", help="memory limit of each device process's own cgroup "
                   f"(default {DEFAULT_DEVICE_MEMORY >> 20}; 0 = none); over it, the device is "
                   "restarted with cause `memory limit`")
    p.add_argument("--device-cpu-quota", type=float, default=DEFAULT_DEVICE_CPU_QUOTA,
                   metavar="CPUS", help=f"CPU quota of each device process (default "
                   f"{DEFAULT_DEVICE_CPU_QUOTA:g} CPU; 0 = none); throttling is counted in stats")
    p.add_argument("--metrics", metavar="PATH",
                   help="append one JSON record of the VM's counters per line to PATH every "
                        "--metrics-interval seconds, and one at exit")
    p.add_argument("--metrics-interval", type=_seconds, default=5.0, metavar="SECONDS",
                   help="seconds between metrics records (default 5)")
    p.add_argument("--shutdown-grace", type=_seconds, default=0.0, metavar="SECONDS",
                   help="on SIGTERM, press the ACPI power button and give the guest this long to "
                        "power off before stopping it (default 0: stop at once)")
    p.add_argument("--hold", action="store_true",
                   help="keep the VM alive after the test guest's checks until SIGTERM/Ctrl-C")
    p.add_argument("-v", "--verbose", action="count", default=0, help="log more (-vv for debug)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="bulkhead", description="Bulkhead: a KVM VMM whose devices run in jailed processes.",
                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=RUN_EXAMPLES)
    sub = parser.add_subparsers(dest="verb", required=True, parser_class=_Parser)
    run = sub.add_parser("run", help="boot a kernel", epilog=RUN_EXAMPLES,
                         formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_vm_args(run, kernel_required=True)
    demo = sub.add_parser("demo", help="boot the built test guest and run its checks",
                          formatter_class=argparse.RawDescriptionHelpFormatter,
                          epilog="example:\n  bulkhead demo --vcpus 2\n")
    _add_vm_args(demo, kernel_required=False)
    jail = sub.add_parser("jail", help="`bulkhead jail learn --device blk|rng|console [--only-new]`: "
                          "run a device under a real workload and print the syscalls it used as a "
                          "policy fragment", add_help=False)
    jail.add_argument("action", choices=("learn",))
    jail.add_argument("rest", nargs=argparse.REMAINDER)
    jail.set_defaults(verbose=0)
    net = sub.add_parser("net", help="`bulkhead net setup|down --netns NS --tap TAP [--dry-run]`: "
                         "connect a VM's network namespace to the host with a veth pair "
                         "(or remove it)", add_help=False)
    net.add_argument("action", choices=("setup", "down"))
    net.add_argument("rest", nargs=argparse.REMAINDER)
    net.set_defaults(verbose=0)
    guest = sub.add_parser("guest", help="guest assets: `bulkhead guest fetch` downloads Debian's cloud "
                           "kernel and busybox and builds an initramfs (cached)")
    guest.add_argument("action", choices=("fetch",))
    guest.add_argument("--refresh", action="store_true", help="download and rebuild even if cached")
    guest.add_argument("-v", "--verbose", action="count", default=0)
    chaos = sub.add_parser("chaos", help="kill a device process repeatedly during the test guest's "
                           "block workload and check that no write was lost",
                           formatter_class=argparse.RawDescriptionHelpFormatter,
                           epilog="example:\n  bulkhead chaos --count 50 --interval-ms 200\n")
    chaos.add_argument("--count", type=_positive_int, default=50, help="kills to inject (default 50)")
    chaos.add_argument("--interval-ms", type=_positive_int, default=200, help="time between kills (default 200)")
    chaos.add_argument("--device", default="blk0", help="device to kill (default blk0; also rng0)")
    chaos.add_argument("--seed", type=int, default=1, help="workload seed (and jitter seed)")
    chaos.add_argument("--jitter", action="store_true", help="randomise intervals 0.5x-1.5x with --seed")
    chaos.add_argument("--fault", default="kill",
                       choices=("kill", "hang", "bad-reply", "crash-in-request", "slow", "mix"),
                       help="fault to inject (default kill; mix = a seeded random mix)")
    chaos.add_argument("--backend", default="device", choices=("device", "qsd", "bulkhead"),
                       help="who serves the disk: the VM's own device process (default), or an "
                            "external vhost-user backend behind --disk vhost-user= "
                            "(qemu-storage-daemon, `bulkhead device blk`) that chaos SIGKILLs "
                            "and starts again")
    chaos.add_argument("--qd", type=int, default=1, choices=(1, 2, 3, 4),
                       help="requests the guest keeps in flight (default 1; >1 lets an "
                            "out-of-order backend complete them out of order)")
    chaos.add_argument("-v", "--verbose", action="count", default=0)
    from .cli_control import add_parsers
    add_parsers(sub, _positive_int)
    from .cli_up import add_parsers as add_up_parsers
    add_up_parsers(sub)
    from .vhost_device import add_parser as add_device_parser
    add_device_parser(sub)
    config = sub.add_parser("config", help="`bulkhead config check FILE...`: validate VM config "
                            "files without starting anything")
    config.add_argument("action", choices=("check",))
    config.add_argument("files", nargs="+", metavar="FILE")
    config.add_argument("-v", "--verbose", action="count", default=0)
    for verb in ("ps", "stats", "stop", "pause", "resume", "fault"):
        sub.choices[verb].add_argument("-v", "--verbose", action="count", default=0)
    return parser


def _subparser(parser: argparse.ArgumentParser, verb: str) -> argparse.ArgumentParser:
    for action in parser._actions:  # argparse keeps its subparsers here and nowhere public
        if isinstance(action, argparse._SubParsersAction):
            return action.choices[verb]
    raise KeyError(verb)


DEMO_TESTS = "pio,mmio,irq,irqfd,hlt,smp"
DEMO_VIRTIO_TESTS = "virtio-blk,virtio-rng,virtio-console"
DEMO_DISK_BYTES = 8 << 20


def _config_from_args(args: argparse.Namespace, scratch: str):
    from ipc_protocol.kinds import KINDS
    from .devices.options import DeviceOptions, SupervisionPolicy
    from .devices.spec import check_unique, parse_device_arg
    from .vm import VmConfig
    kernel = args.kernel
    cmdline = args.cmdline
    vcpus = args.vcpus
    given = {k.flag: list(getattr(args, k.flag)) for k in KINDS.values()}
    if args.verb == "demo":
        kernel = kernel or default_guest_path()
        if not os.path.exists(kernel):
            raise BulkheadError(f"the test guest {kernel} is not built: run `make -C guest_kit` "
                                "(./dev.sh demo does it for you)")
        if vcpus == 1:
            vcpus = 2
        if not given["disk"]:
            disk = os.path.join(scratch, "demo-disk.img")
            with open(disk, "wb") as f:
                f.truncate(DEMO_DISK_BYTES)
            given["disk"] = [disk]
        given["rng"] = given["rng"] or [""]
        given["console"] = given["console"] or [os.path.join(scratch, "demo-console.txt")]
        if cmdline is None:
            cmdline = f"gk.tests={DEMO_TESTS},{DEMO_VIRTIO_TESTS}"
    devices = [parse_device_arg(k, text, i) for k in KINDS.values()
               for i, text in enumerate(given[k.flag])]
    check_unique(devices)
    cmdline = cmdline or ""
    if args.hold and "gk.hold=" not in cmdline:
        cmdline += " gk.hold=1"
    supervision = SupervisionPolicy(on_crash=args.on_device_crash,
                                    device_timeout=args.device_timeout_ms / 1000,
                                    heartbeat_timeout=args.heartbeat_timeout_ms / 1000,
                                    start_timeout=args.device_start_timeout,
                                    max_restarts=args.max_restarts,
                                    restart_window=args.restart_window)
    options = DeviceOptions(sandbox=not args.no_sandbox, jail=_jail_options(args),
                            spawn_method=args.spawn_method, ring_spin_us=args.ring_spin_us,
                            allow_faults=args.allow_faults, supervision=supervision,
                            device_memory_max=(args.device_memory_mib << 20) or None
                            if args.device_memory_mib >= 0 else -1,
                            device_cpu_quota=args.device_cpu_quota or None)
    return VmConfig(kernel=kernel, cmdline=cmdline.strip(), mem_mib=args.mem, vcpus=vcpus,
                    cgroup=_cgroup_limits(args, devices),
                    serial=args.serial, initrd=args.initrd, name=args.name, devices=devices,
                    sandbox=not args.no_sandbox, device_options=options)


def _jail_options(args: argparse.Namespace):
    from jail.options import JailOptions
    if args.no_jail:
        return None
    return JailOptions(seccomp=args.seccomp, uid=args.jail_uid, gid=args.jail_gid)


def _cgroup_limits(args: argparse.Namespace, devices: list):
    from .cgroups import DEFAULT_PIDS_MAX, CgroupLimits, TenantLimits, io_limits
    io_args = (args.cgroup_io_read_bps, args.cgroup_io_write_bps, args.cgroup_io_read_iops,
               args.cgroup_io_write_iops)
    asked = args.cgroup_memory_mib is not None or args.cgroup_pids_max is not None \
        or args.cgroup_cpu_quota is not None or any(v is not None for v in io_args) \
        or any(v is not None for v in (args.tenant_memory_mib, args.tenant_pids_max,
                                       args.tenant_cpu_quota))
    if args.no_cgroup:
        if asked or args.tenant:
            raise BulkheadError("--no-cgroup cannot be combined with --tenant or "
                                "--cgroup-memory-mib/--cgroup-pids-max/--cgroup-cpu-quota/"
                                "--cgroup-io-*/--tenant-*")
        return None
    for flag, quota in (("--cgroup-cpu-quota", args.cgroup_cpu_quota),
                        ("--tenant-cpu-quota", args.tenant_cpu_quota)):
        if quota is not None and not 0.01 <= quota <= 1024:
            raise BulkheadError(f"{flag} {quota:g}: give 0.01 to 1024 CPUs")
    tenant_limits = TenantLimits(
        memory_max=None if args.tenant_memory_mib is None else args.tenant_memory_mib << 20,
        pids_max=args.tenant_pids_max, cpu_quota=args.tenant_cpu_quota)
    if not tenant_limits.empty and not args.tenant:
        raise BulkheadError("--tenant-memory-mib/--tenant-pids-max/--tenant-cpu-quota need "
                            "--tenant NAME (they bound all of that tenant's VMs)")
    if None not in (args.cgroup_cpu_quota, args.tenant_cpu_quota) \
            and args.cgroup_cpu_quota > args.tenant_cpu_quota:
        raise BulkheadError(f"--cgroup-cpu-quota {args.cgroup_cpu_quota:g} is more than the "
                            f"tenant's --tenant-cpu-quota {args.tenant_cpu_quota:g}")
    return CgroupLimits(memory_max=None if args.cgroup_memory_mib is None else args.cgroup_memory_mib << 20,
                        pids_max=args.cgroup_pids_max or DEFAULT_PIDS_MAX, required=asked or bool(args.tenant),
                        cpu_quota=args.cgroup_cpu_quota, tenant=args.tenant,
                        io=io_limits([d.params["path"] for d in devices
                                      if d.kind == "blk" and d.params.get("path")], *io_args),
                        tenant_limits=tenant_limits)


def cmd_run(args: argparse.Namespace) -> int:
    from .devices import zygote
    try:
        if _wants_zygote(args):
            zygote.prestart()  # if `main` has not already
        else:
            zygote.discard_prestarted()
        from . import registry
        if args.name and registry.lookup(args.name) is not None:  # before any device process starts
            raise BulkheadError(f"--name {args.name}: a VM of that name is running; pick another name")
        from .control import ControlEndpoint
        from .vm import Machine
        ids = _allocate_ids(args)
        try:
            return _run_machine(args, Machine, ControlEndpoint)
        finally:
            if ids is not None:
                ids.release()
    finally:
        zygote.discard_prestarted()  # the VM's supervisor took it, or nobody will


_NO_ZYGOTE_FLAGS = ("--no-sandbox", "--no-jail", "--spawn-method=exec", "-h", "--help")


def _prestart_from_argv(argv: list[str]) -> None:
    """`bulkhead run|demo` with devices: start the device zygote before building the parser
    (whose imports take ~130 ms), from a look at argv alone; `cmd_run` confirms or discards it
    once the arguments are parsed.  Its ~150 ms of interpreter start and imports then overlap
    the core's own instead of delaying the first device."""
    from ipc_protocol.kinds import KINDS
    if not argv or argv[0] not in ("run", "demo"):
        return
    rest = argv[1:]
    if any(a in _NO_ZYGOTE_FLAGS for a in rest) or any(
            a == "--spawn-method" and b == "exec" for a, b in zip(rest, rest[1:])):
        return
    device_flags = {f"--{k.flag.replace('_', '-')}" for k in KINDS.values()}
    wanted = argv[0] == "demo" or any(a.partition("=")[0] in device_flags for a in rest)
    for i, a in enumerate(rest):  # a config file may say no-sandbox, or hold the devices
        flag, eq, value = a.partition("=")
        if flag in ("--config", "--firecracker-config"):
            path = value if eq else (rest[i + 1] if i + 1 < len(rest) else "")
            verdict = _config_wants_zygote(path, flag == "--firecracker-config")
            if verdict is False:
                return
            wanted = wanted or bool(verdict)
    if wanted:
        from .devices.zygote import prestart
        prestart()


def _config_wants_zygote(path: str, firecracker: bool) -> bool | None:
    """A quick look at a config file for `_prestart_from_argv`: False if it turns the sandbox,
    the jail or the zygote off, True if it has devices, None if neither (or unreadable: the real
    parse reports that)."""
    import json
    import tomllib
    try:
        with open(path, "rb") as f:
            data = json.load(f) if firecracker else tomllib.load(f)
    except (OSError, ValueError):
        return None
    if not isinstance(data, dict):
        return None
    if firecracker:
        return True if data.get("drives") or data.get("network-interfaces") or data.get("vsock") else None
    from ipc_protocol.kinds import KINDS
    keys = {str(k).replace("_", "-"): v for k, v in data.items()}
    if keys.get("no-sandbox") is True or keys.get("no-jail") is True or keys.get("spawn-method") == "exec":
        return False
    return True if any(k.flag.replace("_", "-") in keys for k in KINDS.values()) else None


def _wants_zygote(args: argparse.Namespace) -> bool:
    """Whether devices will be forked from the zygote: sandboxed, jailed, `--spawn-method
    zygote`, at least one device."""
    from ipc_protocol.kinds import KINDS
    if args.no_sandbox or args.no_jail or args.spawn_method != "zygote":
        return False
    return args.verb == "demo" or any(getattr(args, k.flag, None) for k in KINDS.values())


def _allocate_ids(args: argparse.Namespace):
    """The VM's jail uid/gid pair, allocated and held for its life (unless given)."""
    if args.no_jail or args.no_sandbox or args.jail_uid is not None:
        if args.uid_range:
            raise BulkheadError("--uid-range allocates the jail ids: not with --jail-uid, "
                                "--no-jail or --no-sandbox")
        return None
    from .identities import DEFAULT_UID_RANGE, allocate_jail_ids, parse_uid_range
    uid_range = parse_uid_range(args.uid_range) if args.uid_range else DEFAULT_UID_RANGE
    claim = allocate_jail_ids(args.name or f"vm{os.getpid()}", uid_range, args.tenant)
    args.jail_uid = claim.value
    if args.jail_gid is None:
        args.jail_gid = claim.value
    return claim


def _run_machine(args: argparse.Namespace, Machine, ControlEndpoint) -> int:
    import tempfile
    with tempfile.TemporaryDirectory(prefix="bulkhead-") as scratch:
        config = _config_from_args(args, scratch)
        machine = Machine(config)
        machine.shutdown_grace = args.shutdown_grace
        endpoint = None
        metrics = None
        try:
            endpoint = ControlEndpoint(machine)  # `bulkhead ps|stats|stop|fault NAME`
            endpoint.start()
            if args.metrics:
                from .metrics import MetricsWriter
                metrics = MetricsWriter(args.metrics, args.metrics_interval, machine.name,
                                        machine.devices.stats)
                metrics.start()
            stop = machine.run(timeout=args.timeout)
        finally:
            if metrics is not None:
                metrics.close()
            if endpoint is not None:
                endpoint.close()
            machine.close()
        if args.verb == "demo" and config.devices:
            _report_demo(config)
    if stop.message and stop.exit_status != 0:
        print(f"bulkhead: {stop.message}", file=sys.stderr)
    return stop.exit_status


def _report_demo(config) -> None:
    console = next((d for d in config.devices if d.kind == "console"), None)
    if console is not None and console.params["path"] != "stdout" \
            and os.path.exists(console.params["path"]):
        with open(console.params["path"], "rb") as f:
            text = f.read().decode(errors="replace").strip()
        print(f"[demo] virtio-console output: {text!r}", file=sys.stderr)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    _prestart_from_argv(argv)
    parser = build_parser()
    from .vm_config import CONFIG_FLAGS
    if argv and argv[0] in ("run", "demo") and any(a.partition("=")[0] in CONFIG_FLAGS
                                                   for a in argv[1:]):
        from .vm_config import expand
        try:
            argv = [argv[0], *expand(argv[1:], _subparser(parser, argv[0]))]
        except BulkheadError as e:
            print(f"bulkhead: {e}", file=sys.stderr)
            return EXIT_USAGE
    args = parser.parse_args(argv)
    level = logging.WARNING - 10 * min(args.verbose, 2)
    logging.basicConfig(level=level, format="bulkhead %(levelname)s %(name)s: %(message)s")
    try:
        if args.verb in ("run", "demo"):
            return cmd_run(args)
        if args.verb == "jail":
            from vmm_core.testing.jail_learn import learn_main
            return learn_main(args.rest)
        if args.verb == "net":
            from .netsetup import main as net_main
            return net_main(args.rest + (["--down"] if args.action == "down" else []),
                            prog=f"bulkhead net {args.action}")
        if args.verb == "guest":
            from .guest_assets import main as guest_main
            return guest_main(["--refresh"] if args.refresh else [])
        if args.verb == "chaos":
            from .chaos import run_chaos
            return run_chaos(args.count, args.interval_ms, args.device, args.seed, jitter=args.jitter,
                             fault=args.fault, backend=args.backend, qd=args.qd)
        if args.verb == "config":
            from .vm_config import check
            return check(args.files, _subparser(parser, "run"))
        if args.verb in ("up", "logs", "down"):
            from . import cli_up
            if args.verb == "up":
                return cli_up.cmd_up(args, _subparser(parser, "run"))
            return cli_up.cmd_logs(args) if args.verb == "logs" else cli_up.cmd_down(args)
        if args.verb == "device":
            from .vhost_device import run_device
            return run_device(args)
        if args.verb in ("ps", "stats", "stop", "pause", "resume", "fault"):
            from .cli_control import run_verb
            return run_verb(args)
    except BulkheadError as e:
        print(f"bulkhead: {e}", file=sys.stderr)
        return EXIT_USAGE
    parser.error(f"unknown verb {args.verb}")
    return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
