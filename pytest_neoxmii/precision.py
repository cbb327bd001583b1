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

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

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


PROBE_CACHE = "cpu-dtype-probes"     # under --neox-cache-dir: the child's answers, one file per machine key
CPUINFO = "/proc/cpuinfo"


def probe_key() -> str | None:
    """What decides the probe's answer: the CPU (its model and flags), the torch and DeepSpeed installed, the
    oneDNN settings that cap the instruction set it may use, Python's version and the probe itself. None where
    the CPU cannot be told apart (no /proc/cpuinfo): a cache directory shared by several machines would then
    hand one machine's answer to another, so nothing is kept."""
    from importlib import metadata
    versions = []
    for dist in ("torch", "deepspeed"):
        try:
            versions.append(metadata.version(dist))
        except metadata.PackageNotFoundError:
            versions.append(None)
    try:
        with open(CPUINFO, encoding="utf-8", errors="replace") as f:
            cpu = sorted({line.strip() for line in f if line.startswith(("model name", "flags"))})
    except OSError:
        cpu = []
    if not cpu:
        return None
    isa = sorted((k, v) for k, v in os.environ.items() if k.startswith(("ONEDNN_", "DNNL_")))
    blob = json.dumps([cpu, versions, isa, sys.version_info[:2], _PROBE])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


_asked: list = []     # this process's answer once asked ([answer], None included): it is the machine's, not the directory's


def forget() -> None:
    """Drop this process's answer (tests: the next call is like a new session's)."""
    _asked.clear()


def _cpu_probe(cache_dir: Path | None = None) -> dict | None:
    """{'offered': [...torch dtype names], 'native': [...our names]} from the child, or None when DeepSpeed
    cannot be asked (not installed, or the probe failed): the backends then report that themselves.
    The child imports torch and DeepSpeed (3.2 s of a 2-core CPU session), so it runs once per process, and
    with a cache_dir the answer is kept there under probe_key(), written whole, for the next session; an
    unreadable file is asked again and rewritten, and a failed probe is never written."""
    key = None if cache_dir is None else probe_key()
    path = None if key is None else Path(cache_dir) / PROBE_CACHE / f"{key}.json"
    kept = None if path is None else _read_kept(path)
    if not _asked:
        _asked.append(kept if kept is not None else _ask_deepspeed())
    answer = _asked[0]
    if answer is not None and path is not None and kept != answer:
        from pytest_neoxmii.files import write_whole
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            write_whole(path, json.dumps(answer))
        except OSError:                 # a read-only cache only costs the next session the probe
            pass
    return answer


def _read_kept(path: Path) -> dict | None:
    """The answer kept at `path`; None where there is none or it is not one (asked again, then rewritten)."""
    try:
        kept = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not (isinstance(kept, dict) and isinstance(kept.get("offered"), list)
            and isinstance(kept.get("native"), list)):
        return None
    return {"offered": kept["offered"], "native": kept["native"]}


def _ask_deepspeed() -> dict | None:
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


def deepspeed_cpu_dtypes(cache_dir: Path | None = None) -> tuple[str, ...] | None:
    """The dtypes DeepSpeed's CPU accelerator offers on this machine, e.g. ('fp32', 'bf16'); None when
    DeepSpeed cannot be asked."""
    answer = _cpu_probe(cache_dir)
    if answer is None:
        return None
    return tuple(_TORCH_NAMES[n] for n in answer["offered"] if n in _TORCH_NAMES)


def native_cpu_dtypes(cache_dir: Path | None = None) -> tuple[str, ...] | None:
    """The dtypes this CPU computes natively (oneDNN's answer; fp32 always), e.g. ('fp32', 'bf16'); None
    when not asked."""
    answer = _cpu_probe(cache_dir)
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
           native=None, cache_dir: Path | None = None) -> DtypeChoice:
    """The session's dtype. `probe` returns DeepSpeed's CPU dtypes (default: deepspeed_cpu_dtypes), `native`
    the ones this CPU computes natively (default: native_cpu_dtypes, both kept under cache_dir when given);
    both are asked only on a CPU-only machine with a DeepSpeed backend selected, and `native` only when no
    dtype was asked for."""
    if on_cuda or not any(runs_on_deepspeed(b) for b in backends):
        return DtypeChoice(requested or DEFAULT_DTYPE, requested)
    offered = probe() if probe else deepspeed_cpu_dtypes(cache_dir)
    if requested is not None or offered is None:
        return DtypeChoice(requested or DEFAULT_DTYPE, requested, offered)
    computed = native() if native else native_cpu_dtypes(cache_dir)
    emulated = [d for d in offered if computed is not None and d not in computed]
    dtype = _first_offered(tuple(d for d in offered if d not in emulated))
    reasons = []
    if DEFAULT_DTYPE not in offered:
        reasons.append(f"DeepSpeed's CPU accelerator here offers {', '.join(offered)}, not {DEFAULT_DTYPE}")
    if emulated and dtype != _first_offered(offered):
        reasons.append(f"this CPU computes {', '.join(emulated)} only by emulation, far slower than {dtype}")
    reason = "" if dtype == DEFAULT_DTYPE else "; ".join(reasons)
    return DtypeChoice(dtype, requested, offered, reason, computed)
