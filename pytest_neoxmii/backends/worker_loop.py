"""The request loop of every worker process that answers the session over the channel (deploy/channel.py):
a tensor-parallel rank (backends/ds_rank.py) and the one-process worker of an isolated engine
(pytest_neoxmii/worker.py). Rank 0 receives each request and broadcasts it, so every rank runs the same
calls (the tensor-parallel collectives need all of them); a one-process worker broadcasts to itself.

Requests: {"op": NAME, "args": (...)} -> {"ok": True, "result": ...} or {"ok": False, "error": traceback,
"unavailable": bool}; {"op": "shutdown"} ends the loop cleanly. NAME must be one of `ops`, each a method of
`target`."""
from __future__ import annotations

import sys
import traceback
from typing import Callable, Iterable

DEFAULT_OPS = ("generate", "score", "trace")


def serve(conn, target, rank: int, world: int, broadcast: Callable[[object], object],
          ops: Iterable[str] = DEFAULT_OPS) -> int:
    """Answer requests until shutdown (or the session closes the channel); returns the process exit code."""
    from pytest_neoxmii.deploy.channel import recv, send
    from pytest_neoxmii.errors import BackendUnavailable
    ops = tuple(ops)
    while True:
        request = None
        if rank == 0:
            try:
                request = recv(conn)
            except (EOFError, OSError):
                request = {"op": "shutdown", "reason": "the test session closed the connection"}
        request = broadcast(request)
        op = request.get("op")
        if op == "shutdown":
            if rank == 0:
                try:
                    send(conn, {"ok": True})
                except OSError:
                    pass
            return 0
        try:
            if op not in ops:
                raise ValueError(f"unknown request {op!r}")
            reply = {"ok": True, "result": getattr(target, op)(*request.get("args", ()))}
        except BackendUnavailable as exc:
            reply = {"ok": False, "unavailable": True, "error": str(exc)}
        except Exception:
            reply = {"ok": False, "unavailable": False, "error": traceback.format_exc()}
        if rank == 0:
            send(conn, reply)
        if not reply["ok"] and not reply["unavailable"] and world > 1:
            # The ranks may no longer agree on where they are in the collectives: end this rank, and the
            # DeepSpeed launcher ends the others. (BackendUnavailable is raised before any collective.)
            print(f"rank {rank}: request {op!r} failed, ending:\n{reply['error']}", file=sys.stderr, flush=True)
            return 1
