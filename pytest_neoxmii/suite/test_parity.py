"""DS-vs-HF parity: every selected backend (ds, mii, zero) against the fp32 HF reference, on every case,
greedy and teacher-forced, with tolerances from the noise floor measured in this session."""
from pytest_neoxmii.checks import check_greedy, check_teacher_forced


def test_greedy_parity(neox, neox_backend_name, neox_generation_case, request):
    check_greedy(neox, neox_backend_name, neox_generation_case, request)


def test_teacher_forced_parity(neox, neox_backend_name, neox_case, request):
    check_teacher_forced(neox, neox_backend_name, neox_case, request)
