# setuptools needs setup.py for cffi_modules (the cffi build hook has no pyproject table).
import os

from setuptools import setup
from setuptools.command.build_ext import build_ext

_HERE = os.path.dirname(os.path.abspath(__file__))
CFFI_MODULES = [
    "vmm_core/kvm/_build.py:ffibuilder",            # <linux/kvm.h>
    "jail/_seccomp_build.py:ffibuilder",  # <seccomp.h>, -lseccomp
    "ipc_protocol/_atomics_build.py:ffibuilder",  # shared-memory atomics (register page)
    "vmm_core/vhost_frontend/_watch_build.py:ffibuilder",  # the ring watch's native sampler
    "device_procs/virtio/_fastpath_build.py:ffibuilder",  # chain walk, net loops (in the jail)
]
# Small programs exec'd by the launcher: (source, executable), paths inside the package tree.
PROGRAMS = [("jail/pid_init.c", "jail/bulkhead-jail-init")]  # pid 1 of a device's PID namespace


class build_ext_and_programs(build_ext):
    """The cffi extensions, then each program of PROGRAMS with the same C compiler."""

    def run(self) -> None:
        super().run()
        for source, target in PROGRAMS:
            out = os.path.join(_HERE if self.inplace else self.build_lib, target)
            objects = self.compiler.compile([os.path.join(_HERE, source)],
                                            output_dir=self.build_temp,
                                            extra_postargs=["-O2", "-Wall", "-Werror"])
            self.compiler.link_executable(objects, os.path.basename(out),
                                          output_dir=os.path.dirname(out))


setup(cffi_modules=[m for m in CFFI_MODULES if os.path.exists(os.path.join(_HERE, m.split(":")[0]))],
      cmdclass={"build_ext": build_ext_and_programs})
