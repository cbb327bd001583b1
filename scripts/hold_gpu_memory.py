"""Another job on the GPU, for trying the session on a shared or small card (docs/SPEED.md, the twenty-seventh and
twenty-eighth rounds): holds all but KEEP GiB of GPU 0 until it is killed.

    python3 scripts/hold_gpu_memory.py KEEP_GIB READY_FILE &

Allocates in blocks of at most 1 GiB until KEEP_GIB are left free (its own CUDA context included), prints what it
holds, then writes READY_FILE, so that a script can wait for it before it starts the session."""
import sys
import time

import torch


def main(keep_gib: float, ready_file: str) -> None:
    keep = keep_gib * 2**30
    held = []
    while True:
        free, _total = torch.cuda.mem_get_info()
        step = min(2**30, int(free - keep))
        if step < 2**20:
            break
        held.append(torch.empty(step, dtype=torch.uint8, device="cuda"))
    free, _total = torch.cuda.mem_get_info()
    print(f"stranger holds {sum(t.numel() for t in held) / 2**30:.2f} GiB; free now {free / 2**30:.3f} GiB",
          flush=True)
    with open(ready_file, "w") as f:
        f.write("ready\n")
    while True:
        time.sleep(60)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python3 scripts/hold_gpu_memory.py KEEP_GIB READY_FILE")
    try:
        keep_gib = float(sys.argv[1])
    except ValueError:
        sys.exit(f"hold_gpu_memory.py: KEEP_GIB is a number of GiB to leave free, got {sys.argv[1]!r}")
    if not torch.cuda.is_available():
        sys.exit("hold_gpu_memory.py: needs a CUDA GPU, found none")
    main(keep_gib, sys.argv[2])
