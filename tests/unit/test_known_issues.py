from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.cases import plan_cases
from pytest_neoxmii.known_issues import KNOWN_ISSUES, match

PLANS = {p.family: p for p in plan_cases(2048, 32)}
INJECTED = BackendInfo(backend="ds", dtype="fp16", device="cuda:0", kernels="injected 12/12 layers")


def test_padded_decode_issue_applies_only_to_injected_ds_on_padded_greedy():
    issue = match("greedy", INJECTED, PLANS["padded"])
    assert issue is not None and issue.key == "ds-left-padded-decode"
    assert "github.com/deepspeedai/DeepSpeed/issues/" in issue.reason()


def test_no_known_issue_for_equal_lengths_other_checks_backends_or_cpu():
    assert match("greedy", INJECTED, PLANS["batch"]) is None            # equal lengths: must pass
    assert match("teacher-forced", INJECTED, PLANS["padded"]) is None   # prefill is fixed by the adapter
    mii = BackendInfo(backend="mii", dtype="fp16", device="cuda:0", kernels="injected 12/12 layers")
    assert match("greedy", mii, PLANS["padded"]) is None                # MII generates row by row
    cpu = BackendInfo(backend="ds", dtype="fp16", device="cpu", kernels="none (CPU: no kernel injection)")
    assert match("greedy", cpu, PLANS["padded"]) is None


def test_every_known_issue_names_an_upstream_issue_and_a_condition():
    for issue in KNOWN_ISSUES:
        assert issue.upstream.startswith("https://github.com/")
        assert len(issue.condition) > 40

# The strict xfail itself, through the plugin's check in a real pytest run: tests/unit/test_checks.py
# (test_known_issue_is_a_strict_xfail_in_a_real_test_run).


# -- the rotary kernel abort (pythia-2.8b), decided before deployment -----------------------------------------
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from pytest_neoxmii.known_issues import (  # noqa: E402
    ROTARY_HALF_LAUNCH, deepspeed_version, match_deployment, rotary_half_launch_failure)
from pytest_neoxmii.registry import known_names, lookup  # noqa: E402

CHECKED = ROTARY_HALF_LAUNCH.deepspeed_checked


def test_rotary_abort_hits_exactly_the_2p8b_shape_among_the_registry_at_fp16_and_bf16():
    for dtype in ("fp16", "bf16"):
        hit = {n for n in known_names() if match_deployment("ds", dtype, "cuda:0", lookup(n), CHECKED)}
        assert hit == {"pythia-2.8b", "pythia-2.8b-deduped"}, dtype


def test_rotary_abort_condition_is_the_warp_fit_of_head_size_and_rotary_width():
    # pythia-2.8b: head 80 -> padded 128; 20 rotary dims -> half 10 -> 4-byte access = 2 fp16 per thread
    assert (lookup("pythia-2.8b").head_size, lookup("pythia-2.8b").rotary_dims) == (80, 20)
    reason = rotary_half_launch_failure(80, 20, "fp16")
    assert "head size 80 (padded to 128) > warp size 32 x 2 fp16" in reason and "line 163" in reason
    # gpt-neox-20b: head 96 -> padded 128; 24 rotary dims -> half 12 -> 8-byte access = 4 per thread: fits
    assert (lookup("gpt-neox-20b").head_size, lookup("gpt-neox-20b").rotary_dims) == (96, 24)
    assert rotary_half_launch_failure(96, 24, "fp16") is None
    assert rotary_half_launch_failure(256, 64, "fp16") is None          # pythia-1b: 8 per thread, 256 <= 256
    assert rotary_half_launch_failure(256, 64, "fp32") is not None      # same shape in fp32: 4 per thread
    assert rotary_half_launch_failure(80, 0, "fp16") is None            # no rotary: the kernel is not called
    assert "not a multiple" in rotary_half_launch_failure(64, 6, "fp16")  # half of 6 is odd: no 4-byte access


def test_rotary_abort_only_where_kernels_are_injected_and_only_up_to_the_checked_release():
    spec = lookup("pythia-2.8b")
    reason = match_deployment("mii", "fp16", "cuda:0", spec, CHECKED)
    assert reason.startswith("known issue [ds-rotary-half-head-size]") and "pythia-2.8b fp16" in reason
    assert "github.com/deepspeedai/DeepSpeed" in reason
    assert match_deployment("ds", "fp16", "cpu", spec, CHECKED) is None        # no injection on CPU
    assert match_deployment("zero", "fp16", "cuda:0", spec, CHECKED) is None   # ZeRO runs HF modules
    assert match_deployment("hf", "fp16", "cuda:0", spec, CHECKED) is None
    assert match_deployment("ds", "fp16", "cuda:0", spec, "0.20.0") is None    # newer: deploy and see
    assert match_deployment("ds", "fp16", "cuda:0", spec, "0.18.0") is not None


def test_the_mirrored_assert_is_in_the_installed_deepspeed_source():
    """The condition mirrors one file of one release: if that file changes, re-read it."""
    if deepspeed_version() != CHECKED:
        pytest.skip(f"deepspeed {deepspeed_version()} installed; the condition was read from {CHECKED}")
    import importlib.util
    root = Path(importlib.util.find_spec("deepspeed").origin).parent
    source = (root / "ops/csrc/transformer/inference/csrc/apply_rotary_pos_emb.cu").read_text()
    assert "assert(padded_head_size <= hw_warp_size * T_per_elem);" in source
    assert "if (half_dim % (16 / sizeof(T)) == 0)" in source
    assert "if (rotary_dim > 0 && rotate_half)" in (root / "ops/csrc/transformer/inference/csrc/pt_binding.cpp"
                                                     ).read_text()


def test_next_pow2_rounds_up_as_deepspeeds_does():
    from pytest_neoxmii.known_issues import _next_pow2
    assert [_next_pow2(n) for n in (1, 2, 3, 4, 5, 64, 65, 80, 96, 128)] == [1, 2, 4, 4, 8, 64, 128, 128, 128, 128]


@pytest.mark.parametrize("head_size,rotary_dims,dtype,expected", [
    # pythia-2.8b: half of 20 is 10, so only the 4-byte access (2 fp16 elements) divides it
    (80, 20, "fp16", "head size 80 (padded to 128) > warp size 32 x 2 fp16 elements per 4-byte access, the widest "
                     "that divides half the rotary dims (20/2 = 10) (assert(padded_head_size <= hw_warp_size * "
                     "T_per_elem) at line 163)"),
    (256, 24, "fp16", "head size 256 (padded to 256) > warp size 32 x 4 fp16 elements per 8-byte access, the widest "
                      "that divides half the rotary dims (24/2 = 12) (assert(padded_head_size <= hw_warp_size * "
                      "T_per_elem) at line 163)"),
    (512, 64, "bf16", "head size 512 (padded to 512) > warp size 32 x 8 bf16 elements per 16-byte access, the widest "
                      "that divides half the rotary dims (64/2 = 32) (assert(padded_head_size <= hw_warp_size * "
                      "T_per_elem) at line 163)"),
    (8, 8, "fp16", "2 threads per head (head size 8, padded to 8, 4 fp16 elements per thread) has no launch "
                   "(assert(false) at line 128)"),
    (64, 6, "fp16", "half the rotary dims (3) is not a multiple of 2 fp16 elements (assert(false) at line 155)"),
    (32, 10, "fp32", None),            # fp32: the 4-byte access is one element, so any half fits it
    (512, 0, "fp16", None),            # no rotary: pt_binding.cpp does not call the kernel, whatever the head
    (512, 1, "fp16", "head size 512 (padded to 512) > warp size 32 x 8 fp16 elements per 16-byte access, the widest "
                     "that divides half the rotary dims (1/2 = 0) (assert(padded_head_size <= hw_warp_size * "
                     "T_per_elem) at line 163)"),   # rotary_dim > 0 calls it, even a half of 0
])
def test_rotary_abort_reason_names_the_failing_assert_with_the_shapes_numbers(head_size, rotary_dims, dtype, expected):
    assert rotary_half_launch_failure(head_size, rotary_dims, dtype) == expected


def test_the_deployment_reason_carries_the_shapes_detail():
    spec = lookup("pythia-2.8b")
    assert match_deployment("ds", "bf16", "cuda:0", spec, CHECKED) == ROTARY_HALF_LAUNCH.reason(
        spec, "bf16", rotary_half_launch_failure(80, 20, "bf16"))


def test_without_a_version_given_the_installed_deepspeed_decides(monkeypatch):
    import importlib.metadata

    from pytest_neoxmii import known_issues
    try:
        installed = importlib.metadata.version("deepspeed")
    except importlib.metadata.PackageNotFoundError:
        installed = None
    assert deepspeed_version() == installed
    spec = lookup("pythia-2.8b")
    monkeypatch.setattr(known_issues, "deepspeed_version", lambda: "0.20.0")
    assert match_deployment("ds", "fp16", "cuda:0", spec) is None          # a newer release: deploy and see
    monkeypatch.setattr(known_issues, "deepspeed_version", lambda: CHECKED)
    assert match_deployment("ds", "fp16", "cuda:0", spec) is not None


def test_a_row_alone_is_that_row_unpadded_under_its_own_id_and_no_padded_defect_applies_to_it():
    """cases.row_alone: what the left-padding test generates each row of a padded case as. A padded-only known
    defect (ds-left-padded-decode) must not apply to it: its lengths are its one row's."""
    from pytest_neoxmii.cases import Case, CasePlan, row_alone
    from pytest_neoxmii.known_issues import breaks_engine
    from pytest_neoxmii.outputs import PromptBatch
    plan = CasePlan("padded-b3-len3x1x2", "padded", (3, 1, 2), True, 8)
    case = Case(plan, PromptBatch(rows=((5, 6, 7), (8,), (9, 10)), pad_token_id=1))
    row = row_alone(case, 2)
    assert row.id == "padded-b3-len3x1x2-row2" and row.plan.lengths == (2,) and row.plan.max_new_tokens == 8
    assert row.batch == PromptBatch(rows=((9, 10),), pad_token_id=1)
    assert row.batch.padded()[1].all()                        # no padding left
    assert match("greedy", INJECTED, plan) is not None and match("greedy", INJECTED, row.plan) is None
    assert breaks_engine("generate", "ds", plan, True) is not None
    assert breaks_engine("generate", "ds", row.plan, True) is None
