"""Text from a device is untrusted: it reaches the operator's log only through `escape`."""

from __future__ import annotations


def escape(text: str, limit: int = 500) -> str:
    """A device's words, safe for one log line: no newline, carriage return or terminal escape
    sequence survives (a device must not forge log lines or drive the operator's terminal)."""
    out = text[:limit].encode("unicode_escape", errors="replace").decode("ascii", errors="replace")
    return out + ("..." if len(text) > limit else "")
