"""The HF modules' judged calls (generate, score, trace) run on a GPU without cuDNN's attention, which builds a
graph for every new sequence length (a greedy decode meets one at every step); timed calls keep torch's default.
Checked through torch's own SDPA switches, which torch's CPU build has too."""
from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch

from pytest_neoxmii import latency
from pytest_neoxmii.backends.torch_model import TorchModelBackend, judged_attention, judged_attention_notes
from pytest_neoxmii.outputs import PromptBatch

VOCAB = 11


def switches() -> dict[str, bool]:
    b = torch.backends.cuda
    return {"cudnn": b.cudnn_sdp_enabled(), "flash": b.flash_sdp_enabled(),
            "efficient": b.mem_efficient_sdp_enabled(), "math": b.math_sdp_enabled()}


@pytest.fixture
def defaults():
    before = switches()
    torch.backends.cuda.enable_cudnn_sdp(True)
    yield switches()
    torch.backends.cuda.enable_cudnn_sdp(before["cudnn"])


class RecordingModel:
    """A stand-in GPT-NeoX: what the SDPA switches were at each call."""

    def __init__(self):
        self.seen: list[dict[str, bool]] = []

    def __call__(self, input_ids, attention_mask=None, **_):
        self.seen.append(switches())
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, VOCAB))

    def generate(self, input_ids, max_new_tokens, **_):
        self.seen.append(switches())
        new = torch.ones(input_ids.shape[0], max_new_tokens, dtype=torch.long)
        return SimpleNamespace(sequences=torch.cat([input_ids, new], dim=1),
                               logits=[torch.zeros(input_ids.shape[0], VOCAB)] * max_new_tokens)


class OnAGpu(TorchModelBackend):
    def __init__(self):
        self.model, self.device = RecordingModel(), "cuda:0"
        self.info = SimpleNamespace(device="cuda:0")

    def close(self) -> None:
        pass


@pytest.fixture
def gpu_backend(monkeypatch):
    monkeypatch.setattr(torch.Tensor, "to", lambda self, *a, **k: self)    # no GPU here: tensors stay put
    return OnAGpu()


def test_on_a_gpu_judged_calls_leave_out_cudnn_attention_and_give_the_switches_back(defaults):
    with judged_attention("cuda:0"):
        assert switches() == {"cudnn": False, "flash": True, "efficient": True, "math": True}
    assert switches() == defaults
    with judged_attention("cpu"):                   # nothing to change on the CPU
        assert switches() == defaults
    assert judged_attention_notes("cpu") == [] and "cuDNN" in judged_attention_notes("cuda:1")[0]


def test_generate_and_score_are_judged_calls_the_timed_generate_is_not(defaults, gpu_backend):
    batch = PromptBatch(rows=((5, 6, 7),))
    gen = gpu_backend.generate(batch, 2)
    assert gen.tokens == [[1, 1]]
    gpu_backend.score(batch)
    assert [seen["cudnn"] for seen in gpu_backend.model.seen] == [False, False]
    assert switches() == defaults
    prefill, full, _ = latency.model_calls(gpu_backend, batch, 2)
    full()
    assert gpu_backend.model.seen[-1] == defaults       # what a user's HF runs
