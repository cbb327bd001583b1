"""Greedy generation, teacher-forced scoring and layer tracing for any backend whose model is (or wraps)
a transformers GPTNeoXForCausalLM: the HF reference, DeepSpeed's inference engine, ZeRO-Inference and the
model inside an MII deployment all run through these same calls, so differences come from the engines."""
from __future__ import annotations

import contextlib
import functools

import torch

from pytest_neoxmii.backends.base import Backend
from pytest_neoxmii.backends.generation_capture import top_logprobs_per_step
from pytest_neoxmii.outputs import Generation, LayerTrace, PromptBatch, Scores


def judged_attention(device: str):
    """Scaled-dot-product attention for the calls whose outputs are judged (generate, score, trace): torch's
    own choice less cuDNN's attention, on a GPU. cuDNN builds a graph for each new sequence length, and a greedy
    decode meets a new one at every step: on one H200 (pythia-160m fp16, synthetic weights, torch 2.11) the
    first 32-token generate of each new prompt length or batch took 2.0-4.5 s against 0.25-0.42 s once built,
    and 0.22-1.1 s without cuDNN's attention (docs/STACK.md trap 24). The judged calls meet new shapes all the
    time. Timed calls (latency.py) keep torch's default, which is what a user's HF runs; their warm-up rounds
    build the graphs."""
    if not str(device).startswith("cuda"):
        return contextlib.nullcontext()
    from torch.nn.attention import SDPBackend, sdpa_kernel
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def judged_attention_notes(device: str) -> list[str]:
    """What the report says of an engine whose attention is torch's (the HF modules: hf, ZeRO)."""
    if not str(device).startswith("cuda"):
        return []
    return ["judged calls without cuDNN's attention (it builds a graph per new sequence length); timed calls "
            "with torch's default"]


def _judged(call):
    """Run a judged model call under judged_attention and without autograd."""
    @functools.wraps(call)
    def wrapper(self, *args, **kwargs):
        with judged_attention(getattr(self, "device", "cpu")), torch.inference_mode():
            return call(self, *args, **kwargs)
    return wrapper


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize(device)


def position_ids_for(mask: torch.Tensor) -> torch.Tensor:
    """Positions that count real tokens only, so a left-padded row sees the same positions as unpadded."""
    return (mask.long().cumsum(-1) - 1).clamp(min=0)


class TorchModelBackend(Backend):
    """Shared implementation; subclasses set self.model (the module whose generate/forward is called),
    self.layers (the decoder layers, for tracing), self.device and self.info."""

    model: torch.nn.Module
    device: str
    worker_imports = ("transformers", "transformers.models.gpt_neox.modeling_gpt_neox")
    # from_pretrained maps a safetensors checkpoint loaded in its stored dtype; DeepSpeed's CPU engines keep
    # those modules (measured: the ds and mii workers of pythia-1b held 301-330 MiB of memory of their own)
    shares_checkpoint_pages = True

    def _layers(self):
        module = self.model
        module = getattr(module, "module", module)           # DeepSpeed engines wrap the HF model
        return module.gpt_neox.layers

    @_judged
    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        ids, mask = batch.padded()
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model.generate(
            input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
            min_new_tokens=max_new_tokens,  # exactly n tokens: EOS never ends a row early
            do_sample=False, num_beams=1, pad_token_id=batch.pad_token_id,
            output_logits=True, return_dict_in_generate=True,
        )
        new = out.sequences[:, ids.shape[1]:].tolist()
        # raw logits, one [batch, vocab] per step; the same reduction MII's rank 0 records with
        return Generation(tokens=new, top_logprobs=top_logprobs_per_step(list(out.logits), top_k))

    @_judged
    def score(self, batch: PromptBatch) -> Scores:
        ids, mask = batch.padded()
        logits = self._forward(ids, mask)
        return Scores(logprobs=torch.log_softmax(logits.float(), dim=-1).cpu(), mask=mask.bool())

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        ids, mask = ids.to(self.device), mask.to(self.device)
        out = self.model(input_ids=ids, attention_mask=mask, position_ids=position_ids_for(mask),
                         use_cache=False)
        return out.logits if hasattr(out, "logits") else out[0]

    @_judged
    def trace(self, batch: PromptBatch) -> LayerTrace:
        ids, mask = batch.padded()
        captured: list[torch.Tensor] = []
        layers = self._layers()
        module = getattr(self.model, "module", self.model)

        def keep(_module, _inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            captured.append(hidden.detach().float().cpu())

        handles = [module.gpt_neox.embed_in.register_forward_hook(keep)]
        handles += [layer.register_forward_hook(keep) for layer in layers]
        try:
            self._forward(ids, mask)
        finally:
            for h in handles:
                h.remove()
        return LayerTrace(hidden_states=captured)

    @torch.inference_mode()
    def size_workspace(self, max_batch: int) -> None:
        """DeepSpeed sizes its process-wide inference workspace (activations and KV cache) by the batch size
        of the first forward of each engine, and every engine's first forward resets that size. A later,
        larger batch then silently reads the wrong cache rows: this suite measured KL 20-30 nats at layer 1
        on 4-row batches after a 1-row first call. So the first forward uses the largest batch of the cases."""
        ids = torch.zeros((max_batch, 2), dtype=torch.long, device=self.device)
        self._forward(ids, torch.ones_like(ids))

    def _release(self) -> None:
        """Drop the model and give its GPU memory back. Storage is freed tensor by tensor, so a stray
        reference somewhere in a library cannot pin the weights."""
        import gc
        import itertools
        module = getattr(self.model, "module", self.model)
        if isinstance(module, torch.nn.Module):
            for t in itertools.chain(module.parameters(), module.buffers()):
                t.data = torch.empty(0, dtype=t.dtype, device="cpu")
        self.model = None
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
