"""Stand-in engines for the isolated-engine tests (test_isolated.py). They are imported by name inside the
worker process (`python -m pytest_neoxmii.worker --engine tests.unit.engines_for_workers:...`), so they live
in a module of their own, importable from the repository root."""
from __future__ import annotations

import dataclasses
import os
import sys

import torch

from pytest_neoxmii.backends.base import Backend, BackendInfo
from pytest_neoxmii.deploy.processes import DeploymentError
from pytest_neoxmii.errors import BackendUnavailable
from pytest_neoxmii.injection import InjectionFailed
from pytest_neoxmii.outputs import Generation, Scores


class EchoModel:
    """What latency.py times of an engine it holds: generate(input_ids=..., max_new_tokens=n, ...)."""

    def generate(self, input_ids, max_new_tokens, **kwargs):
        return torch.cat([input_ids, input_ids[:, -1:].repeat(1, max_new_tokens)], dim=1)


class EchoEngine(Backend):
    """Generates the last prompt token again and again; scores are the row's length everywhere. It records
    its pid in its info, so a test can tell that it ran in another process."""

    isolated = True

    @classmethod
    def load(cls, request):
        return cls(request)

    def __init__(self, request):
        self.model, self.device = EchoModel(), request.device
        markers = request.path / "echo-markers"       # made by a test that wants to see the close
        self.closed_marker = markers / f"closed-{os.getpid()}" if markers.is_dir() else None
        self.info = BackendInfo(backend="echo", dtype=request.dtype, device=request.device,
                                kernels="none (stand-in)", notes=[f"pid {os.getpid()}",
                                                                  f"deepspeed imported: {'deepspeed' in sys.modules}"])

    def generate(self, batch, max_new_tokens, top_k=5):
        return Generation(tokens=[[row[-1]] * max_new_tokens for row in batch.rows],
                          top_logprobs=[[[(row[-1], 0.0)]] * max_new_tokens for row in batch.rows])

    def score(self, batch):
        ids, mask = batch.padded()
        return Scores(logprobs=torch.full((*ids.shape, 3), float(len(batch.rows[0]))), mask=mask.bool())

    def close(self):
        if self.closed_marker is not None:          # the test sees that the worker closed its engine
            self.closed_marker.write_text("closed")


class ImportsDeepSpeed(EchoEngine):
    """An engine whose worker imports DeepSpeed first (as ds's, mii's and zero's do)."""
    worker_imports = ("deepspeed",)


class PoisonedByPadding(EchoEngine):
    """Like a CUDA context after an illegal memory access: decoding a left-padded batch fails, and so does
    every call after it in this process (the error is sticky); a fresh process works again."""

    poisoned = False

    def __init__(self, request):
        super().__init__(request)
        self.info = dataclasses.replace(self.info, backend="poison")   # what known issues match on

    def generate(self, batch, max_new_tokens, top_k=5):
        if len({len(row) for row in batch.rows}) > 1:
            PoisonedByPadding.poisoned = True
        if PoisonedByPadding.poisoned:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (stand-in)")
        return super().generate(batch, max_new_tokens, top_k)

    def score(self, batch):
        if PoisonedByPadding.poisoned:
            raise RuntimeError("CUDA error: an illegal memory access was encountered (stand-in)")
        return super().score(batch)


class AbortsInGenerate(EchoEngine):
    def generate(self, batch, max_new_tokens, top_k=5):
        print("stand-in engine: os.abort() in generate", file=sys.stderr, flush=True)
        os.abort()


class Unavailable(EchoEngine):
    @classmethod
    def load(cls, request):
        raise BackendUnavailable("stand-in engine: cannot run here, on purpose")


class InjectsNothing(EchoEngine):
    @classmethod
    def load(cls, request):
        raise InjectionFailed("kernel injection was requested but DeepSpeed injected 0/6 layers (stand-in)")


class FailsToLoad(EchoEngine):
    @classmethod
    def load(cls, request):
        raise RuntimeError("stand-in engine: failed on purpose while loading")


class CheckpointDoesNotLoad(EchoEngine):
    @classmethod
    def load(cls, request):
        raise DeploymentError("transformers could not load '/models/x': RuntimeError: size mismatch (stand-in)")


class RefusedBeforeStart(EchoEngine):
    @classmethod
    def check_can_run(cls, request):
        raise BackendUnavailable("stand-in engine: refused before any process starts")


class NeedsAMissingPackage(EchoEngine):
    requires = ("a_package_that_is_not_installed_anywhere",)


class NumbersItsCalls(EchoEngine):
    """Every generated token is the number of generate calls so far: a test can tell which call's result it
    was handed (one computed ahead, or one computed when asked). The first call fails when the prompt's
    first token is 13, on purpose."""

    def __init__(self, request):
        super().__init__(request)
        self.calls = 0

    def generate(self, batch, max_new_tokens, top_k=5):
        self.calls += 1
        if batch.rows[0][0] == 13 and self.calls == 1:
            raise RuntimeError("stand-in engine: the first call fails on purpose")
        return Generation(tokens=[[self.calls] * max_new_tokens for _ in batch.rows],
                          top_logprobs=[[[(self.calls, 0.0)]] * max_new_tokens for _ in batch.rows])


class SecondCallWaits(NumbersItsCalls):
    """The second generate call waits until the test creates echo-markers/go: a test can ask for the first
    call's result while the second is still being worked ahead."""

    def generate(self, batch, max_new_tokens, top_k=5):
        if self.calls == 1:
            import time
            go = self.closed_marker.parent / "go"
            while not go.exists():
                time.sleep(0.05)
        return super().generate(batch, max_new_tokens, top_k)


class StreamsItsWeights(EchoEngine):
    """Keeps its weights off the GPU by design, as ZeRO-Inference does."""
    weights_on_gpu = False


class SharesItsWork(EchoEngine):
    """An engine that asks for two workers to share its calls worked ahead (as ZeRO-Inference does)."""

    @classmethod
    def ahead_workers(cls, request):
        return 2

    def __init__(self, request):
        super().__init__(request)
        self.info = dataclasses.replace(self.info, backend="share")
