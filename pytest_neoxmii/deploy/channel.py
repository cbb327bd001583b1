"""The channel between the test session and rank 0 of a tensor-parallel worker: one localhost TCP
connection carrying length-prefixed pickled messages (multiprocessing.connection), authenticated with a
random key before anything is unpickled, so another local user cannot feed either side a pickle.

The session listens on 127.0.0.1 port 0 (the kernel picks a port no one holds, so there is nothing to
collide with) and rank 0 connects back; waits poll the worker's processes so that a dead worker is an
error within a second, not a hang.

Large tensors in a worker's answers (a 2016-token case's scores are 405 MB of float32) do not go through
the socket: the worker writes each into a file of the session's spill directory, in shared memory where the
machine has it, and pickles its name; the session reads the file back and deletes it. Pickling such a
tensor into the stream cost 1.5-3 s a transfer on a 2-core CPU (a copy into the pickle, the socket, a copy
out); a file in memory is one write and one read. A tensor that cannot be written there (no room) goes
through the socket as before."""
from __future__ import annotations

import io
import os
import pickle
import shutil
import socket
import tempfile
import threading
import time
from multiprocessing.connection import Client, Connection, answer_challenge, deliver_challenge
from typing import Callable

KEY_ENV = "NEOXMII_CHANNEL_KEY"
SPILL_ENV = "NEOXMII_CHANNEL_SPILL_DIR"    # set for the worker only: where it writes large tensors
SPILL_MIN_BYTES = 8 << 20                  # smaller tensors cost less in the stream than as a file
_SPILLED = "neoxmii-spilled-tensor"
_OWN_SPILL_DIRS: set[str] = set()          # this process's listeners' directories: the only ones read from


class ChannelTimeout(TimeoutError):
    pass


class Listener:
    def __init__(self) -> None:
        self.authkey = os.urandom(32)
        self.spill_dir: str | None = None       # made by env(), removed by close()
        self._sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(1)
        self._sock.settimeout(0.25)

    @property
    def address(self) -> str:
        host, port = self._sock.getsockname()
        return f"{host}:{port}"

    def env(self) -> dict[str, str]:
        """What the worker needs to connect back (the key goes through the environment, not argv), and the
        directory it writes large tensors into (see the module's docstring)."""
        if self.spill_dir is None:
            self.spill_dir = os.path.realpath(tempfile.mkdtemp(prefix="neoxmii-spill-", dir=_spill_root()))
            _OWN_SPILL_DIRS.add(self.spill_dir)
        return {KEY_ENV: self.authkey.hex(), SPILL_ENV: self.spill_dir}

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
        if self.spill_dir is not None:          # what a worker wrote and the session never read
            _OWN_SPILL_DIRS.discard(self.spill_dir)
            shutil.rmtree(self.spill_dir, ignore_errors=True)
            self.spill_dir = None


def _spill_root() -> str | None:
    """/dev/shm where the machine has a writable one (memory, not disk), else the temporary directory."""
    shm = "/dev/shm"
    return shm if os.path.isdir(shm) and os.access(shm, os.W_OK) else None


def connect(address: str, authkey: bytes | None = None) -> Connection:
    host, port = address.rsplit(":", 1)
    key = authkey if authkey is not None else bytes.fromhex(os.environ[KEY_ENV])
    return Client((host, int(port)), family="AF_INET", authkey=key)


class _SpillingPickler(pickle.Pickler):
    """Pickles large CPU tensors as the name of a file holding their bytes (see the module's docstring)."""

    def __init__(self, file, spill_dir: str) -> None:
        super().__init__(file, protocol=pickle.HIGHEST_PROTOCOL)
        self.spill_dir = spill_dir

    def persistent_id(self, obj):
        cls = type(obj)
        if cls.__name__ != "Tensor" or cls.__module__ != "torch":     # (no torch import for other objects)
            return None
        if obj.device.type != "cpu" or str(obj.layout) != "torch.strided" or obj.is_quantized \
                or obj.numel() * obj.element_size() < SPILL_MIN_BYTES:
            return None
        import torch
        path = None
        try:
            flat = obj.detach().contiguous().reshape(-1).view(torch.uint8)
            fd, path = tempfile.mkstemp(suffix=".tensor", dir=self.spill_dir)
            with os.fdopen(fd, "wb") as f:
                flat.numpy().tofile(f)
        except (OSError, RuntimeError, TypeError):     # no room, or bytes numpy cannot view: in the stream
            if path is not None:
                try:
                    os.unlink(path)
                except OSError:
                    pass
            return None
        return (_SPILLED, path, str(obj.dtype).removeprefix("torch."), tuple(obj.shape))


class _SpillReadingUnpickler(pickle.Unpickler):
    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 4 and pid[0] == _SPILLED):
            raise pickle.UnpicklingError(f"unknown persistent id in a worker's message: {pid!r}")
        _, path, dtype, shape = pid
        path = os.path.realpath(path)
        if os.path.dirname(path) not in _OWN_SPILL_DIRS:     # only a file of this session's own directory
            raise pickle.UnpicklingError(f"a worker named a tensor file outside the session's spill "
                                         f"directories: {path}")
        import numpy
        import torch
        try:
            data = numpy.fromfile(path, dtype=numpy.uint8)
        finally:
            os.unlink(path)
        return torch.from_numpy(data).view(getattr(torch, dtype)).reshape(shape)


def send(conn: Connection, obj) -> None:
    """Plain pickle, not Connection.send: torch registers its tensors with multiprocessing's pickler as
    shared-memory handles that only a related process can open; these bytes are the tensor data. In a
    worker (SPILL_ENV set), large tensors go through a file instead (see the module's docstring)."""
    spill_dir = os.environ.get(SPILL_ENV)
    if not spill_dir:
        conn.send_bytes(pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL))
        return
    buffer = io.BytesIO()
    _SpillingPickler(buffer, spill_dir).dump(obj)
    conn.send_bytes(buffer.getbuffer())


def recv(conn: Connection):
    return _SpillReadingUnpickler(io.BytesIO(conn.recv_bytes())).load()


def receive(conn: Connection, timeout: float, check: Callable[[], None] = lambda: None,
            interval: float = 0.5):
    """recv() with a deadline; check() runs every interval while waiting."""
    deadline = time.monotonic() + timeout
    while not conn.poll(interval):
        check()
        if time.monotonic() > deadline:
            raise ChannelTimeout(f"no answer within {timeout:.0f} s")
    return recv(conn)
