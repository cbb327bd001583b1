"""How long HF's fp16 greedy generate takes on each new shape, by torch's attention backend (docs/STACK.md
trap 24). One backend per process, so that no graph cache carries over:

    for b in default no-cudnn cudnn flash efficient; do python scripts/sdpa_first_call.py $b CACHE_DIR; done

Synthetic pythia-160m weights (seed 0), built in CACHE_DIR if missing; needs a CUDA GPU. Prints, per call, the
prompt length, batch and seconds of a 32-token generate: each shape twice, so the first call of a shape
shows what building its graphs costs."""
from __future__ import annotations

import sys
import time
from pathlib import Path

import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

from pytest_neoxmii import weights

CHOICES = {"default": None,
           "no-cudnn": [SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
           "cudnn": [SDPBackend.CUDNN_ATTENTION], "flash": [SDPBackend.FLASH_ATTENTION],
           "efficient": [SDPBackend.EFFICIENT_ATTENTION]}
SHAPES = ((64, 1), (64, 1), (64, 1), (64, 4), (64, 4), (200, 1), (200, 1), (16, 4), (16, 4))


def main(choice: str, cache: Path) -> None:
    from transformers import AutoModelForCausalLM
    model = weights.materialize(weights.resolve("pythia-160m", "synthetic", None, 0, cache), cache)
    peer = AutoModelForCausalLM.from_pretrained(model.path, dtype=torch.float16).to("cuda:0").eval()
    ids_of = torch.Generator().manual_seed(0)
    times = []
    with torch.inference_mode(), (sdpa_kernel(CHOICES[choice]) if CHOICES[choice] else torch.inference_mode()):
        for prompt_len, batch in SHAPES:
            ids = torch.randint(100, 50000, (batch, prompt_len), generator=ids_of).to("cuda:0")
            start = time.perf_counter()
            peer.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=32, min_new_tokens=32,
                          do_sample=False, num_beams=1, pad_token_id=0, output_scores=True,
                          return_dict_in_generate=True)
            torch.cuda.synchronize()
            times.append(f"p{prompt_len}b{batch} {time.perf_counter() - start:.3f}")
    print(choice, " | ".join(times))


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] not in CHOICES:
        sys.exit(f"usage: python {sys.argv[0]} {{{','.join(CHOICES)}}} CACHE_DIR")
    if not torch.cuda.is_available():
        sys.exit(f"{sys.argv[0]}: needs a CUDA GPU (torch {torch.__version__} sees none)")
    main(sys.argv[1], Path(sys.argv[2]))
