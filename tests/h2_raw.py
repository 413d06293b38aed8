"""Hand-driven HTTP/2 for tests: a client that opens gRPC calls and then misbehaves (stalls
mid-body, sends broken frames) in ways no gRPC client library will."""

from __future__ import annotations

import socket
import struct
import threading

import h2.config
import h2.connection


def grpc_headers(path: str) -> list[tuple[str, str]]:
    return [
        (":method", "POST"),
        (":scheme", "http"),
        (":path", path),
        (":authority", "127.0.0.1"),
        ("content-type", "application/grpc"),
        ("te", "trailers"),
    ]


def grpc_frame(message: bytes) -> bytes:
    """A gRPC length-prefixed message (uncompressed)."""
    return b"\x00" + struct.pack(">I", len(message)) + message


class StalledConnection:
    """One connection holding ``streams`` calls to ``path`` whose request body never finishes:
    HEADERS (with ``metadata``, e.g. a bearer token), then a DATA frame announcing a 100-byte
    message and carrying 3 bytes of it.

    The connection otherwise behaves (it answers PINGs and SETTINGS from a reader thread), the
    way a slow client behind a healthy network does; it is closed by :meth:`close`.
    """

    def __init__(self, port: int, path: str, streams: int, metadata: tuple[tuple[str, str], ...] = ()):
        self.sock = socket.create_connection(("127.0.0.1", port), timeout=10)
        self.conn = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True))
        self.conn.initiate_connection()
        self.stream_ids = []
        for _ in range(streams):
            sid = self.conn.get_next_available_stream_id()
            self.conn.send_headers(sid, grpc_headers(path) + list(metadata))
            self.conn.send_data(sid, b"\x00" + struct.pack(">I", 100) + b"abc")
            self.stream_ids.append(sid)
        self.reset_streams: set[int] = set()
        self.sock.sendall(self.conn.data_to_send())
        self._lock = threading.Lock()
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        import h2.events

        try:
            while True:
                data = self.sock.recv(65536)
                if not data:
                    return
                with self._lock:
                    for ev in self.conn.receive_data(data):
                        if isinstance(ev, (h2.events.StreamReset, h2.events.StreamEnded)):
                            self.reset_streams.add(ev.stream_id)
                    out = self.conn.data_to_send()
                if out:
                    self.sock.sendall(out)
        except (OSError, h2.exceptions.ProtocolError):
            return

    def close(self) -> None:
        try:
            self.sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        self.sock.close()
