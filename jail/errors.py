"""The jail's errors.  Each message names what went wrong and, for policies, the file and line."""

from __future__ import annotations

from ipc_protocol.errors import BulkheadError


class JailError(BulkheadError):
    """A jail could not be built or entered (namespaces, mounts, capabilities, seccomp, cgroups).

    The device process must not serve a guest after this: it exits and the core reports the text.
    """


class PolicyError(JailError):
    """A seccomp policy file is wrong; the message starts with `file:line:`."""


class CgroupError(JailError):
    """A cgroup could not be created, limited, joined or removed."""


class CgroupConflict(CgroupError):
    """The limits asked for contradict ones in force for others (a tenant's running VMs): the
    host is fine, the request is not."""
