"""The channel between the test session and rank 0 of a tensor-parallel worker: one localhost TCP
connection carrying length-prefixed pickled messages (multiprocessing.connection), authenticated with a
random key before anything is unpickled, so another local user cannot feed either side a pickle.

The session listens on 127.0.0.1 port 0 (the kernel picks a port no one holds, so there is nothing to
collide with) and rank 0 connects back; waits poll the worker's processes so that a dead worker is an
error within a second, not a hang."""
from __future__ import annotations

import os
import pickle
import socket
import threading
import time
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from typing import Callable

KEY_ENV = "NEOXMII_CHANNEL_KEY"


class ChannelTimeout(TimeoutError):
    pass


class Listener:
    def __init__(self) -> None:
        self.authkey = os.urandom(32)
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self._sock.settimeout(0.25)

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def env(self) -> dict[str, str]:
        """What the worker needs to connect back (the key goes through the environment, not argv)."""
        return {KEY_ENV: self.authkey.hex()}

    def accept(self, timeout: float, check: Callable[[], None] = lambda: None) -> Connection:
        """The first authenticated connection; check() runs between polls and may raise (dead worker)."""
        deadline = time.monotonic() + timeout
        while True:
            check()
            try:
                sock, _ = self._sock.accept()
            except socket.timeout:
                if time.monotonic() > deadline:
                    raise ChannelTimeout(f"no worker connected to {self.address} within {timeout:.0f} s") from None
                continue
            sock.setblocking(True)       # Connection reads the raw fd: it must not be non-blocking
            conn = Connection(sock.detach())
            try:
                deliver_challenge(conn, self.authkey)
                answer_challenge(conn, self.authkey)
            except Exception:            # a stranger: drop it and keep waiting for the worker
                conn.close()
                continue
            return conn

    def accept_in_background(self, timeout: float) -> None:
        """Start accepting now, in a thread. A worker's connect waits for this side's challenge: accepted
        only when a test first needs the worker, a worker launched ahead would sit idle until then instead
        of loading (measured: three prelaunched workers on one H200 loaded one after another, each when its
        first test asked). accepted() then hands the connection over."""
        self._outcome: dict = {}

        def run() -> None:
            try:
                self._outcome["conn"] = self.accept(timeout)
            except BaseException as exc:    # handed to accepted(): raised in the session's thread
                self._outcome["error"] = exc
        self._thread = threading.Thread(target=run, name=f"neoxmii-accept-{self.address}", daemon=True)
        self._thread.start()

    def accepted(self, timeout: float, check: Callable[[], None] = lambda: None) -> Connection:
        """The connection accept_in_background() took (or accept() now, if it was never started); check()
        runs between polls and may raise (dead worker)."""
        thread = getattr(self, "_thread", None)
        if thread is None:
            return self.accept(timeout, check)
        deadline = time.monotonic() + timeout
        while thread.is_alive():
            check()
            thread.join(0.25)
            if thread.is_alive() and time.monotonic() > deadline:
                raise ChannelTimeout(f"no worker connected to {self.address} within {timeout:.0f} s")
        if "error" in self._outcome:
            raise self._outcome["error"]
        return self._outcome["conn"]

    def close(self) -> None:
        self._sock.close()


def connect(address: str, authkey: bytes | None = None) -> Connection:
    host, port = address.rsplit(":", 1)
    key = authkey if authkey is not None else bytes.fromhex(os.environ[KEY_ENV])
    return Client((host, int(port)), family="AF_INET", authkey=key)


def send(conn: Connection, obj) -> None:
    """Plain pickle, not Connection.send: torch registers its tensors with multiprocessing's pickler as
    shared-memory handles that only a related process can open; these bytes are the tensor data."""
    conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))


def recv(conn: Connection):
    return pickle.loads(conn.recv_bytes())


def receive(conn: Connection, timeout: float, check: Callable[[], None] = lambda: None,
            interval: float = 0.5):
    """recv() with a deadline; check() runs every interval while waiting."""
    deadline = time.monotonic() + timeout
    while not conn.poll(interval):
        check()
        if time.monotonic() > deadline:
            raise ChannelTimeout(f"no answer within {timeout:.0f} s")
    return recv(conn)
