"""VM config files: `bulkhead run --config vm.toml` and `bulkhead config check FILE...`.

A file is TOML; every `run` flag is a key (dashes or underscores: `device-timeout-ms` or
`device_timeout_ms`), and each device kind a table or an array of tables with the keys of its
flag (`ipc_protocol.kinds`), so files and flags share one parser:

    kernel = "guest.elf"
    mem = 128
    on-device-crash = "fail"
    no-cgroup = true

    [[disk]]
    path = "disk.img"
    readonly = true
    on-crash = "restart"

    [[net]]
    tap = "bhtap0"
    netns = "new"

    [vsock]
    cid = 3

The file becomes command-line arguments placed *before* the ones given with it, so a flag given
on the command line overrides the file's key (devices of both are added).  Every value is checked
here first, so an error names the file, the line and the key, and what is expected; an unknown
key is an error.
"""

from __future__ import annotations

import argparse
import re
import tomllib
from typing import Any

from ipc_protocol.kinds import KINDS

from .devices.spec import build_spec
from .errors import ConfigError

# Keys that are not run flags.
_NOT_KEYS = {"help", "config", "firecracker_config", "verb"}
CONFIG_FLAGS = ("--config", "--firecracker-config")


def _line_of(text: str, key: str) -> int:
    """The line where `key` (or its table) first appears; 1 if not found."""
    alternatives = {key, key.replace("_", "-"), key.replace("-", "_")}
    for n, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        for k in alternatives:
            if re.match(rf"(\[\[?\s*)?{re.escape(k)}\s*(=|\]|$)", stripped):
                return n
    return 1


def _flag_text(table: dict[str, Any]) -> str:
    """A device table as its flag's key=value list (commas doubled, booleans on/off)."""
    items = []
    for key, value in table.items():
        if isinstance(value, bool):
            value = "on" if value else "off"
        items.append(f"{key}={str(value).replace(',', ',,')}")
    return ",".join(items)


def _options(parser: argparse.ArgumentParser) -> dict[str, argparse.Action]:
    out = {}
    for action in parser._actions:  # argparse offers no public list of a parser's options
        if action.option_strings and action.dest not in _NOT_KEYS:
            out[action.dest] = action
    return out


def load(path: str, run_parser: argparse.ArgumentParser) -> list[str]:
    """The arguments `path` stands for; ConfigError (one line: FILE:LINE: key: what) if any
    key is unknown or any value is not what its flag takes."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ConfigError(f"--config {path}: cannot read: {e.strerror}") from None
    text = raw.decode("utf-8", errors="replace")
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{path}: not valid TOML: {e}") from None
    options = _options(run_parser)
    argv: list[str] = []
    for key, value in data.items():
        where = f"{path}:{_line_of(text, key)}: {key}"
        dest = key.replace("-", "_")
        kind = next((k for k in KINDS.values() if k.flag == dest), None)
        if kind is not None:
            argv += _device_args(kind, value, where)
            continue
        action = options.get(dest)
        if action is None:
            known = ", ".join(sorted(a.option_strings[-1][2:] for a in options.values()))
            raise ConfigError(f"{where}: unknown key (known: {known}, and the device tables "
                              f"{', '.join(k.flag for k in KINDS.values())})")
        argv += _option_args(action, value, where)
    return argv


def _device_args(kind, value: Any, where: str) -> list[str]:
    tables = value if isinstance(value, list) else [value]
    out: list[str] = []
    for i, table in enumerate(tables):
        if table is True and not kind.fields:
            table = {}
        if not isinstance(table, dict):
            raise ConfigError(f"{where}: a table of {kind.flag} keys ([{kind.flag}] or "
                              f"[[{kind.flag}]]), not {table!r}")
        build_spec(kind, table, i, f"{where}[{i}]")  # every key checked, with this location
        # A kind without keys (rng) is a bare flag.
        out += [f"--{kind.flag}", _flag_text(table)] if kind.fields else [f"--{kind.flag}"]
    return out


def _option_args(action: argparse.Action, value: Any, where: str) -> list[str]:
    flag = action.option_strings[-1]
    if isinstance(action, (argparse._StoreTrueAction, argparse._StoreFalseAction)):
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: true or false, not {value!r}")
        return [flag] if value else []
    if isinstance(action, argparse._CountAction):
        if type(value) is not int or value < 0:
            raise ConfigError(f"{where}: a count (0, 1, 2), not {value!r}")
        return [flag] * value
    if isinstance(value, (dict, list)) or isinstance(value, bool):
        raise ConfigError(f"{where}: a single value, not {value!r}")
    text = str(value)
    if action.type is not None:
        try:
            action.type(text)
        except (argparse.ArgumentTypeError, ValueError, TypeError) as e:
            raise ConfigError(f"{where}: {e or 'not a valid value'} (as for {flag})") from None
    if action.choices is not None and text not in action.choices:
        raise ConfigError(f"{where}: one of {', '.join(map(str, action.choices))}, not {text!r}")
    return [flag, text]


def expand(argv: list[str], run_parser: argparse.ArgumentParser) -> list[str]:
    """`argv` of `run`/`demo` with each `--config FILE` (TOML) and `--firecracker-config FILE`
    (Firecracker's JSON, `vmm_core.firecracker_config`) replaced by the file's arguments, placed
    first (so the command line's own flags win)."""
    from . import firecracker_config
    files: list[tuple[str, str]] = []
    rest, i = [], 0
    while i < len(argv):
        a = argv[i]
        flag, eq, value = a.partition("=")
        if flag in CONFIG_FLAGS:
            if not eq:
                if i + 1 >= len(argv):
                    raise ConfigError(f"{flag} needs a FILE")
                value = argv[i + 1]
                i += 1
            files.append((flag, value))
        else:
            rest.append(a)
        i += 1
    expanded: list[str] = []
    for flag, path in files:
        expanded += load(path, run_parser) if flag == "--config" else firecracker_config.load(path)
    return expanded + rest


def check(paths: list[str], run_parser: argparse.ArgumentParser) -> int:
    """`bulkhead config check FILE...`: validate without starting anything; 0 if all are good."""
    for path in paths:
        argv = load(path, run_parser)
        for action in _options(run_parser).values():
            if action.required and not set(action.option_strings) & set(argv):
                raise ConfigError(f"{path}: {action.dest} is required "
                                  f"({action.dest} = ... or {action.option_strings[-1]})")
        print(f"{path}: ok")
    return 0
