"""Which dtype a session runs, and why.

On CUDA it is what the user asked, fp16 by default. On a CPU-only machine DeepSpeed's CPU accelerator
offers fp16 only where the CPU computes it natively (DeepSpeed asks oneDNN, which wants AVX512-FP16 or
AMX-FP16); on the others, many AMD and older Intel CI machines among them, every ds, mii and zero call in
fp16 fails ("Data type torch.float16 is not supported by cpu accelerator"). There the default becomes
bf16 where offered, else fp32, for every backend: the HF peer that defines the noise floor runs at the same
precision as the engines it judges. A dtype asked for explicitly is kept, and the DeepSpeed backends that
cannot run it skip with the dtypes this CPU offers."""
from __future__ import annotations

import functools
import json
import os
import subprocess
import sys
from dataclasses import dataclass

from pytest_neoxmii.dtypes import TORCH_NAMES

DEFAULT_DTYPE = "fp16"
FALLBACK_ORDER = ("fp16", "bf16", "fp32")     # the first the CPU accelerator offers is the default there
_TORCH_NAMES = {f"torch.{attr}": name for name, attr in TORCH_NAMES.items()}   # str(torch dtype) -> name

# Run in a child process: the test process never imports deepspeed for a question this small.
_PROBE = ("import json; from deepspeed.accelerator import get_accelerator; "
          "print(json.dumps([str(d) for d in get_accelerator().supported_dtypes()]))")


def runs_on_deepspeed(backend: str) -> bool:
    """The engine runs on DeepSpeed's accelerator (its needs_deepspeed trait), so DeepSpeed's CPU dtypes
    bound it. The registry is imported here, not at the top: it imports every engine and so torch, which the
    dtype table and the probe do not need."""
    from pytest_neoxmii.backends import ENGINES
    return backend in ENGINES and ENGINES[backend].needs_deepspeed


@functools.lru_cache(maxsize=1)
def deepspeed_cpu_dtypes() -> tuple[str, ...] | None:
    """The dtypes DeepSpeed's CPU accelerator offers on this machine, e.g. ('fp32', 'bf16'); None when
    DeepSpeed cannot be asked (not installed, or the probe failed): the backends then report that themselves."""
    env = {**os.environ, "DS_ACCELERATOR": "cpu"}
    try:
        out = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=120,
                             env=env)
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = out.stdout.strip().splitlines()
    if out.returncode != 0 or not lines:
        return None
    try:
        names = json.loads(lines[-1])
    except ValueError:
        return None
    return tuple(_TORCH_NAMES[n] for n in names if n in _TORCH_NAMES)


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str                              # what every backend of the session runs
    requested: str | None                   # --neox-dtype as given (None: not given)
    offered: tuple[str, ...] | None = None  # DeepSpeed's CPU dtypes, where asked
    reason: str = ""                        # why dtype differs from the default; "" when it does not

    def describe(self) -> str:
        """'bf16 (DeepSpeed's CPU accelerator here offers fp32, bf16, not fp16)' for the header."""
        return f"{self.dtype} ({self.reason})" if self.reason else self.dtype

    def refusal(self, backend: str, dtype: str) -> str | None:
        """Why `backend` cannot run `dtype` here (one line), or None."""
        if not runs_on_deepspeed(backend) or self.offered is None or dtype in self.offered:
            return None
        return (f"DeepSpeed's CPU accelerator on this CPU offers {', '.join(self.offered)}, not {dtype}; "
                f"pass --neox-dtype={_first_offered(self.offered)}, or leave --neox-dtype unset to choose "
                "automatically")


def _first_offered(offered: tuple[str, ...]) -> str:
    return next((d for d in FALLBACK_ORDER if d in offered), "fp32")


def choose(requested: str | None, *, on_cuda: bool, backends: tuple[str, ...], probe=None) -> DtypeChoice:
    """The session's dtype. `probe` returns DeepSpeed's CPU dtypes (default: deepspeed_cpu_dtypes); it is
    asked only on a CPU-only machine with a DeepSpeed backend selected."""
    if on_cuda or not any(runs_on_deepspeed(b) for b in backends):
        return DtypeChoice(requested or DEFAULT_DTYPE, requested)
    offered = (probe or deepspeed_cpu_dtypes)()
    if requested is not None or offered is None:
        return DtypeChoice(requested or DEFAULT_DTYPE, requested, offered)
    dtype = _first_offered(offered)
    reason = "" if dtype == DEFAULT_DTYPE else \
        f"DeepSpeed's CPU accelerator here offers {', '.join(offered)}, not {DEFAULT_DTYPE}"
    return DtypeChoice(dtype, requested, offered, reason)
