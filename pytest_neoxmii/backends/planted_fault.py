"""A defect planted on purpose, to prove the judges catch one on the real stack (issue 9: a x1.05 scale of
one layer's attention output weight in the DeepSpeed engine must still fail at tp=2).

    NEOXMII_PLANT_FAULT=attention-output-scale:LAYER:FACTOR     e.g. attention-output-scale:8:1.05

Read where every DeepSpeed engine is built: ds and MII (in one process at tp = 1, in their ranks at tp >= 2)
and ZeRO-Inference (in the HF model, before ZeRO partitions it). After injection the layer's output
projection is DeepSpeed's `attention.attn_ow` (this rank's shard at tp >= 2), before injection HF's
`attention.dense.weight`. The session's header names a planted fault, so no result of such a run can be
taken for a real one. Unset, nothing happens."""
from __future__ import annotations

import os

PLANT_FAULT_ENV = "NEOXMII_PLANT_FAULT"
KIND = "attention-output-scale"


class FaultSpecError(ValueError):
    pass


def parse(text: str) -> tuple[int, float]:
    parts = text.split(":")
    if len(parts) != 3 or parts[0] != KIND:
        raise FaultSpecError(f"{PLANT_FAULT_ENV}={text!r}: expected {KIND}:LAYER:FACTOR")
    try:
        layer, factor = int(parts[1]), float(parts[2])
    except ValueError:
        raise FaultSpecError(f"{PLANT_FAULT_ENV}={text!r}: LAYER must be an integer and FACTOR a number") \
            from None
    return layer, factor


def _requested(layers: int | None) -> tuple[int, float] | None:
    """(layer, factor) from the environment, None when unset; a layer the model lacks is refused."""
    text = os.environ.get(PLANT_FAULT_ENV, "").strip()
    if not text:
        return None
    layer, factor = parse(text)
    if layers is not None and not 0 <= layer < layers:
        raise FaultSpecError(f"{PLANT_FAULT_ENV}: layer {layer} does not exist ({layers} layers)")
    return layer, factor


def planted(layers: int | None = None) -> str | None:
    """The fault this process and its workers plant, as the header shows it; None when none. Given the
    model's layer count, checked against it here, before any worker starts."""
    fault = _requested(layers)
    if fault is None:
        return None
    return f"layer {fault[0]}'s attention output weight x{fault[1]:g} in every DeepSpeed engine"


def plant(module) -> str | None:
    """Scale the weight named by the environment in `module` (an HF GPT-NeoX model, injected or not)."""
    layers = module.gpt_neox.layers
    fault = _requested(len(layers))
    if fault is None:
        return None
    layer_index, factor = fault
    attention = layers[layer_index].attention
    import torch
    with torch.no_grad():
        if getattr(attention, "attn_ow", None) is not None:      # DeepSpeed's injected layer
            attention.attn_ow.data.mul_(factor)
            return f"attn_ow of layer {layer_index} x{factor:g}"
        attention.dense.weight.mul_(factor)
        return f"attention.dense.weight of layer {layer_index} x{factor:g}"


def note(planted: str | None) -> list[str]:
    """The deployment's notes line for what was planted in it (none when nothing was)."""
    return [f"PLANTED FAULT: {planted}"] if planted else []


def ranks_note(reports: list[dict]) -> list[str]:
    """The notes line of a deployment whose ranks each planted in their own shard (tp >= 2): each rank's
    report carries what it planted under "planted_fault"; one line, naming the ranks where they differ."""
    planted = [(r.get("rank", i), r.get("planted_fault")) for i, r in enumerate(reports)]
    if not any(p for _, p in planted):
        return []
    if len({p for _, p in planted}) == 1:
        return note(f"{planted[0][1]} in each of {len(planted)} ranks' shards")
    return note("; ".join(f"rank {rank}: {p or 'nothing'}" for rank, p in planted))
