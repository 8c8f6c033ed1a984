"""The embedded servers' ports: outside the kernel's ephemeral range, and kept across a restart
when they can be (clients only know the old URL)."""

from __future__ import annotations

import socket
import threading

from msstore._procs import HOST, ephemeral_range, free_port, port_for


def test_free_ports_lie_below_the_ephemeral_range_so_no_client_can_self_connect_on_them() -> None:
    low, high = ephemeral_range()
    assert 1024 <= low <= high
    ports = {free_port() for _ in range(20)}
    assert all(1024 <= p < low for p in ports) and len(ports) > 1
    for p in ports:
        with socket.socket() as s:  # each was free to bind
            s.bind((HOST, p))


def test_a_previous_port_held_for_a_moment_is_waited_for_not_replaced() -> None:
    port = free_port()
    holder = socket.socket()  # bound, not listening: what a client's own socket looks like
    holder.bind((HOST, port))
    threading.Timer(0.5, holder.close).start()
    assert port_for({"port": port}, patience=5.0) == port
    assert holder.fileno() == -1  # it returned only once the holder had let go


def test_a_previous_port_held_longer_than_the_patience_gives_way_to_a_new_one() -> None:
    port = free_port()
    with socket.socket() as holder:
        holder.bind((HOST, port))
        assert port_for({"port": port}, patience=0.3) != port
    assert port_for(None) != 0
