"""Ports picked for processes started later stay clear of outgoing connections."""

from __future__ import annotations

import socket

from ops.processes import _ephemeral_range, free_port


def test_free_ports_are_bindable_distinct_and_outside_the_ephemeral_range() -> None:
    low, high = _ephemeral_range()
    ports = [free_port() for _ in range(40)]
    assert len(set(ports)) == len(ports)  # never handed out twice
    assert not any(low <= p <= high for p in ports)  # no outgoing connection can hold one
    for port in ports[:5]:
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
