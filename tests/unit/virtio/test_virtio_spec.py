"""create_device(spec): validation with errors that name the bad field."""

from __future__ import annotations

import os

import pytest

from device_procs.virtio import BlkDevice, ConsoleDevice, DeviceSpecError, RngDevice, create_device


def test_create_each_type(image, tmp_path, devnull_fd):
    blk = create_device({"type": "blk", "path": image, "readonly": True, "serial": "s1"})
    assert isinstance(blk, BlkDevice) and blk.readonly and blk.serial == b"s1"
    blk.close()
    assert isinstance(create_device({"type": "rng"}), RngDevice)
    con = create_device({"type": "console", "path": str(tmp_path / "out.log")})
    assert isinstance(con, ConsoleDevice) and os.path.exists(tmp_path / "out.log")
    con.close()
    con = create_device({"type": "console", "fd": devnull_fd})
    con.close()
    os.fstat(devnull_fd)  # not owned: still open


@pytest.mark.parametrize("spec,field", [
    ({"type": "floppy"}, "type"),
    ({}, "type"),
    ({"type": "blk"}, "path"),
    ({"type": "blk", "path": 3}, "path"),
    ({"type": "blk", "path": "", "readonly": False}, "path"),
    ({"type": "blk", "path": "/x", "readonly": "yes"}, "readonly"),
    ({"type": "blk", "path": "/x", "size": 3}, "size"),
    ({"type": "rng", "path": "/dev/random"}, "path"),
    ({"type": "console"}, "path"),
    ({"type": "console", "fd": True}, "fd"),
    ({"type": "console", "fd": -1}, "fd"),
])
def test_invalid_specs_name_the_field(spec, field):
    with pytest.raises(DeviceSpecError, match=field):
        create_device(spec)


def test_spec_must_be_a_dict():
    with pytest.raises(DeviceSpecError):
        create_device(["blk"])  # type: ignore[arg-type]


def test_missing_image_is_a_spec_error(tmp_path):
    with pytest.raises(DeviceSpecError, match="cannot open"):
        create_device({"type": "blk", "path": str(tmp_path / "missing.img")})


def test_spec_error_is_a_value_error():
    assert issubclass(DeviceSpecError, ValueError)
