"""A loopback TCP server that answers like a hostile or broken web server: raw bytes, chosen per request path.

`RawServer(script)` calls `script(path) -> list[bytes | float]` for each request: bytes are sent as they are, a
float sleeps that many seconds (a trickle is many small pieces with sleeps between them). Then it closes. Anything
HTTP allows or forbids can be sent: no status line, 200 headers, a Content-Length that lies, garbage chunking.
`hits` records every request path it received (a canary for the address guard).
"""
from __future__ import annotations

import socket
import threading
import time


class RawServer:
    def __init__(self, script, host: str = "127.0.0.1", port: int = 0):
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((host, port))
        self.sock.listen(128)
        self.port = self.sock.getsockname()[1]
        self.url = f"http://{f'[{host}]' if family == socket.AF_INET6 else host}:{self.port}"
        self.script, self.hits, self.connections = script, [], 0
        self._closed = False
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self):
        while not self._closed:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.connections += 1
            threading.Thread(target=self._answer, args=(conn,), daemon=True).start()

    def _answer(self, conn):
        try:
            conn.settimeout(10)
            data = b""
            while b"\r\n\r\n" not in data and len(data) < 1 << 20:
                piece = conn.recv(65536)
                if not piece:
                    return
                data += piece
            head, _, body = data.partition(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            length = next((int(line.split(":", 1)[1]) for line in lines[1:]
                           if line.lower().startswith("content-length:")), 0)
            while len(body) < length:
                piece = conn.recv(65536)
                if not piece:
                    break
                body += piece
            path = lines[0].split(" ")[1] if len(lines[0].split(" ")) > 1 else "/"
            self.hits.append(path)
            for part in self.script(path, body):
                if isinstance(part, float):
                    time.sleep(part)
                else:
                    conn.sendall(part)
        except Exception:   # a client that hung up, or a request the script cannot parse: just close
            pass
        finally:
            conn.close()

    def close(self):
        self._closed = True
        self.sock.close()


def http(status: str, headers: dict[str, str] | list[tuple[str, str]], body: bytes, length: bool = True) -> bytes:
    """An HTTP/1.1 response as bytes (Content-Length set from the body unless `length` is False)."""
    items = list(headers.items()) if isinstance(headers, dict) else list(headers)
    if length:
        items.append(("Content-Length", str(len(body))))
    items.append(("Connection", "close"))
    return (f"HTTP/1.1 {status}\r\n" + "".join(f"{k}: {v}\r\n" for k, v in items) + "\r\n").encode("latin-1") + body
