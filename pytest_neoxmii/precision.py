"""Which dtype a session runs, and why.

On CUDA it is what the user asked, fp16 by default. On a CPU-only machine DeepSpeed's CPU accelerator
offers fp16 only where the CPU computes it natively (DeepSpeed asks oneDNN, which wants AVX512-FP16 or
AMX-FP16); on the others, many AMD and older Intel CI machines among them, every ds, mii and zero call in
fp16 fails ("Data type torch.float16 is not supported by cpu accelerator"). There the default becomes
bf16 where offered and computed natively, else fp32, for every backend: the HF peer that defines the noise
floor runs at the same precision as the engines it judges. DeepSpeed offers bf16 on every CPU, but a CPU
without AVX512 (or AMX) only emulates it: on a 2-core AMD EPYC with AVX2 alone, a 64x768 by 768x3072 matmul
took 327 ms in bf16 against 3.6 ms in fp32, and the acceptance suite on pythia-160m (synthetic weights) ran
548 s in bf16. A dtype asked for explicitly is kept, and the DeepSpeed backends that cannot run it skip with
the dtypes this CPU offers."""
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

# Run in a child process: the test process never imports deepspeed for a question this small. oneDNN's own
# answer says which half-precision dtypes the CPU computes natively (bf16: AVX512 or AMX; fp16: AVX512-FP16 or
# AMX-FP16); deepspeed imports torch anyway.
_PROBE = ("import json, torch; from deepspeed.accelerator import get_accelerator; "
          "native = {'bf16': torch.ops.mkldnn._is_mkldnn_bf16_supported(), "
          "'fp16': torch.ops.mkldnn._is_mkldnn_fp16_supported()}; "
          "print(json.dumps({'offered': [str(d) for d in get_accelerator().supported_dtypes()], "
          "'native': ['fp32'] + [n for n, yes in native.items() if yes]}))")


def runs_on_deepspeed(backend: str) -> bool:
    """The engine runs on DeepSpeed's accelerator (its needs_deepspeed trait), so DeepSpeed's CPU dtypes
    bound it. The registry is imported here, not at the top: it imports every engine and so torch, which the
    dtype table and the probe do not need."""
    from pytest_neoxmii.backends import ENGINES
    return backend in ENGINES and ENGINES[backend].needs_deepspeed


@functools.lru_cache(maxsize=1)
def _cpu_probe() -> dict | None:
    """{'offered': [...torch dtype names], 'native': [...our names]} from the child, or None when DeepSpeed
    cannot be asked (not installed, or the probe failed): the backends then report that themselves."""
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
        answer = json.loads(lines[-1])
        return {"offered": list(answer["offered"]), "native": list(answer["native"])}
    except (ValueError, KeyError, TypeError):
        return None


def deepspeed_cpu_dtypes() -> tuple[str, ...] | None:
    """The dtypes DeepSpeed's CPU accelerator offers on this machine, e.g. ('fp32', 'bf16'); None when
    DeepSpeed cannot be asked."""
    answer = _cpu_probe()
    if answer is None:
        return None
    return tuple(_TORCH_NAMES[n] for n in answer["offered"] if n in _TORCH_NAMES)


def native_cpu_dtypes() -> tuple[str, ...] | None:
    """The dtypes this CPU computes natively (oneDNN's answer; fp32 always), e.g. ('fp32', 'bf16'); None
    when not asked."""
    answer = _cpu_probe()
    return None if answer is None else tuple(answer["native"])


@dataclass(frozen=True)
class DtypeChoice:
    dtype: str                              # what every backend of the session runs
    requested: str | None                   # --neox-dtype as given (None: not given)
    offered: tuple[str, ...] | None = None  # DeepSpeed's CPU dtypes, where asked
    reason: str = ""                        # why dtype differs from the default; "" when it does not
    native: tuple[str, ...] | None = None   # the dtypes this CPU computes natively, where asked

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


def choose(requested: str | None, *, on_cuda: bool, backends: tuple[str, ...], probe=None,
           native=None) -> DtypeChoice:
    """The session's dtype. `probe` returns DeepSpeed's CPU dtypes (default: deepspeed_cpu_dtypes), `native`
    the ones this CPU computes natively (default: native_cpu_dtypes); both are asked only on a CPU-only
    machine with a DeepSpeed backend selected, and `native` only when no dtype was asked for."""
    if on_cuda or not any(runs_on_deepspeed(b) for b in backends):
        return DtypeChoice(requested or DEFAULT_DTYPE, requested)
    offered = (probe or deepspeed_cpu_dtypes)()
    if requested is not None or offered is None:
        return DtypeChoice(requested or DEFAULT_DTYPE, requested, offered)
    computed = (native or native_cpu_dtypes)()
    emulated = [d for d in offered if computed is not None and d not in computed]
    dtype = _first_offered(tuple(d for d in offered if d not in emulated))
    reasons = []
    if DEFAULT_DTYPE not in offered:
        reasons.append(f"DeepSpeed's CPU accelerator here offers {', '.join(offered)}, not {DEFAULT_DTYPE}")
    if emulated and dtype != _first_offered(offered):
        reasons.append(f"this CPU computes {', '.join(emulated)} only by emulation, far slower than {dtype}")
    reason = "" if dtype == DEFAULT_DTYPE else "; ".join(reasons)
    return DtypeChoice(dtype, requested, offered, reason, computed)
