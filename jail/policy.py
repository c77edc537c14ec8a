"""Seccomp policies as data: load, layer and validate the TOML files of `jail_configs/`.

A policy file looks like this (see `jail_configs/common_device.toml` for the full set):

    include = ["common_device.toml"]        # paths relative to this file; layered in order

    [policy]
    default_action = "kill_process"         # kill_process | kill_thread | trap | log | errno:ENAME

    [syscalls.pwritev]
    why = "writes guest data to the disk image (VIRTIO_BLK_T_OUT)"

    [syscalls.ioctl]
    why = "eventfd/zmq sockets set non-blocking"
    when = [ { arg1 = "FIONBIO" } ]         # OR of alternatives; inside one table: AND

    [syscalls.mmap]
    why = "CPython's allocator and zmq message buffers"
    when = [ { arg2 = { without = "PROT_EXEC" } } ]

Argument values are integers or names of constants (`lib.bh_consts`, taken from the C headers at
build time), joined with `|`.  A value is a bare value (equality) or a table with one operator:
`eq ne lt le gt ge`, `{ mask = M, eq = V }` (masked equality) or `{ without = M }` (none of the bits
of M set).  Every syscall needs a non-empty `why`.  Syscalls no device may ever have (`FORBIDDEN`)
are rejected wherever they appear.  Every error is a `PolicyError` naming the file and line.
"""

from __future__ import annotations

import errno as _errno
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from jail.errors import PolicyError

CONFIG_DIR = Path(__file__).resolve().parents[1] / "jail_configs"

# Never allowed in a device policy: each one is a way out of the jail or into the kernel's attack
# surface that no virtio device needs once its fds are open.
FORBIDDEN: frozenset[str] = frozenset({
    "socket", "socketpair", "connect", "bind", "listen", "accept", "accept4",
    "execve", "execveat", "fork", "vfork", "ptrace", "process_vm_readv", "process_vm_writev",
    "mount", "umount2", "pivot_root", "chroot", "unshare", "setns", "bpf", "kexec_load",
    "kexec_file_load", "perf_event_open", "userfaultfd", "open", "openat", "openat2", "creat",
    "open_by_handle_at", "name_to_handle_at", "init_module", "finit_module", "delete_module",
    "keyctl", "add_key", "request_key", "io_uring_setup", "io_uring_enter", "io_uring_register",
    "fsopen", "fsmount", "fsconfig", "open_tree", "move_mount", "seccomp", "setuid", "setgid",
    "setresuid", "setresgid", "setgroups", "capset", "mknod", "mknodat", "symlink", "link",
})

DEFAULT_ACTIONS = ("kill_process", "kill_thread", "trap", "log")
RULE_ACTIONS = ("allow", "log")
OPERATORS = ("eq", "ne", "lt", "le", "gt", "ge")
_SYSCALL_KEYS = {"why", "when", "action", "extend"}
_TOP_KEYS = {"include", "policy", "syscalls"}
_POLICY_KEYS = {"default_action", "description"}


@dataclass(frozen=True)
class ArgCmp:
    """One comparison of a syscall argument: `args[arg] <op> value`, or `args[arg] & mask == value`."""

    arg: int
    op: str  # one of OPERATORS or "masked_eq"
    value: int
    mask: int = 0


@dataclass(frozen=True)
class SyscallRule:
    """An allowed syscall: unconditional if `when` is empty, else allowed when any alternative matches."""

    name: str
    nr: int
    why: str
    action: str = "allow"  # allow | log | errno:ENAME
    when: tuple[tuple[ArgCmp, ...], ...] = ()
    source: str = ""  # "file:line" of its definition


@dataclass(frozen=True)
class Policy:
    """A fully layered policy: rules by syscall name plus the default action for everything else."""

    path: Path
    default_action: str
    rules: dict[str, SyscallRule] = field(default_factory=dict)
    files: tuple[Path, ...] = ()
    description: str = ""

    def allows(self, name: str) -> bool:
        return name in self.rules


def constants() -> dict[str, int]:
    """Every constant a policy may name, as compiled from the system headers."""
    global _CONSTANTS
    if _CONSTANTS is None:
        from jail._seccomp_cffi import ffi, lib

        _CONSTANTS = {
            ffi.string(lib.bh_consts[i].name).decode(): int(lib.bh_consts[i].value)
            for i in range(lib.bh_nconsts)
        }
    return _CONSTANTS


_CONSTANTS: dict[str, int] | None = None


def resolve_syscall(name: str) -> int:
    """The native syscall number for `name`, or -1 when libseccomp does not know it."""
    from jail._seccomp_cffi import lib

    return int(lib.seccomp_syscall_resolve_name(name.encode()))


def syscall_name(nr: int, arch: int = 0) -> str:
    """The name of syscall `nr` on `arch` (an AUDIT_ARCH_* token, 0 = native), or `syscall_<nr>`."""
    from jail._seccomp_cffi import ffi, lib

    p = lib.seccomp_syscall_resolve_num_arch(arch, nr)
    if p == ffi.NULL:
        return f"syscall_{nr}"
    try:
        return ffi.string(p).decode()
    finally:
        lib.free(p)


def parse_errno_action(action: str) -> int | None:
    """The errno number of an `errno:ENAME` action, or None when `action` is not of that form."""
    if not action.startswith("errno:"):
        return None
    code = getattr(_errno, action[len("errno:"):], None)
    return code if isinstance(code, int) else None


def load_policy(path: str | Path) -> Policy:
    """Load `path` (a file, or a device type such as "blk") with its includes, validated and layered."""
    p = Path(path)
    if not p.is_absolute() and not p.exists():
        if p.suffix != ".toml" and (CONFIG_DIR / f"{p}.toml").exists():
            p = CONFIG_DIR / f"{p}.toml"  # a device type: "blk"
        elif (CONFIG_DIR / p).exists():
            p = CONFIG_DIR / p
    rules: dict[str, SyscallRule] = {}
    files: list[Path] = []
    default, description = _load_into(p.resolve(), rules, files, stack=())
    if default is None:
        raise PolicyError(f"{p}:1: no [policy] default_action here or in any included file")
    return Policy(p.resolve(), default, rules, tuple(files), description or "")


def policy_for_device(device: str) -> Path:
    """The policy file of a device type (`blk`, `rng`, `console`) in `jail_configs/`."""
    path = CONFIG_DIR / f"{device}.toml"
    if not path.exists():
        raise PolicyError(f"{path}:1: no policy for device type {device!r}")
    return path


def _load_into(path: Path, rules: dict[str, SyscallRule], files: list[Path],
               stack: tuple[Path, ...]) -> tuple[str | None, str | None]:
    text = _read(path, stack)
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as err:
        m = re.search(r"at line (\d+)", str(err))
        raise PolicyError(f"{path}:{m.group(1) if m else 1}: not valid TOML: {err}") from None
    loc = _Locator(path, text)
    for key in data:
        if key not in _TOP_KEYS:
            raise PolicyError(f"{loc.top(key)}: unknown key {key!r} (expected one of "
                              f"{', '.join(sorted(_TOP_KEYS))})")
    default: str | None = None
    description: str | None = None
    includes = data.get("include", [])
    if isinstance(includes, str):
        includes = [includes]
    if not isinstance(includes, list) or not all(isinstance(i, str) for i in includes):
        raise PolicyError(f"{loc.top('include')}: include must be a list of file names")
    for inc in includes:
        target = (path.parent / inc).resolve()
        if target in stack or target == path:
            chain = " -> ".join(str(s.name) for s in (*stack, path, target))
            raise PolicyError(f"{loc.top('include')}: include cycle: {chain}")
        if not target.exists():
            raise PolicyError(f"{loc.top('include')}: included file {inc!r} not found ({target})")
        d, desc = _load_into(target, rules, files, (*stack, path))
        default = d if d is not None else default
        description = desc if desc is not None else description
    files.append(path)

    section = data.get("policy", {})
    if not isinstance(section, dict):
        raise PolicyError(f"{loc.top('policy')}: [policy] must be a table")
    for key in section:
        if key not in _POLICY_KEYS:
            raise PolicyError(f"{loc.key('policy', key)}: unknown key {key!r} in [policy]")
    if "default_action" in section:
        default = _check_default_action(section["default_action"], loc.key("policy", "default_action"))
    if isinstance(section.get("description"), str):
        description = section["description"]

    syscalls = data.get("syscalls", {})
    if not isinstance(syscalls, dict):
        raise PolicyError(f"{loc.top('syscalls')}: [syscalls] must be a table of tables")
    for name, body in syscalls.items():
        rule = _parse_rule(name, body, loc)
        old = rules.get(name)
        if old is not None:
            if not (isinstance(body, dict) and body.get("extend") is True):
                raise PolicyError(f"{rule.source}: syscall {name!r} is already allowed at {old.source}; "
                                  f"set `extend = true` to add alternatives, or remove one")
            if not old.when or not rule.when:
                raise PolicyError(f"{rule.source}: cannot extend {name!r} (defined at {old.source}): "
                                  f"both definitions need `when` alternatives")
            rule = SyscallRule(name, rule.nr, f"{old.why}; {rule.why}", old.action,
                               old.when + rule.when, old.source)
        rules[name] = rule
    return default, description


def _read(path: Path, stack: tuple[Path, ...]) -> str:
    try:
        return path.read_text()
    except OSError as err:
        where = f"{stack[-1]}: " if stack else ""
        raise PolicyError(f"{where}{path}:1: cannot read policy file: {err.strerror}") from None


def _check_default_action(value: Any, where: str) -> str:
    if not isinstance(value, str):
        raise PolicyError(f"{where}: default_action must be a string")
    if value in DEFAULT_ACTIONS or parse_errno_action(value) is not None:
        return value
    if value == "allow":
        raise PolicyError(f"{where}: default_action 'allow' makes the filter a no-op; "
                          f"run with seccomp mode 'off' instead")
    raise PolicyError(f"{where}: unknown action {value!r} (expected one of "
                      f"{', '.join(DEFAULT_ACTIONS)} or errno:ENAME)")


def _parse_rule(name: str, body: Any, loc: _Locator) -> SyscallRule:
    where = loc.key("syscalls", name)
    if name in FORBIDDEN:
        raise PolicyError(f"{where}: syscall {name!r} may never be allowed in a device jail")
    nr = resolve_syscall(name)
    if nr < 0:
        raise PolicyError(f"{where}: unknown syscall {name!r} (libseccomp cannot resolve it)")
    if not isinstance(body, dict):
        raise PolicyError(f"{where}: [syscalls.{name}] must be a table with at least `why`")
    for key in body:
        if key not in _SYSCALL_KEYS:
            raise PolicyError(f"{loc.key('syscalls', name, key)}: unknown key {key!r} for syscall "
                              f"{name!r} (expected {', '.join(sorted(_SYSCALL_KEYS))})")
    why = body.get("why")
    if not isinstance(why, str) or not why.strip():
        raise PolicyError(f"{loc.key('syscalls', name, 'why')}: syscall {name!r} needs a non-empty "
                          f"`why` saying which part of the device needs it")
    action = body.get("action", "allow")
    if not isinstance(action, str) or (action not in RULE_ACTIONS and parse_errno_action(action) is None):
        raise PolicyError(f"{loc.key('syscalls', name, 'action')}: unknown action {action!r} for "
                          f"{name!r} (expected allow, log or errno:ENAME)")
    when_raw = body.get("when", [])
    if isinstance(when_raw, dict):
        when_raw = [when_raw]
    if not isinstance(when_raw, list) or not when_raw and "when" in body:
        raise PolicyError(f"{loc.key('syscalls', name, 'when')}: `when` must be a non-empty list of "
                          f"tables like {{ arg1 = \"FIONBIO\" }}")
    alternatives = tuple(_parse_alternative(alt, loc.key("syscalls", name, "when")) for alt in when_raw)
    return SyscallRule(name, nr, why.strip(), action, alternatives, where)


def _parse_alternative(alt: Any, where: str) -> tuple[ArgCmp, ...]:
    if not isinstance(alt, dict) or not alt:
        raise PolicyError(f"{where}: each `when` alternative must be a non-empty table of argN = value")
    cmps: list[ArgCmp] = []
    for key, spec in alt.items():
        m = re.fullmatch(r"arg([0-5])", key)
        if m is None:
            raise PolicyError(f"{where}: bad argument {key!r} (expected arg0 .. arg5)")
        cmps.append(_parse_cmp(int(m.group(1)), spec, where))
    return tuple(cmps)


def _parse_cmp(arg: int, spec: Any, where: str) -> ArgCmp:
    if not isinstance(spec, dict):
        return ArgCmp(arg, "eq", _value(spec, where))
    keys = set(spec)
    if keys == {"without"}:
        return ArgCmp(arg, "masked_eq", 0, _value(spec["without"], where))
    if keys == {"mask", "eq"}:
        mask, value = _value(spec["mask"], where), _value(spec["eq"], where)
        if value & ~mask:
            raise PolicyError(f"{where}: arg{arg}: eq value {value:#x} has bits outside mask {mask:#x}")
        return ArgCmp(arg, "masked_eq", value, mask)
    if len(keys) == 1 and next(iter(keys)) in OPERATORS:
        op = next(iter(keys))
        return ArgCmp(arg, op, _value(spec[op], where))
    raise PolicyError(f"{where}: arg{arg}: bad comparison {spec!r} (use a value, one of "
                      f"{', '.join(OPERATORS)}, {{ mask = M, eq = V }} or {{ without = M }})")


def _value(v: Any, where: str) -> int:
    if isinstance(v, bool):
        raise PolicyError(f"{where}: {v!r} is not an argument value")
    if isinstance(v, int):
        if not 0 <= v < 1 << 64:
            raise PolicyError(f"{where}: value {v} does not fit an unsigned 64-bit argument")
        return v
    if isinstance(v, str) and v.strip():
        table = constants()
        total = 0
        for part in v.split("|"):
            part = part.strip()
            if part not in table:
                raise PolicyError(f"{where}: unknown constant {part!r} (known: see CONSTANT_NAMES "
                                  f"in jail/_seccomp_build.py)")
            total |= table[part]
        return total
    raise PolicyError(f"{where}: {v!r} is not an integer or a constant name")


class _Locator:
    """Finds the line of a key in a TOML file's text (tomllib gives values, not positions)."""

    def __init__(self, path: Path, text: str) -> None:
        self.path = path
        self.lines = text.splitlines()

    def _find(self, pattern: str, start: int = 0, stop: int | None = None) -> int | None:
        rx = re.compile(pattern)
        for i in range(start, len(self.lines) if stop is None else stop):
            if rx.search(self.lines[i].split("#", 1)[0]):
                return i
        return None

    def top(self, key: str) -> str:
        i = self._find(rf"^\s*(\[\s*{re.escape(key)}\b|{re.escape(key)}\s*[=.])")
        return f"{self.path}:{(i or 0) + 1}"

    def key(self, table: str, name: str, sub: str | None = None) -> str:
        qn = rf"(\"{re.escape(name)}\"|{re.escape(name)})"
        head = self._find(rf"^\s*\[\s*{re.escape(table)}\s*\.\s*{qn}\s*\]")
        if head is None:  # dotted keys or inline tables: `name.why = ...` / `name = { ... }`
            head = self._find(rf"^\s*({re.escape(table)}\s*\.\s*)?{qn}\s*[=.]")
        if head is None:
            return self.top(table)
        if sub is not None:
            end = self._find(r"^\s*\[", head + 1)
            hit = self._find(rf"\b{re.escape(sub)}\b", head, end)
            if hit is not None:
                return f"{self.path}:{hit + 1}"
        return f"{self.path}:{head + 1}"
