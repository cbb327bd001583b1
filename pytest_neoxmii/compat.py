"""Compatibility between DeepSpeed's GPT-NeoX kernel injection and the transformers versions it meets.

DeepSpeed's injection policy (deepspeed/module_inject/containers/gptneox.py) reads
`layer.attention.hidden_size` and `.num_attention_heads`, which transformers 4.57 no longer sets
(AttributeError inside init_inference and every MII deployment). We give GPTNeoXAttention read-only
properties that answer from its config. It is a class-level patch, so every model built afterwards gets it,
and `install()` can arm it lazily, before transformers is imported, for processes that DeepSpeed or MII
start (see `child_env()`, which puts a sitecustomize on their PYTHONPATH).

transformers 4.5x also changed the attention mask a GPT-NeoX layer receives: a 4D causal mask [B,1,Q,K]
(boolean for sdpa, additive float for eager), where DeepSpeed's kernels expect the old [B,1,1,K] additive
key-padding mask and apply causality themselves. Handed the new mask, injected layers compute garbage for
any batch of more than one row (this suite measured KL 35 nats at layer 1 on equal-length batches).
`adapt_mask()` turns the new mask back into the old one before it reaches DeepSpeed; it is installed with
the same lazy import hook. Padded rows still differ where DeepSpeed's rotary positions ignore position_ids:
that is a DeepSpeed limitation reported by the suite (see known_issues.py), not hidden here.

transformers 5.x breaks the injected layers in other ways (tuple outputs, MII's framework="pt"):
`check_kernel_injection()` refuses it with one line instead of a deep traceback."""
from __future__ import annotations

import os
import sys
from pathlib import Path

from pytest_neoxmii import after_import
from pytest_neoxmii.versions import version_of

NEOX_MODULE = "transformers.models.gpt_neox.modeling_gpt_neox"
DS_LAYER_MODULE = "deepspeed.model_implementations.transformers.ds_transformer"
_PATCHED_ATTRIBUTES = ("hidden_size", "num_attention_heads")
DS_MINUS_INF = -10000.0   # the additive mask value DeepSpeed's own code uses (ds_attention.minus_inf)


def transformers_version() -> str | None:
    return version_of("transformers")


def check_kernel_injection() -> str | None:
    """None if DeepSpeed's GPT-NeoX kernels can work with the installed transformers, else the reason."""
    version = transformers_version()
    if version is None:
        return "transformers is not installed"
    if int(version.split(".")[0]) >= 5:
        return (f"DeepSpeed's GPT-NeoX kernel injection does not work with transformers {version} "
                "(injected layers return tuples the 5.x decoder loop rejects): install 'transformers<5', "
                "4.57.6 is tested")
    return None


def adapt_mask(mask, dtype):
    """HF 4.5x 4D causal mask -> the [B,1,1,K] additive key-padding mask DeepSpeed's kernels expect, or None
    when no key is padded (DeepSpeed's unmasked path, which is what batch-1 prompts always took)."""
    import torch
    if not isinstance(mask, torch.Tensor) or mask.dim() != 4:
        return mask
    last = mask[:, :, -1:, :]                 # the last query attends to every real key of its row
    real = last if mask.dtype == torch.bool else (last == 0)
    if bool(real.all()):
        return None
    return torch.zeros(real.shape, dtype=dtype, device=mask.device).masked_fill(~real, DS_MINUS_INF)


def _patch_deepspeed_layer(module) -> None:
    cls = getattr(module, "DeepSpeedTransformerInference", None)
    if cls is None or getattr(cls.forward, "_neoxmii_adapted", False):
        return
    original = cls.forward

    def forward(self, *args, **kwargs):
        if kwargs.get("attention_mask") is not None:
            kwargs["attention_mask"] = adapt_mask(kwargs["attention_mask"], self.config.dtype)
        return original(self, *args, **kwargs)

    forward._neoxmii_adapted = True
    cls.forward = forward


def _patch(module) -> None:
    if module.__name__ == DS_LAYER_MODULE:
        _patch_deepspeed_layer(module)
        return
    cls = getattr(module, "GPTNeoXAttention", None)
    if cls is None:
        return
    for name in _PATCHED_ATTRIBUTES:
        if not hasattr(cls, name):
            # Read from the config unless set on the instance: DeepSpeed's AutoTP (tensor parallel without
            # injection) assigns these per shard.
            setattr(cls, name, property(
                lambda self, _n=name: self.__dict__.get(f"_neoxmii_{_n}", getattr(self.config, _n)),
                lambda self, value, _n=name: self.__dict__.__setitem__(f"_neoxmii_{_n}", value)))


def is_patched() -> bool:
    module = sys.modules.get(NEOX_MODULE)
    return module is not None and all(isinstance(getattr(module.GPTNeoXAttention, n, None), property)
                                      or n in vars(module.GPTNeoXAttention) for n in _PATCHED_ATTRIBUTES)


def install() -> None:
    """Make DeepSpeed's injection policy work on this process's transformers. Idempotent, cheap: patches
    what is imported already, and the rest right after its first import (after_import.py)."""
    for name in (NEOX_MODULE, DS_LAYER_MODULE):
        after_import.arm(name, _patch)


SITECUSTOMIZE_DIR = Path(__file__).parent / "_child"


def child_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for processes DeepSpeed or MII start: their sitecustomize installs the same patch."""
    env = dict(os.environ if env is None else env)
    parts = [str(SITECUSTOMIZE_DIR), str(Path(__file__).parent.parent)]
    if env.get("PYTHONPATH"):
        parts.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(parts)
    return env
