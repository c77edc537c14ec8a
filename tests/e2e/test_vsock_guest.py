"""The test guest's virtio-vsock driver (guest_kit/vsock.c) through the real CLI: the device jailed
in its own process (and in-process for comparison), the core's broker connecting the guest to a
host program listening on `<vsock socket>_PORT`, and a host program connecting to the guest's
socket with Firecracker's `CONNECT <port>` line."""

from __future__ import annotations

import os
import socket
import threading
import time

import pytest

from vmm_core.testing import TEST_GUEST, run_bulkhead

pytestmark = [pytest.mark.kvm, pytest.mark.root, pytest.mark.timeout(180)]

PORT = 5005


def echo_server(path: str) -> tuple[socket.socket, list[bytes]]:
    lst = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lst.bind(path)
    lst.listen(4)
    seen: list[bytes] = []

    def serve() -> None:
        while True:
            try:
                conn, _ = lst.accept()
            except OSError:
                return
            with conn:
                while b := conn.recv(4096):
                    seen.append(b)
                    conn.sendall(b)

    threading.Thread(target=serve, daemon=True).start()
    return lst, seen


@pytest.mark.parametrize("mode", ["sandboxed", "in-process"])
def test_guest_kit_vsock_echo_through_the_broker(tmp_path, mode: str) -> None:
    vsock = str(tmp_path / "v.sock")
    lst, seen = echo_server(f"{vsock}_{PORT}")
    extra = ["--no-sandbox"] if mode == "in-process" else []
    try:
        run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                           "--vsock", f"cid=42,socket={vsock}", *extra,
                           "--cmdline", f"gk.tests=virtio-vsock gk.vsock={PORT}", timeout=150)
    finally:
        lst.close()
    ok, detail = run.results.get("virtio-vsock", (False, "no result"))
    assert ok and run.done == (1, 1) and run.returncode == 0, run.explain()
    assert f"cid=42 port={PORT} echoed=" in detail, detail
    assert b"".join(seen).startswith(b"bulkhead vsock echo"), seen
    assert not os.path.exists(vsock), "the VM's vsock socket outlived it"


@pytest.mark.parametrize("cid", ["0", "2", "4294967295", "x"])
def test_a_reserved_or_bad_cid_is_one_line_and_status_2(tmp_path, cid: str) -> None:
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--vsock", f"cid={cid},socket={tmp_path}/v.sock", timeout=60)
    assert run.returncode == 2, run.explain()
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1 and "cid" in lines[0], run.stderr


def test_a_cid_held_by_a_running_vm_is_refused(tmp_path) -> None:
    """CIDs are claimed by an OFD lock the holder keeps while it runs (released if it dies)."""
    from vmm_core.testing.uml import BulkheadBackend

    first = BulkheadBackend("vsock", "--cid", "77", "--uds", str(tmp_path / "a.sock"))
    first.start_with()
    try:
        run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                           "--vsock", f"cid=77,socket={tmp_path}/b.sock", timeout=60)
        assert run.returncode == 2, run.explain()
        lines = run.stderr.strip().splitlines()
        assert len(lines) == 1 and "cid=77: another running VM has this CID" in lines[0], run.stderr
    finally:
        first.stop()
    run = run_bulkhead("run", "--kernel", TEST_GUEST, "--mem", "64",
                       "--vsock", f"cid=77,socket={tmp_path}/b.sock", "--cmdline", "gk.tests=pio",
                       timeout=120)
    assert run.returncode == 0, run.explain()  # released when its holder ended


def test_a_vm_config_file_starts_the_same_devices(tmp_path) -> None:
    """`bulkhead run --config vm.toml`: run flags as keys, devices as tables; a flag given with
    it overrides the file (here --cmdline)."""
    vsock = str(tmp_path / "v.sock")
    lst, _ = echo_server(f"{vsock}_{PORT}")
    config = tmp_path / "vm.toml"
    config.write_text(f'''
kernel = "{TEST_GUEST}"
mem = 64
cmdline = "gk.tests=pio"
rng = true

[vsock]
cid = 43
socket = "{vsock}"
''')
    try:
        assert run_bulkhead("config", "check", str(config)).returncode == 0
        run = run_bulkhead("run", "--config", str(config), "--cmdline",
                           f"gk.tests=virtio-rng,virtio-vsock gk.vsock={PORT}", timeout=150)
    finally:
        lst.close()
    assert run.returncode == 0 and run.done == (2, 2), run.explain()
    ok, detail = run.results["virtio-vsock"]
    assert ok and "cid=43" in detail, detail


def test_a_firecracker_config_runs_with_its_drive_and_vsock(tmp_path) -> None:
    """Firecracker's JSON config, mapped: boot-source, machine-config, a drive with a rate
    limiter, vsock (the guest echoes through the CID and socket the JSON names)."""
    import json

    image = tmp_path / "root.img"
    image.write_bytes(bytes(4 << 20))
    vsock = str(tmp_path / "fc.vsock")
    lst, _ = echo_server(f"{vsock}_{PORT}")
    config = tmp_path / "vm.json"
    config.write_text(json.dumps({
        "boot-source": {"kernel_image_path": TEST_GUEST,
                        "boot_args": f"gk.tests=virtio-blk,virtio-vsock gk.vsock={PORT}"},
        "machine-config": {"vcpu_count": 1, "mem_size_mib": 64, "smt": False},
        "drives": [{"drive_id": "rootfs", "path_on_host": str(image), "is_root_device": True,
                    "is_read_only": False,
                    "rate_limiter": {"ops": {"size": 1000, "refill_time": 100}}}],
        "vsock": {"vsock_id": "vsock0", "guest_cid": 46, "uds_path": vsock},
    }))
    try:
        run = run_bulkhead("run", "--firecracker-config", str(config), timeout=150)
    finally:
        lst.close()
    assert run.returncode == 0 and run.done == (2, 2), run.explain()
    assert "cid=46" in run.results["virtio-vsock"][1]


def test_a_vsock_without_cid_gets_the_lowest_free_one_allocated(tmp_path) -> None:
    """Two VMs at once, neither naming a CID: each gets its own (issue 15: identities are
    allocated, never derived), and the guest reads the allocated one from its config space."""
    from vmm_core.testing import BackgroundVm
    servers, vms = [], []
    try:
        for i in range(2):
            vsock = str(tmp_path / f"v{i}.sock")
            servers.append(echo_server(f"{vsock}_{PORT}")[0])
            vms.append(BackgroundVm("run", "--kernel", TEST_GUEST, "--mem", "64", "--hold",
                                    "--vsock", f"socket={vsock}",
                                    "--cmdline", f"gk.tests=virtio-vsock gk.vsock={PORT}"))
        cids = []
        for vm in vms:
            deadline = time.monotonic() + 60
            while not any("GK done" in line for line in vm.stdout):
                assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
                time.sleep(0.05)
            ok, detail = vm.results()[0]["virtio-vsock"]
            assert ok, vm.explain()
            cids.append(int(detail.split("cid=")[1].split()[0]))
        assert len(set(cids)) == 2 and min(cids) >= 3, cids
    finally:
        for vm in vms:
            vm.kill()
        for s in servers:
            s.close()


def test_net_in_a_new_namespace_and_vsock_cid_3_run_jailed_side_by_side(tmp_path, private_registry,
                                                                       netns):
    """Issue 12's "done when" line: `--net tap=…,netns=new --vsock cid=3` starts both devices
    jailed, each in its own process.  The tap lives in a namespace of the VM's own (held by the
    core, holding only lo and the tap), not in the host's; `bulkhead net setup` then connects
    that namespace to a "host" side (a namespace the test made, standing in for the real host)
    while the guest waits, and the guest pings the host's end of the veth through it (ARP for
    its gateway, the tap's new address; ICMP routed by the VM's namespace).  The guest's vsock
    echo passes through the broker."""
    import json
    import subprocess

    from vmm_core.cli_control import wait_for_vm
    from vmm_core.testing import BackgroundVm, bulkhead_argv, device_pids
    from vmm_core.testing.netns import held_netns

    host_side = netns()
    vsock = str(tmp_path / "v.sock")
    lst, seen = echo_server(f"{vsock}_{PORT}")
    vm = BackgroundVm("run", "--kernel", TEST_GUEST, "--mem", "64", "--hold", "--name", "nv1",
                      "--net", "tap=bh0,netns=new", "--vsock", f"cid=3,socket={vsock}",
                      "--cmdline", "gk.tests=virtio-net,virtio-vsock gk.net=10.0.2.15/24,10.0.2.2,10.200.0.1 "
                                   f"gk.net_wait_ms=60000 gk.vsock={PORT}")
    try:
        deadline = time.monotonic() + 60
        while not (held := held_netns(vm.pid)):
            assert vm.proc.poll() is None and time.monotonic() < deadline, vm.explain()
            time.sleep(0.05)
        [ns_path] = held
        links = subprocess.run(["nsenter", f"--net={ns_path}", "ip", "-o", "link"],
                               capture_output=True, text=True, check=True).stdout
        names = sorted(line.split(":")[1].strip() for line in links.splitlines())
        assert names == ["bh0", "lo"], links
        host_links = subprocess.run(["ip", "-o", "link"], capture_output=True, text=True).stdout
        assert " bh0:" not in host_links

        setup = subprocess.run(["ip", "netns", "exec", host_side,
                                *bulkhead_argv("net", "setup", "--netns", ns_path, "--tap", "bh0",
                                               "--name", "nv1")],
                               capture_output=True, text=True, timeout=30)
        assert setup.returncode == 0, setup.stderr
        while not any(line.startswith("GK done") for line in vm.stdout):
            assert vm.proc.poll() is None and time.monotonic() < deadline + 60, vm.explain()
            time.sleep(0.05)
        [net_line] = [line for line in vm.stdout if line.startswith("GK virtio-net ")]
        assert net_line.startswith("GK virtio-net ok ") and " target=10.200.0.1 " in net_line, vm.explain()
        guest_mac, tap_mac = net_line.split("mac=")[1].split()[0], net_line.split("peer-mac=")[1].split()[0]
        # Who talked: the guest learnt the tap's MAC, the VM's namespace the guest's (an ARP the
        # guest answered while it waited for the echo reply routed back from the host side).
        in_vm_ns = ["nsenter", f"--net={ns_path}", "ip"]
        tap_link = subprocess.run([*in_vm_ns, "-br", "link", "show", "bh0"], capture_output=True,
                                  text=True, check=True).stdout
        assert tap_link.split()[2] == tap_mac, tap_link
        neigh = subprocess.run([*in_vm_ns, "neigh", "show", "10.0.2.15"], capture_output=True,
                               text=True, check=True).stdout
        assert f"lladdr {guest_mac}" in neigh, neigh
        assert any(line.startswith("GK virtio-vsock ok cid=3 ") for line in vm.stdout), vm.explain()
        assert b"".join(seen).startswith(b"bulkhead vsock echo"), seen
        wait_for_vm("nv1")
        ps = run_bulkhead("ps", "--json")
        assert ps.returncode == 0, ps.explain()
        [row] = json.loads(ps.stdout)
        devices = {d["name"]: d for d in row["devices"]}
        assert {n: d["mode"] for n, d in devices.items()} == {"net0": "sandboxed",
                                                              "vsock0": "sandboxed"}
        pids = device_pids(vm.pid)
        assert {n: d["pid"] for n, d in devices.items()} == pids and len(set(pids.values())) == 2

        assert run_bulkhead("stop", "nv1").returncode == 0
        assert vm.wait(15) == 0, vm.explain()
    finally:
        vm.kill()
        lst.close()
