"""The device-process jail: seccomp policies as data, namespaces, capabilities, rlimits, cgroups.

Public surface:
  policy.load_policy / policy.Policy / errors.PolicyError     the TOML policies of jail_configs/
  seccomp.install / seccomp.Violation                           libseccomp filters (kill|trap|log|off)
  sandbox.JailSpec / sandbox.spawn / sandbox.enter_jail         spawn side and device side
  cgroup.VmCgroup                                               per-VM cgroup (v2 or v1)
  learn.learn / learn.learn_main                                measure a device's syscalls
"""

from jail.errors import CgroupError, JailError, PolicyError

__all__ = ["CgroupError", "JailError", "PolicyError"]
