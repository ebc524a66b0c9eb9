"""A TCP proxy the tests control: it relays one address to another and keeps every byte it relayed, so a
test can read what crossed a link (and show, for one that is encrypted, that no plaintext did)."""

from __future__ import annotations

import socket
import threading


class CaptureProxy:
    """Listens on `listen` (default: 127.0.0.1:<free port>) and relays every connection to `target`
    ("host:port")."""

    def __init__(self, target: str, listen: tuple[str, int] = ("127.0.0.1", 0)) -> None:
        host, _, port = target.rpartition(":")
        self.target = (host, int(port))
        self.listener = socket.create_server(listen)
        self.address = f"{listen[0]}:{self.listener.getsockname()[1]}"
        self._lock = threading.Lock()
        self._captured = bytearray()
        self._sockets: list[socket.socket] = []
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    @property
    def captured(self) -> bytes:
        """Every byte relayed so far, both directions."""
        with self._lock:
            return bytes(self._captured)

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return  # closed
            try:
                server = socket.create_connection(self.target, timeout=10)
            except OSError:
                client.close()
                continue
            server.settimeout(None)
            with self._lock:
                if self._closed:
                    client.close()
                    server.close()
                    return
                self._sockets += [client, server]
            for source, sink in ((client, server), (server, client)):
                threading.Thread(target=self._pump, args=(source, sink), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket) -> None:
        try:
            while data := source.recv(65536):
                with self._lock:
                    self._captured += data
                sink.sendall(data)
        except OSError:
            pass
        finally:
            for end in (source, sink):
                try:
                    end.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass

    def close(self) -> None:
        with self._lock:
            self._closed = True
            sockets, self._sockets = self._sockets, []
        try:
            self.listener.shutdown(socket.SHUT_RDWR)  # wakes the accepting thread
        except OSError:
            pass
        self.listener.close()
        for sock in sockets:
            sock.close()


def pieces_found(haystack: bytes, needle: bytes, window: int) -> int:
    """How many of the consecutive `window`-byte pieces of `needle` occur anywhere in `haystack`."""
    return sum(
        1
        for start in range(0, len(needle) - window + 1, window)
        if needle[start : start + window] in haystack
    )
