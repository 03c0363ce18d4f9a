"""Enums of the public API, with the values of memfabric-hybrid 1.3."""

from __future__ import annotations

import enum


class TransferOpcode(enum.IntEnum):
    """Direction of a transfer. The seed spells READ/WRITE; 1.3 spells Read/Write (aliases)."""

    READ = 0
    WRITE = 1
    Read = 0
    Write = 1


class TransDataOpType(enum.IntEnum):
    """Kind of data path a TransferEngine asks for. On a host every kind maps to the real host
    paths (same host: cma/local; other hosts: tcp), so callers passing the default work."""

    SDMA = 1
    HOST_RDMA = 2
    DEVICE_RDMA = 8
    DEVICE_URMA = 64
    DEVICE_UBOE = 128
