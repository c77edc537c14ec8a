"""Build the LD_PRELOAD shim (`uml_xstate.c`) that lets Debian's linux.uml 6.1 run on hosts with
an XSAVE area larger than UML's FPU buffer (AVX-512 + AMX: UML's init dies with "ptrace set fp
regs failed, errno = 14"); the C file says what it does and why.

Built on first use with the system C compiler into `_build/` next to this file (ignored by git),
keyed by a hash of the source, renamed into place atomically so parallel test workers can race.
"""

from __future__ import annotations

import functools
import hashlib
import os
import shutil
import subprocess
import tempfile

from vmm_core.errors import BulkheadError

SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "uml_xstate.c")
BUILD_DIR = os.path.join(os.path.dirname(SOURCE), "_build")


@functools.cache
def shim_path() -> str:
    """The built shim's path (building it if needed); BulkheadError if it cannot be built."""
    with open(SOURCE, "rb") as f:
        digest = hashlib.sha256(f.read()).hexdigest()[:16]
    target = os.path.join(BUILD_DIR, f"uml_xstate-{digest}.so")
    if os.path.exists(target):
        return target
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        raise BulkheadError("no C compiler to build the UML xstate shim: run ./dev.sh setup "
                            "(it installs build-essential)")
    os.makedirs(BUILD_DIR, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".uml_xstate-", suffix=".so", dir=BUILD_DIR)
    os.close(fd)
    try:
        out = subprocess.run([cc, "-O2", "-Wall", "-Werror", "-shared", "-fPIC", "-o", tmp,
                              SOURCE, "-ldl"], capture_output=True, text=True, timeout=120,
                             stdin=subprocess.DEVNULL)
        if out.returncode != 0:
            raise BulkheadError(f"building {SOURCE} failed: {out.stderr.strip()[-2000:]}")
        os.replace(tmp, target)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return target


if __name__ == "__main__":
    print(shim_path())
