"""common.ports: ports handed out by one process are distinct and free.

Without the memory of handed-out ports, 300 kernel probes on this kind of machine repeat a port a few
times (measured: 296 distinct of 300), which is how a CI run started Orthanc with equal DICOM and HTTP
ports.
"""

from __future__ import annotations

import socket

import pytest

from common.ports import free_port


def test_ports_from_one_process_never_repeat_and_can_be_bound() -> None:
    ports = [free_port() for _ in range(300)]
    assert len(set(ports)) == len(ports)
    for port in ports[:20]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))  # free when handed out


def test_a_bad_attempt_count_is_named() -> None:
    with pytest.raises(ValueError, match="attempts"):
        free_port(attempts=0)
