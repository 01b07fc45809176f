"""The receive buffer: linear-time line search, lazy compaction."""

from __future__ import annotations

import time

from pop3proto._receivebuffer import ReceiveBuffer


def test_find_and_take_lines() -> None:
    b = ReceiveBuffer()
    b.append(b"one\r\ntwo")
    i = b.find_line_end()
    assert b.take(i + 1) == b"one\r\n"
    assert b.find_line_end() == -1
    b.append(b"\n")
    assert b.take(b.find_line_end() + 1) == b"two\n"
    assert len(b) == 0


def test_byte_at_a_time_long_line_is_linear() -> None:
    b = ReceiveBuffer()
    t = time.perf_counter()
    for _ in range(200_000):
        b.append(b"x")
        assert b.find_line_end() == -1
    assert time.perf_counter() - t < 5  # quadratic rescans would take minutes
    b.append(b"\n")
    assert b.find_line_end() == 200_000


def test_compaction_keeps_unread_bytes() -> None:
    b = ReceiveBuffer()
    b.append(b"a" * 100_000)
    b.append(b"TAIL")
    b.consume_to(100_000)
    assert bytes(b) == b"TAIL"
    assert b.start == 0 and len(b.raw) == 4


def test_find_last_line_end() -> None:
    b = ReceiveBuffer()
    b.append(b"1 2\r\n3 4\r\n5")
    assert b.find_last_line_end() == 9
    b.consume_to(10)
    assert b.find_last_line_end() == -1
    assert b.find_line_end() == -1


def test_bytes_taken_without_copy_when_empty() -> None:
    b = ReceiveBuffer()
    chunk = b"x" * 1000
    b.append(chunk)
    assert b.raw is chunk
    b.consume_to(1000)
    b.append(bytearray(b"yz"))
    assert bytes(b) == b"yz"
