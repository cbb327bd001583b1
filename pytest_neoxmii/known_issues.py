"""Known upstream defects the suite has measured, each with the exact condition it applies to and the
upstream issue. A matching check is marked xfail(strict=True): it still runs and still prints its table,
and the day DeepSpeed fixes the defect the test XPASSes, which strict mode turns into a failure telling
you to delete the entry. Nothing here ever makes a check pass."""
from __future__ import annotations

from dataclasses import dataclass

from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import CasePlan


@dataclass(frozen=True)
class KnownIssue:
    key: str
    check: str                     # "greedy" or "teacher-forced"
    backends: tuple[str, ...]
    needs_kernels: bool            # only when DeepSpeed's kernels are injected (never on CPU)
    padded_only: bool              # only cases whose rows have unequal lengths
    condition: str
    upstream: str

    def applies(self, check: str, info: BackendInfo, plan: CasePlan) -> bool:
        if check != self.check or info.backend not in self.backends:
            return False
        if self.needs_kernels and not info.kernels.startswith("injected"):
            return False
        if self.padded_only and len(set(plan.lengths)) < 2:
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
    ),
)


def match(check: str, info: BackendInfo, plan: CasePlan) -> KnownIssue | None:
    return next((k for k in KNOWN_ISSUES if k.applies(check, info, plan)), None)
