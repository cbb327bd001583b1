"""Known upstream defects the suite has measured, each with the exact condition it applies to and the
upstream issue. A matching check is marked xfail(strict=True): it still runs and still prints its table,
and the day DeepSpeed fixes the defect the test XPASSes, which strict mode turns into a failure telling
you to delete the entry. Nothing here ever makes a check pass."""
from __future__ import annotations

from dataclasses import dataclass

from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import CasePlan
from pytest_neoxmii.registry import DTYPE_BYTES, ModelSpec
from pytest_neoxmii.versions import version_of


@dataclass(frozen=True)
class KnownIssue:
    key: str
    check: str                     # "greedy" or "teacher-forced"
    backends: tuple[str, ...]
    needs_kernels: bool            # only when DeepSpeed's kernels are injected (never on CPU)
    padded_only: bool              # only cases whose rows have unequal lengths
    condition: str
    upstream: str
    # What running the defect did to the deployment afterwards, where measured: the session then runs it
    # after every other call of that engine, and deploys the engine again for the tests that follow it
    breaks_engine: str = ""

    def applies(self, check: str, info: BackendInfo, plan: CasePlan) -> bool:
        return self.may_apply(check, info.backend, plan, injected=info.kernels.startswith("injected"))

    def may_apply(self, check: str, backend: str, plan: CasePlan, injected: bool) -> bool:
        """applies(), from what is known before deployment: `injected`, whether its kernels will be."""
        if check != self.check or backend not in self.backends:
            return False
        if self.needs_kernels and not injected:
            return False
        if self.padded_only and not plan.padded:
            return False
        return True

    def reason(self) -> str:
        return f"known issue [{self.key}]: {self.condition} (upstream: {self.upstream})"


KNOWN_ISSUES = (
    KnownIssue(
        key="ds-left-padded-decode",
        check="greedy",
        backends=("ds",),
        needs_kernels=True,
        padded_only=True,
        condition=("DeepSpeed 0.19 kernel-injected GPT-NeoX generates left-padded batches wrongly after the "
                   "first token: prefill matches HF (teacher-forced parity passes with the mask adapter), but "
                   "the decode path's KV-cache attention ignores the padding, so rows diverge from step 1 and "
                   "the most padded row decodes NaN logprobs (measured on H100, pythia-160m shape)"),
        upstream="https://github.com/deepspeedai/DeepSpeed/issues/1466, "
                 "https://github.com/deepspeedai/DeepSpeed/issues/3960",
        breaks_engine=("on pythia-12b (synthetic weights, one H200) CUDA reported 'an illegal memory access' "
                       "in this call or in the next one on the same deployment, and every later call failed "
                       "with it; without the padded batch the same cases passed"),
    ),
)

# check name -> the op whose output it judges (the session's cache and the workers' calls say op)
CHECK_OF_OP = {"generate": "greedy", "score": "teacher-forced"}


def match(check: str, info: BackendInfo, plan: CasePlan) -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.applies(check, info, plan)), None)


def breaks_engine(op: str, backend: str, plan: CasePlan, injected: bool) -> KnownIssue | None:
    """The known issue whose defect the call (op "generate" or "score" of `backend` on `plan`) runs, where
    that defect was measured to break the deployment for later calls; None otherwise."""
    check = CHECK_OF_OP.get(op)
    return next((k for k in KNOWN_ISSUES
                 if k.breaks_engine and k.may_apply(check, backend, plan, injected)), None)


# -- defects that abort the process: checked before deployment ---------------------------------------------
# A kernel whose launcher fails a C assert() takes the whole Python process down (SIGABRT, "Fatal Python
# error: Aborted"), so it cannot be judged by running it in the test process. These are decided from the
# model's shape and dtype before anything is deployed.

WARP_SIZE = 32                         # hw_warp_size on CUDA (csrc/includes/ds_kernel_utils.h)
ROTARY_THREADS_PER_HEAD = (4, 8, 16, 32)   # the launches LAUNCH_FOR_ALIGNMENT instantiates on CUDA


def _next_pow2(n: int) -> int:
    return 1 << max(n - 1, 0).bit_length()


def rotary_half_launch_failure(head_size: int, rotary_dims: int, dtype: str) -> str | None:
    """The assert DeepSpeed's `launch_apply_rotary_pos_emb` (rotate_half, the GPT-NeoX rotary) fails for
    this head shape, or None if it launches. Mirrors csrc/transformer/inference/csrc/apply_rotary_pos_emb.cu
    of DeepSpeed 0.19.8, lines 145-178: the vector width is the largest of 16/8/4 bytes that divides half
    the rotary dims, one head is spread over next_pow2(head_size) / (width / element size) threads, and that
    must fit one warp and be one of the instantiated launches."""
    if rotary_dims <= 0:
        return None                    # softmax_context only calls the kernel when rotary_dim > 0
    size = DTYPE_BYTES[dtype]
    half = rotary_dims >> 1
    alignment = next((a for a in (16, 8, 4) if a >= size and half % (a // size) == 0), None)
    if alignment is None:
        return (f"half the rotary dims ({half}) is not a multiple of {4 // size} {dtype} elements "
                f"(assert(false) at line 155)")
    per_thread = alignment // size
    padded = _next_pow2(head_size)
    if padded > WARP_SIZE * per_thread:
        return (f"head size {head_size} (padded to {padded}) > warp size {WARP_SIZE} x {per_thread} {dtype} "
                f"elements per {alignment}-byte access, the widest that divides half the rotary dims "
                f"({rotary_dims}/2 = {half}) (assert(padded_head_size <= hw_warp_size * T_per_elem) at line 163)")
    if padded // per_thread not in ROTARY_THREADS_PER_HEAD:
        return (f"{padded // per_thread} threads per head (head size {head_size}, padded to {padded}, "
                f"{per_thread} {dtype} elements per thread) has no launch (assert(false) at line 128)")
    return None


@dataclass(frozen=True)
class DeploymentIssue:
    """A known defect decided before deployment from the model's shape: the backends that need it are not
    deployed, and every test that needs one of them xfails with this reason."""
    key: str
    backends: tuple[str, ...]          # where DeepSpeed's kernels are injected (on CUDA)
    deepspeed_checked: str             # the release whose source the condition was read from
    condition: str
    upstream: str

    def failure(self, spec: ModelSpec, dtype: str) -> str | None:
        return rotary_half_launch_failure(spec.head_size, spec.rotary_dims, dtype)

    def reason(self, spec: ModelSpec, dtype: str, detail: str) -> str:
        return (f"known issue [{self.key}]: {self.condition}; {spec.name} {dtype}: {detail} "
                f"(upstream: {self.upstream})")


ROTARY_HALF_LAUNCH = DeploymentIssue(
    key="ds-rotary-half-head-size",
    backends=("ds", "mii"),
    deepspeed_checked="0.19.8",
    condition=("DeepSpeed's injected attention (softmax_context) applies GPT-NeoX's rotary embedding with "
               "apply_rotary_pos_half, whose launcher asserts that one head fits one warp: next_pow2(head size) "
               "<= 32 x elements per vector access, the access being the widest of 16/8/4 bytes dividing half "
               "the rotary dims; otherwise the process aborts (SIGABRT) at the first forward. Measured: the "
               "pythia-2.8b shape (head size 80, 20 rotary dims, fp16) aborted on H100"),
    upstream="https://github.com/deepspeedai/DeepSpeed/blob/v0.19.8/csrc/transformer/inference/csrc/"
             "apply_rotary_pos_emb.cu#L145-L178, https://github.com/deepspeedai/DeepSpeed/pull/2448, "
             "https://github.com/deepspeedai/DeepSpeed/pull/6622",
)

DEPLOYMENT_ISSUES = (ROTARY_HALF_LAUNCH,)


def deepspeed_version() -> str | None:
    return version_of("deepspeed")


def match_deployment(backend: str, dtype: str, device: str, spec: ModelSpec,
                     installed: str | None = None) -> str | None:
    """The xfail reason if deploying `backend` for this model would hit a known abort, else None.

    Kernels are injected only on CUDA. The condition was read from one DeepSpeed release; on a newer one
    the backend is deployed, so a fix shows (and a still-present abort is seen, not assumed)."""
    from packaging.version import InvalidVersion, Version

    if not device.startswith("cuda"):
        return None
    installed = installed if installed is not None else deepspeed_version()
    for issue in DEPLOYMENT_ISSUES:
        if backend not in issue.backends:
            continue
        try:
            if installed is not None and Version(installed) > Version(issue.deepspeed_checked):
                continue
        except InvalidVersion:
            pass
        detail = issue.failure(spec, dtype)
        if detail is not None:
            return issue.reason(spec, dtype, detail)
    return None
