"""Test doubles shipped as API: a host-side virtio driver and hostile-ring builders."""
