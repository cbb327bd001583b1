"""What an engine generated, as ids and per-step top-k logprobs, taken where the engine runs.

MII's API returns text only, so a greedy divergence of an MII deployment could not be told from a near-tie
(docs/SENSITIVITY.md: no gap threshold on text alone separates precision noise from a real defect). The
engine itself knows: MII's text-generation pipeline calls `model.generate` of the HF model that DeepSpeed
wraps, in a process of ours (`backends/mii_rank.py`, each rank of the tp >= 2 deployment). Wrapping that call
records the prompt ids, the new ids and the top-k logprobs of each step's raw logits, and still hands the
pipeline the plain sequences it expects, so what MII returns to its client is unchanged.

Records go to a sink: a JSON-lines file that the session reads after each query (one line per prompt,
written whole before the reply leaves the rank), or a list in process."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

CAPTURE_FILE = "generations-rank0.jsonl"
# Present beside it while the session's generate() queries: rank 0 records only then, so a timed query (the
# latency tests time the user's text query) pays for no per-step logits.
CAPTURE_ON_FILE = "capture-on"
CAPTURE_TOP_K = 20      # recorded per step; a session's --neox-top-k takes its first k


def top_logprobs_per_step(step_logits, top_k: int) -> list[list[list[tuple[int, float]]]]:
    """[row][step] -> [(token, logprob), ...] highest first, from one [batch, vocab] tensor of raw logits
    per step (log-softmax in float32, as the reference does)."""
    import torch
    rows = step_logits[0].shape[0] if step_logits else 0
    top = [[] for _ in range(rows)]
    for logits in step_logits:
        values, indices = torch.log_softmax(logits.float(), dim=-1).topk(top_k, dim=-1)
        for row in range(rows):
            top[row].append(list(zip(indices[row].tolist(), values[row].tolist())))
    return top


def capture_generate(module, sink: Callable[[dict], None], top_k: int,
                     enabled: Callable[[], bool] | None = None) -> None:
    """Wrap `module.generate` (an HF causal LM, the one a DeepSpeed engine's `.module` is) so that every call
    also asks for the raw logits and hands `sink` one record per prompt row; the caller still gets the
    sequences tensor. Left padding (a batched pipeline) is taken off the recorded prompt. While `enabled()`
    says False, calls pass through untouched (a timed query pays for no logits)."""
    original = module.generate

    def generate(*args, **kwargs):
        if enabled is not None and not enabled():
            return original(*args, **kwargs)
        kwargs.update(output_logits=True, return_dict_in_generate=True)
        out = original(*args, **kwargs)
        ids = kwargs.get("input_ids", args[0] if args else None)
        mask = kwargs.get("attention_mask")
        width = ids.shape[1]
        new = out.sequences[:, width:].tolist()
        top = top_logprobs_per_step(list(out.logits), top_k)
        for row in range(ids.shape[0]):
            prompt = ids[row][mask[row].bool()] if mask is not None else ids[row]
            sink({"prompt": prompt.tolist(), "tokens": new[row], "top": top[row]})
        return out.sequences

    module.generate = generate


def file_sink(path: Path) -> Callable[[dict], None]:
    def write(record: dict) -> None:
        # One whole line, closed before the reply leaves the rank: the session, on the same machine, reads
        # after the reply and so never sees half a line (no fsync: nothing here must survive a power cut).
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    return write


def read_records(path: Path, offset: int) -> tuple[list[dict], int]:
    """The records appended since `offset` (bytes), and the new offset."""
    if not path.exists():
        return [], offset
    with open(path, "rb") as f:
        f.seek(offset)
        data = f.read()
    return [json.loads(line) for line in data.decode().splitlines() if line.strip()], offset + len(data)


class CaptureMismatch(Exception):
    """The records do not describe the prompts that were sent (another client, a changed pipeline)."""


def match_rows(records: list[dict], rows: list[list[int]], max_new_tokens: int) \
        -> tuple[list[list[int]], list[list[list[tuple[int, float]]]]]:
    """Tokens and top logprobs for each prompt row, from the records of one query: each row's record is the
    last one whose prompt ids are that row's (MII's pipeline runs the prompts of a query one by one)."""
    tokens, top = [], []
    for i, row in enumerate(rows):
        found = next((r for r in reversed(records) if r["prompt"] == list(row)), None)
        if found is None:
            raise CaptureMismatch(f"no record of what the engine generated for row {i} ({len(row)} prompt "
                                  f"tokens) among the {len(records)} written during the query")
        if len(found["tokens"]) != max_new_tokens or len(found["top"]) != max_new_tokens:
            raise CaptureMismatch(f"row {i}: the engine recorded {len(found['tokens'])} tokens and "
                                  f"{len(found['top'])} steps, {max_new_tokens} were asked")
        tokens.append([int(t) for t in found["tokens"]])
        top.append([[(int(t), float(lp)) for t, lp in step] for step in found["top"]])
    return tokens, top


def generation(records: list[dict], batch, max_new_tokens: int, top_k: int):
    """The Generation judged for a query of `batch`: each row's recorded ids and the first top_k of each
    step's recorded logprobs. CaptureMismatch where the records do not describe the batch (the caller says
    which deployment); BackendUnavailable where more than CAPTURE_TOP_K logprobs a step are asked."""
    from pytest_neoxmii.errors import BackendUnavailable
    from pytest_neoxmii.outputs import Generation
    tokens, top = match_rows(records, [list(r) for r in batch.rows], max_new_tokens)
    if top_k > CAPTURE_TOP_K:
        raise BackendUnavailable(f"the engine's steps are recorded with their top-{CAPTURE_TOP_K} logprobs "
                                 f"(MII returns text only), top-{top_k} was asked")
    return Generation(tokens=tokens, top_logprobs=[[step[:top_k] for step in row] for row in top])
