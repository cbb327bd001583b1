import subprocess
import sys

import pytest
import torch

from pytest_neoxmii import compat
from pytest_neoxmii.injection import InjectionFailed, count_injected, require_injected


def test_attention_answers_hidden_size_and_heads_from_config():
    compat.install()
    from transformers import GPTNeoXConfig
    from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention
    attn = GPTNeoXAttention(GPTNeoXConfig(hidden_size=64, num_attention_heads=4, intermediate_size=128,
                                          num_hidden_layers=1), 0)
    assert (attn.hidden_size, attn.num_attention_heads) == (64, 4)
    assert compat.is_patched()


def test_sitecustomize_arms_the_patch_in_child_processes():
    code = ("from transformers.models.gpt_neox.modeling_gpt_neox import GPTNeoXAttention as A; "
            "print(isinstance(getattr(A, 'hidden_size', None), property))")
    out = subprocess.run([sys.executable, "-c", code], env=compat.child_env(), capture_output=True, text=True,
                         timeout=120)
    assert out.stdout.strip().endswith("True"), out.stderr[-2000:]
    plain = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert plain.stdout.strip().endswith("False")   # without the child env nothing is patched


def test_transformers_5_is_refused_with_one_line(monkeypatch):
    monkeypatch.setattr(compat, "transformers_version", lambda: "5.17.0")
    reason = compat.check_kernel_injection()
    assert reason and "transformers 5.17.0" in reason and "transformers<5" in reason and "\n" not in reason
    monkeypatch.setattr(compat, "transformers_version", lambda: "4.57.6")
    assert compat.check_kernel_injection() is None


def test_mask_adapter_turns_a_4d_causal_mask_into_a_key_padding_mask():
    real = torch.tensor([[0, 0, 1, 1], [1, 1, 1, 1]], dtype=torch.bool)   # row 0 left-padded by 2
    causal = torch.tril(torch.ones(4, 4, dtype=torch.bool))
    mask4d = (causal[None, None] & real[:, None, None, :])               # [2,1,4,4], True = attend
    adapted = compat.adapt_mask(mask4d, torch.float16)
    assert adapted.shape == (2, 1, 1, 4) and adapted.dtype == torch.float16
    assert adapted[0, 0, 0].tolist() == [compat.DS_MINUS_INF, compat.DS_MINUS_INF, 0, 0]
    assert adapted[1, 0, 0].tolist() == [0, 0, 0, 0]
    # the additive float form (eager attention) gives the same answer
    additive = torch.zeros(mask4d.shape).masked_fill(~mask4d, torch.finfo(torch.float32).min)
    assert torch.equal(compat.adapt_mask(additive, torch.float16), adapted)


def test_mask_adapter_drops_a_mask_with_nothing_padded():
    mask4d = torch.tril(torch.ones(4, 4, dtype=torch.bool))[None, None].expand(3, 1, 4, 4)
    assert compat.adapt_mask(mask4d, torch.float16) is None
    flat = torch.ones(3, 4, dtype=torch.long)
    assert compat.adapt_mask(flat, torch.float16) is flat      # not a 4D mask: left alone


def test_injection_verification_fails_when_nothing_was_replaced():
    pytest.importorskip("deepspeed")
    from transformers import GPTNeoXConfig, GPTNeoXForCausalLM
    model = GPTNeoXForCausalLM(GPTNeoXConfig(hidden_size=32, num_attention_heads=4, intermediate_size=64,
                                             num_hidden_layers=2, vocab_size=64))
    report = count_injected(model, 2)
    assert report.describe() == "injected 0/2 layers"
    with pytest.raises(InjectionFailed, match="injected 0/2 layers.*transformers 4.46"):
        require_injected(report, "4.46.3")
