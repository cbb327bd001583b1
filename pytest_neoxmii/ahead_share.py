"""Sharing an engine's work ahead among several workers of the same deployment (worker.py, "working ahead").

An engine that streams its weights in at every forward (ZeRO-Inference) computes the session's parity calls
far slower than the others while the GPU stays mostly idle: its time goes to fetching parameters layer by
layer, bound by kernel launches and PCIe, not by the GPU (one H200, pythia-160m synthetic: its 13 calls took
30.7-48.6 s, ds's 2.6-3.0 s). Those calls were the session's critical path. Such an engine declares
`ahead_workers` (backends/base.py), and the session deploys that many workers of the same engine and
configuration, each computing its share of the calls. Same configuration, same deterministic computation:
which worker answered a call does not change a verdict. The judges never know there was more than one.

Nothing here knows an engine: the costs are the calls' own (forwards), the memory rule the engine's weights."""
from __future__ import annotations

Call = tuple[str, tuple]      # (op, args) exactly as the session makes the call (session._call_args)


def call_cost(call: Call) -> int:
    """The forwards a call runs: one per new token of a greedy generation, one for a teacher-forced score."""
    op, args = call
    if op == "generate" and len(args) > 1:
        return max(int(args[1]), 1)
    return 1


def split_calls(calls: list[Call], shares: int) -> list[list[Call]]:
    """The calls dealt to `shares` workers in test order, each to the share with the fewest forwards so far
    (ties to the first), so that the shares finish together and each computes its calls in the order the
    tests will ask for them. Share 0 is the engine's own deployment."""
    shares = max(int(shares), 1)
    out: list[list[Call]] = [[] for _ in range(shares)]
    load = [0] * shares
    for call in calls:
        i = min(range(shares), key=lambda s: (load[s], s))
        out[i].append(call)
        load[i] += call_cost(call)
    return out


def host_memory_allows(workers: int, weight_bytes: int, available_bytes: int | None) -> bool:
    """Whether `workers` workers of an engine that keeps its weights in CPU memory fit the host: each holds
    them there, twice over while it loads (the checkpoint, then ZeRO's pinned partitions), and they may take
    at most half of what the host has available. Unknown host memory: one worker only."""
    if workers <= 1:
        return True
    if available_bytes is None or weight_bytes <= 0:
        return False
    return workers * 2 * weight_bytes <= available_bytes / 2


def helper_key(key: str, index: int) -> str:
    """The name a helper's work and teardown are reported under: 'zero helper 1:fp16' for 'zero:fp16'."""
    name, _, dtype = key.partition(":")
    return f"{name} helper {index}:{dtype}"


def in_report_order(reports: dict[str, dict]) -> dict[str, dict]:
    """The accounts of work ahead with each deployment's helpers right after it, in their order ('zero:fp16',
    'zero helper 1:fp16', 'zero helper 2:fp16'), whichever was taken first (a helper's is taken when its
    share is done, often before its deployment's)."""
    parsed = {key: _deployment_and_index(key) for key in reports}
    first_seen: dict[str, int] = {}
    for deployment, _ in parsed.values():
        first_seen.setdefault(deployment, len(first_seen))
    return {key: reports[key] for key in sorted(reports, key=lambda k: (first_seen[parsed[k][0]], parsed[k][1]))}


def _deployment_and_index(key: str) -> tuple[str, int]:
    """helper_key undone: ('zero:fp16', 1) for 'zero helper 1:fp16'; (key, 0) for a deployment's own key."""
    name, _, dtype = key.partition(":")
    engine, sep, index = name.rpartition(" helper ")
    return (f"{engine}:{dtype}", int(index)) if sep and index.isdigit() else (key, 0)
