"""Build a VM from a `VmConfig` and run it: the one place the pieces are wired together."""

from __future__ import annotations

import logging
import os
import shutil
import signal
import sys
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Any, BinaryIO, Callable, Mapping

from ipc_protocol.transport.zmq_channel import make_runtime_dir

from . import layout
from .boot import DEFAULT_LINUX_CMDLINE
from .boot import cpu as cpu_setup
from .boot import linux
from .boot.elf import is_elf, load_elf, entry_physical
from .bus import Bus
from .errors import BootError, ConfigError
from .kvm import Kvm, Vcpu, Vm
from .kvm._kvm_cffi import ffi, lib
from .cgroups import MIN_MEMORY_MARGIN, CgroupLimits, join_vm_cgroup, reap_stale_vms
from .devices.options import DeviceOptions
from .memory import GuestMemory, create_guest_memory
from .registry import valid_name
from .vcpu import StopReason, StopRequest, VcpuThread

log = logging.getLogger(__name__)

MIN_MEM_MIB = 16
MAX_MEM_MIB = 1 << 20


@dataclass
class VmConfig:
    kernel: str
    cmdline: str = ""
    mem_mib: int = 256
    vcpus: int = 1
    serial: str = "stdout"  # "stdout" or a file path
    initrd: str | None = None
    name: str = ""
    devices: list = field(default_factory=list)  # list[DeviceSpec]
    sandbox: bool = True
    device_options: "DeviceOptions | Mapping[str, Any]" = field(default_factory=dict)
    cgroup: "CgroupLimits | None" = field(default_factory=lambda: CgroupLimits())

    def validate(self, max_vcpus: int = 254) -> None:
        if not MIN_MEM_MIB <= self.mem_mib <= MAX_MEM_MIB:
            raise ConfigError(f"--mem {self.mem_mib}: give between {MIN_MEM_MIB} and {MAX_MEM_MIB} MiB")
        if not 1 <= self.vcpus <= max_vcpus:
            raise ConfigError(f"--vcpus {self.vcpus}: give between 1 and {max_vcpus}")
        if not os.path.exists(self.kernel):
            raise ConfigError(f"--kernel {self.kernel}: no such file")
        if not os.path.isfile(self.kernel):
            raise ConfigError(f"--kernel {self.kernel}: not a regular file")
        if not os.access(self.kernel, os.R_OK):
            raise ConfigError(f"--kernel {self.kernel}: not readable (permission denied)")
        if self.initrd is not None and not os.path.isfile(self.initrd):
            raise ConfigError(f"--initrd {self.initrd}: no such file")
        if self.name and not valid_name(self.name):
            raise ConfigError(f"--name {self.name!r}: use 1-32 letters, digits, '-' or '_'")
        if self.cgroup is not None and self.cgroup.memory_max is not None:
            need = (self.mem_mib << 20) + MIN_MEMORY_MARGIN
            if self.cgroup.memory_max < need:
                raise ConfigError(f"--cgroup-memory-mib {self.cgroup.memory_max >> 20}: the VM "
                                  f"needs at least {need >> 20} (guest RAM {self.mem_mib} MiB + "
                                  f"{MIN_MEMORY_MARGIN >> 20} MiB for the core)")
        if len(self.cmdline.encode()) >= layout.CMDLINE_MAX:
            raise ConfigError(f"--cmdline is {len(self.cmdline)} bytes; at most {layout.CMDLINE_MAX - 1}")


def _device_options(config: VmConfig) -> DeviceOptions:
    opts = config.device_options
    if not isinstance(opts, DeviceOptions):
        opts = DeviceOptions.from_mapping(opts)
    return replace(opts, sandbox=False) if not config.sandbox else opts


def _ignore_signal(signum, frame) -> None:  # pragma: no cover - only interrupts KVM_RUN
    pass


class Machine:
    """A running (or about to run) VM: KVM fds, memory, buses, devices, vCPU threads."""

    def __init__(self, config: VmConfig, serial_out: BinaryIO | None = None) -> None:
        self.config = config
        config.validate()  # before touching /dev/kvm: bad input must not depend on the host
        self.kvm = Kvm(os.environ.get("BULKHEAD_KVM_DEVICE", "/dev/kvm"))
        self.kvm.require_caps()
        config.validate(max_vcpus=min(254, self.kvm.max_vcpus()))
        self.start_time = time.monotonic()
        self._stop_lock = threading.Lock()
        self._stopped = threading.Event()
        self.stop_request: StopRequest | None = None
        self._cleanups: list[Callable[[], None]] = []
        self.serial_out = serial_out or self._open_serial(config.serial)
        self._serial_lock = threading.Lock()

        self.vm = Vm(self.kvm)
        self.memory = create_guest_memory(config.mem_mib << 20)
        for region in self.memory.regions:
            self.vm.set_user_memory_region(region.start, region.spec.size, region.host_addr)
        self.vm.set_identity_map_addr(layout.KVM_IDENTITY_MAP_ADDR)
        self.vm.set_tss_addr(layout.KVM_TSS_ADDR)
        self.vm.create_irqchip()
        self.vm.create_pit2()

        # One private (0700) directory per VM for its sockets: the devices' control socket and
        # the VM's own control endpoint (`vmm_core.control`).
        self.name = config.name or f"vm{os.getpid()}"
        self.runtime_dir = make_runtime_dir(self.name)
        self.add_cleanup(self._remove_runtime_dir)
        try:
            # Before any device process: they are born in the VM's cgroup.  What VMs killed
            # without cleaning up left behind is reaped first.
            reap_stale_vms()
            self.cgroup = join_vm_cgroup(self.name, config.cgroup)
            if self.cgroup is not None:
                self.add_cleanup(self.cgroup.leave)
            self.pio_bus: Bus = Bus("pio")
            self.mmio_bus: Bus = Bus("mmio")
            self._timers: list[threading.Timer] = []
            self.irq_injections = 0
            self.power_button_presses = 0
            self.shutdown_grace = 0.0  # s after SIGTERM the guest may take to power off (`--shutdown-grace`)
            from .platform import attach_legacy_devices  # wiring kept apart from KVM setup
            legacy = attach_legacy_devices(self)
            self.serial, self.boot_progress = legacy.serial, legacy.boot_progress
            from .devices.manager import DeviceManager
            from .devices.ports import VmPorts
            self.device_options = _device_options(config)
            self.devices = DeviceManager(
                VmPorts(self.vm, self.memory, self.mmio_bus, self.runtime_dir, self.request_stop,
                        self.name, self.cgroup),
                self.device_options)
            self.add_cleanup(self.devices.close)
            self.devices.add_all(config.devices)

            self.boot_kind, entry, boot_regs = self._load_kernel()
            self.vcpus = [Vcpu(self.vm, i) for i in range(config.vcpus)]
            cpuid = self.kvm.supported_cpuid()
            if os.path.isdir("/sys/module/kvm_pvm"):
                mask_for_emulated_cpl0(cpuid)
            for v in self.vcpus:
                self._setup_vcpu(v, cpuid, entry, boot_regs)
            self.threads: list[VcpuThread] = []
        except BaseException:
            # Bad input found late (a kernel we cannot load, a device that will not start):
            # leave no device process, socket or runtime directory behind.
            self._run_cleanups()
            raise

    # -- setup --------------------------------------------------------------------------------
    @staticmethod
    def _open_serial(spec: str) -> BinaryIO:
        if spec == "stdout":
            return sys.stdout.buffer
        try:
            return open(spec, "wb", buffering=0)
        except OSError as e:
            raise ConfigError(f"--serial {spec}: cannot open for writing: {e.strerror}") from None

    def _load_kernel(self) -> tuple[str, int, dict[str, int]]:
        with open(self.config.kernel, "rb") as f:
            data = f.read()
        cpu_setup.write_boot_structures(self.memory)
        if linux.is_linux_kernel(data):
            if not self.config.cmdline:
                self.config.cmdline = DEFAULT_LINUX_CMDLINE
            plan = linux.prepare_linux_boot(
                self.memory, data, kernel=self.config.kernel, cmdline=self.config.cmdline,
                initrd_path=self.config.initrd, vcpus=self.config.vcpus,
                virtio_slots=self.devices.acpi_slots())
            return "linux", plan.entry, plan.regs
        if is_elf(data):
            if self.config.initrd:
                raise ConfigError("--initrd is for Linux kernels; the test guest takes none")
            cmdline = self.config.cmdline
            if self.devices.slots and "gk.virtio=" not in cmdline:
                cmdline = f"{cmdline} gk.virtio={self.devices.guest_kit_arg()}".strip()
            self.memory.write(layout.CMDLINE_ADDR, cmdline.encode() + b"\0")
            image = load_elf(self.memory, data, self.config.kernel)
            return "elf", entry_physical(image), {
                "rsi": layout.CMDLINE_ADDR, "rdx": self.config.vcpus}
        raise BootError(f"{self.config.kernel} is neither a bzImage nor an ELF kernel")

    def _setup_vcpu(self, v: Vcpu, cpuid, entry: int, boot_regs: dict[str, int]) -> None:
        # APIC ID in leaf 1 EBX[31:24] and the x2APIC leaves; ignored by kvm_pvm, needed on hardware.
        for i in range(cpuid.nent):
            e = cpuid.entries[i]
            if e.function == 1:
                e.ebx = (e.ebx & 0x00FFFFFF) | (v.index << 24)
            elif e.function in (0xB, 0x1F):
                e.edx = v.index
        v.set_cpuid2(cpuid)
        v.set_msrs(cpu_setup.BOOT_MSRS)
        fpu = v.get_fpu()
        fpu.fcw = 0x37F
        fpu.mxcsr = 0x1F80
        v.set_fpu(fpu)
        lapic = v.get_lapic()
        regs_page = bytearray(ffi.buffer(lapic.regs))
        for off, mode in ((cpu_setup.APIC_LVT0, cpu_setup.APIC_MODE_EXTINT),
                          (cpu_setup.APIC_LVT1, cpu_setup.APIC_MODE_NMI)):
            old = int.from_bytes(regs_page[off:off + 4], "little")
            regs_page[off:off + 4] = cpu_setup.lint_value(old, mode).to_bytes(4, "little")
        ffi.memmove(lapic.regs, bytes(regs_page), len(regs_page))
        v.set_lapic(lapic)
        if self.boot_kind == "linux" and v.index != 0:
            return  # Linux starts its APs with INIT/SIPI through the LAPIC.
        sregs = v.get_sregs()
        cpu_setup.long_mode_sregs(sregs)
        v.set_sregs(sregs)
        regs = v.get_regs()
        for name in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "r8", "r9", "r10", "r11",
                     "r12", "r13", "r14", "r15"):
            setattr(regs, name, 0)
        regs.rflags = 0x2
        regs.rip = entry
        regs.rsp = layout.BOOT_STACK_POINTER if v.index == 0 else 0
        regs.rdi = v.index
        for name, value in boot_regs.items():
            setattr(regs, name, value)
        v.set_regs(regs)
        if v.index != 0:
            v.set_mp_state(lib.KVM_MP_STATE_RUNNABLE)

    # -- hooks used by devices ------------------------------------------------------------------
    def serial_write(self, data: bytes) -> None:
        with self._serial_lock:
            try:
                self.serial_out.write(data)
                self.serial_out.flush()
            except (OSError, ValueError):
                pass  # a closed stdout must not kill the VM

    def irq_line(self, gsi: int, level: bool) -> None:
        self.vm.irq_line(gsi, level)

    def press_power_button(self) -> None:
        """The ACPI power button (the Generic Event Device's line): a guest OS that handles it
        shuts down and powers off through SLEEP_CONTROL_REG (status 0)."""
        self.pulse_irq(layout.ACPI_GED_IRQ)
        self.power_button_presses += 1

    def _on_sigterm(self) -> None:
        """SIGTERM: with a shutdown grace, the power button first and a stop after the grace;
        without one (the default), a stop at once."""
        grace = self.shutdown_grace
        if grace <= 0 or self.power_button_presses:
            self.request_stop(StopRequest(StopReason.TERMINATED, "SIGTERM"))
            return
        log.info("SIGTERM: pressing the power button; stopping in %g s", grace)
        self.press_power_button()
        self.after(grace, lambda: self.request_stop(StopRequest(
            StopReason.TERMINATED, f"SIGTERM: the guest did not power off within {grace:g} s")))

    def pulse_irq(self, gsi: int) -> None:
        self.vm.irq_line(gsi, True)
        self.vm.irq_line(gsi, False)
        self.irq_injections += 1

    def after(self, delay_s: float, fn: Callable[[], None]) -> None:
        t = threading.Timer(delay_s, fn)
        t.daemon = True
        self._timers.append(t)
        t.start()

    def add_cleanup(self, fn: Callable[[], None]) -> None:
        self._cleanups.append(fn)

    def _remove_runtime_dir(self) -> None:
        shutil.rmtree(self.runtime_dir, ignore_errors=True)

    # -- running ------------------------------------------------------------------------------
    def request_stop(self, request: StopRequest) -> None:
        with self._stop_lock:
            if self.stop_request is None:
                self.stop_request = request
                log.info("VM stopping: %s", request.message or request.reason.name)
        self._stopped.set()

    def run(self, timeout: float | None = None) -> StopRequest:
        """Run until the guest stops, Ctrl-C/SIGTERM/SIGHUP, or `timeout` seconds; then tear down."""
        main = threading.current_thread() is threading.main_thread()
        old_handlers = {}
        if main:
            old_handlers[signal.SIGUSR1] = signal.signal(signal.SIGUSR1, _ignore_signal)
            old_handlers[signal.SIGTERM] = signal.signal(signal.SIGTERM, lambda s, f: self._on_sigterm())
            # A closed terminal or ssh session: the default action would skip the teardown and
            # leak the device processes' cgroups, the runtime dir and the registry entry.
            old_handlers[signal.SIGHUP] = signal.signal(
                signal.SIGHUP, lambda s, f: self.request_stop(StopRequest(StopReason.HANGUP, "SIGHUP")))
        restore_tty = self._start_stdin_reader()
        try:
            self.devices.start()
            self.threads = [VcpuThread(v, self.pio_bus, self.mmio_bus, self.memory, self.request_stop)
                            for v in self.vcpus]
            for t in self.threads:
                t.start()
            deadline = None if timeout is None else time.monotonic() + timeout
            while not self._stopped.is_set():
                wait = 0.2 if deadline is None else max(0.0, min(0.2, deadline - time.monotonic()))
                try:
                    self._stopped.wait(wait)
                except KeyboardInterrupt:
                    self.request_stop(StopRequest(StopReason.INTERRUPTED, "interrupted (Ctrl-C)"))
                if deadline is not None and time.monotonic() >= deadline and not self._stopped.is_set():
                    self.request_stop(StopRequest(StopReason.TERMINATED, f"timed out after {timeout} s"))
        except KeyboardInterrupt:
            self.request_stop(StopRequest(StopReason.INTERRUPTED, "interrupted (Ctrl-C)"))
        finally:
            self._stop_vcpus()
            restore_tty()
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
        assert self.stop_request is not None
        return self.stop_request

    def _start_stdin_reader(self) -> Callable[[], None]:
        """Interactive use: the terminal in cbreak mode feeds COM1's receiver (Ctrl-C still stops
        the VM).  Returns the function that restores the terminal."""
        if not (self.config.serial == "stdout" and sys.stdin is not None and sys.stdin.isatty()):
            return lambda: None
        import termios
        import tty
        fd = sys.stdin.fileno()
        saved = termios.tcgetattr(fd)
        tty.setcbreak(fd)

        def pump() -> None:
            while not self._stopped.is_set():
                try:
                    data = os.read(fd, 1024)
                except OSError:
                    return
                if not data:
                    return
                self.serial.queue_input(data.replace(b"\n", b"\r"))

        threading.Thread(target=pump, name="stdin", daemon=True).start()
        return lambda: termios.tcsetattr(fd, termios.TCSADRAIN, saved)

    @property
    def paused(self) -> bool:
        return bool(self.threads) and all(t.pausing for t in self.threads)

    def pause(self, timeout: float = 2.0) -> bool:
        """Stop every vCPU outside KVM_RUN (devices keep running); False if one did not stop."""
        for t in self.threads:
            t.pause()
        deadline = time.monotonic() + timeout
        for t in self.threads:
            while t.is_alive() and not t.paused.is_set() and time.monotonic() < deadline:
                self._kick(t)
                t.paused.wait(0.02)
        return all(t.paused.is_set() or not t.is_alive() for t in self.threads)

    def resume(self) -> None:
        for t in self.threads:
            t.resume()

    @staticmethod
    def _kick(t: threading.Thread) -> None:
        """Make a vCPU thread inside KVM_RUN return (EINTR; SIGUSR1's handler does nothing)."""
        if t.ident is not None:
            try:
                signal.pthread_kill(t.ident, signal.SIGUSR1)
            except ProcessLookupError:
                pass

    def _stop_vcpus(self) -> None:
        for t in self.threads:
            t.stop()
        deadline = time.monotonic() + 5.0
        for t in self.threads:
            while t.is_alive() and time.monotonic() < deadline:
                self._kick(t)
                t.join(0.05)
            if t.is_alive():
                log.error("vCPU thread %s did not stop", t.name)

    def _run_cleanups(self) -> None:
        cleanups, self._cleanups = self._cleanups, []
        for fn in reversed(cleanups):
            try:
                fn()
            except Exception:  # noqa: BLE001 - teardown continues past one failure
                log.exception("cleanup failed")

    def close(self) -> None:
        for t in self._timers:
            t.cancel()
        self._run_cleanups()
        for v in getattr(self, "vcpus", []):
            v.close()
        self.vm.close()
        self.memory.close()
        self.kvm.close()
        if self.serial_out not in (sys.stdout.buffer,):
            try:
                self.serial_out.flush()
            except (OSError, ValueError):
                pass


# CPUID.1:ECX bits that kvm_pvm's CPL0 instruction emulator cannot execute: CMPXCHG16B (13),
# XSAVE (26), OSXSAVE (27), AVX (28).  A guest that sees them (Linux's allocator, its FPU setup)
# stops with KVM_EXIT_INTERNAL_ERROR; hidden, it falls back to CMPXCHG8B loops and FXSAVE.
PVM_HIDDEN_LEAF1_ECX = (1 << 13) | (1 << 26) | (1 << 27) | (1 << 28)


def mask_for_emulated_cpl0(cpuid) -> None:
    """Hide from the guest the CPU features this host's emulated CPL0 lacks (kvm_pvm only; on
    hardware KVM the guest gets the full supported set)."""
    for i in range(cpuid.nent):
        e = cpuid.entries[i]
        if e.function == 1:
            e.ecx &= ~PVM_HIDDEN_LEAF1_ECX & 0xFFFFFFFF
        elif e.function == 7 and e.index == 0:
            e.ebx &= ~((1 << 5) | (1 << 3) | (1 << 8)) & 0xFFFFFFFF  # AVX2, BMI1, BMI2
        elif e.function == 0xD:
            e.eax = e.ebx = e.ecx = e.edx = 0
