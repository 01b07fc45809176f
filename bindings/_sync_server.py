"""The blocking-socket POP3 server: one thread per connection, each running
the engine's ``serve_session`` driver. All POP3 rules come from the engine."""

from __future__ import annotations

import contextlib
import logging
import socket
import ssl
import threading
import time
from types import TracebackType
from typing import Any

import pop3proto as p
from pop3proto import _requests as rq

from ._common import MaildropRunner, ServerBase, is_loopback, log_session, tls_info

__all__ = ["Server"]

log = logging.getLogger("pop3proto.server")

#: Bytes asked of the socket per read.
READ_SIZE = 256 * 1024


class Server(ServerBase):
    """A POP3 server on blocking sockets, serving ``maildrop``.

    ``listen`` is the ``(host, port)`` of the plaintext listener (STLS offered
    when ``ssl_context`` is given), ``tls_listen`` the implicit-TLS one
    (RFC 8314); either may be None; port 0 picks a free port (see
    ``addresses``). ``config`` carries the policy (``ServerConfig``); its
    ``authenticator`` may instead be given as ``authenticator``. ``backlog``
    should be at least the expected concurrency. Use as a context manager, or
    call ``start()`` / ``close()``.
    """

    def _setup(self) -> None:
        self._closing = threading.Event()
        self._threads: set[threading.Thread] = set()
        self._sockets: set[socket.socket] = set()
        self._lock = threading.Lock()
        self._acceptors: list[threading.Thread] = []

    def start(self) -> Server:
        """Accept connections in background threads."""
        for sock, implicit in self._listeners:
            t = threading.Thread(target=self._accept_loop, args=(sock, implicit), daemon=True)
            t.start()
            self._acceptors.append(t)
        return self

    def serve_forever(self) -> None:
        """Accept connections until ``close()`` is called from another thread."""
        self.start()
        self._closing.wait()

    def close(self, timeout: float = 5.0) -> None:
        """Stop accepting, end every session (without UPDATE: RFC 1939 §6),
        and wait for their threads."""
        self._closing.set()
        self._close_listeners()
        with self._lock:
            for conn in list(self._sockets):
                with contextlib.suppress(OSError):
                    conn.shutdown(socket.SHUT_RDWR)
            threads = list(self._threads)
        deadline = time.monotonic() + timeout
        for t in threads + self._acceptors:
            t.join(max(0.0, deadline - time.monotonic()))

    def __enter__(self) -> Server:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # ------------------------------------------------------------------

    def _accept_loop(self, listener: socket.socket, implicit: bool) -> None:
        while not self._closing.is_set():
            try:
                conn, addr = listener.accept()
            except OSError:
                return
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            t = threading.Thread(target=self._handle, args=(conn, addr[0], implicit), daemon=True)
            with self._lock:
                self._threads.add(t)
                self._sockets.add(conn)
            t.start()

    def _handshake(self, sock: socket.socket) -> tuple[ssl.SSLSocket, p.TLSInfo] | None:
        assert self.ssl_context is not None
        sock.settimeout(self.handshake_timeout)  # HARDENING 34
        try:
            tls = self.ssl_context.wrap_socket(sock, server_side=True)
        except (ssl.SSLError, OSError) as exc:
            log.info("TLS handshake failed: %s", exc)
            return None
        return tls, tls_info(tls, server_side=True, server_cert=self.server_certificate)

    def _handle(self, sock: socket.socket, peer: str, implicit: bool) -> None:
        raw = sock
        runner = MaildropRunner(self.maildrop)
        info = None
        try:
            if implicit:
                done = self._handshake(sock)
                if done is None:
                    return
                sock, info = done
            gen = p.serve_session(
                self.config,
                peer=peer,
                loopback=is_loopback(peer),
                tls_info=info,
                clock=time.monotonic,
            )
            log_session(log, self._run(gen, sock, runner))
        except Exception:
            log.exception("session with %s failed", peer)
        finally:
            runner.close()
            with contextlib.suppress(OSError):
                sock.close()
            with self._lock:
                self._sockets.discard(raw)
                self._threads.discard(threading.current_thread())

    def _run(
        self, gen: Any, sock: socket.socket, runner: MaildropRunner
    ) -> p.SessionSummary | None:
        result: Any = None
        try:
            while True:
                try:
                    req = gen.send(result)
                except StopIteration as stop:
                    summary: p.SessionSummary = stop.value
                    return summary
                result = None
                if isinstance(req, rq.Send):
                    try:
                        sock.settimeout(self.config.idle_timeout)
                        sock.sendall(req.data)
                    except OSError:
                        return None
                elif isinstance(req, rq.Receive):
                    sock.settimeout(req.timeout)
                    try:
                        result = sock.recv(READ_SIZE)
                    except TimeoutError:
                        result = rq.TIMED_OUT
                    except OSError:
                        result = b""
                elif isinstance(req, rq.StartTLS):
                    done = self._handshake(sock)
                    if done is not None:
                        sock, result = done
                elif isinstance(req, rq.Sleep):
                    self._closing.wait(req.seconds)
                elif runner.handles(req):
                    result = runner.run(req)
                else:  # pragma: no cover - the driver yields nothing else
                    raise TypeError(f"unexpected request {req!r}")
        finally:
            gen.close()
