"""Importing this module fails (NoDevice, with the reason) unless the verbs transport can open a device here.
Test harnesses that decide availability by importing a module (tests/transport/backends.py) use it."""

from __future__ import annotations

from rdmapool.transport.verbs_device import open_device

_ctx, DEVICE = open_device()
_ctx.close()
