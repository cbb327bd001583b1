"""DeepSpeed-MII legacy deployment, in its worker process (DeploymentType.NON_PERSISTENT), queried through
`mii_query_handle` so the path MII users run is the one tested: text in, text out. What is judged is what
the engine generated, ids and the top-k logprobs of each step, recorded where the pipeline calls the model's
generate (backends/generation_capture.py), as on the tp >= 2 server's rank 0.

Not the text re-tokenized: the pipeline decodes with clean_up_tokenization_spaces=True, which joins " ." to
the word before it, so the ids read back from the text need not be the ids generated (seen on a 2-core AVX2
AMD EPYC, bf16, pythia-160m synthetic weights: "w50131 ." came back as "w50131.", which the tokenizer reads
as one unknown token, a false greedy failure at step 5 of the padded case's first row)."""
from __future__ import annotations

import itertools
import traceback
from pathlib import Path

import torch

from pytest_neoxmii import compat
from pytest_neoxmii.backends import generation_capture as capture
from pytest_neoxmii.backends import planted_fault
from pytest_neoxmii.backends.base import BackendInfo
from pytest_neoxmii.backends.deepspeed_inference import (KernelInjectedBackend, check_kernels_can_run,
                                                         init_distributed_env, spread_note)
from pytest_neoxmii.dtypes import TORCH_DTYPES
from pytest_neoxmii.deploy.processes import DeploymentError
from pytest_neoxmii.errors import BackendUnavailable, in_brief
from pytest_neoxmii.injection import gpu_used_bytes, held_since
from pytest_neoxmii.outputs import Generation, PromptBatch

_counter = itertools.count()


INSTALL_MII = ("pip install 'pytest-neoxmii[mii]' (installs deepspeed-mii without its broken dependency list, "
               "plus what it really needs)")


def import_mii():
    try:
        import mii.legacy as mii_legacy
    except ImportError as exc:
        raise BackendUnavailable(f"deepspeed-mii is not importable ({exc}): {INSTALL_MII}") from None
    return mii_legacy


def missing_package(package: str) -> str:
    """The skip reason of an MII engine (tp = 1 or the tp >= 2 server) whose package is not installed."""
    if package == "mii":
        return f"deepspeed-mii is not importable (not installed here): {INSTALL_MII}"
    return f"the {package!r} package is not installed here"


def prompt_texts(tokenizer, batch: PromptBatch) -> list[str]:
    """The prompts as the text MII takes; refused when the tokenizer would not give the same ids back."""
    texts = [tokenizer.decode(list(row)) for row in batch.rows]
    for row, text in zip(batch.rows, texts):
        if tokenizer(text, add_special_tokens=False)["input_ids"] != list(row):
            raise BackendUnavailable("this tokenizer does not round-trip the prompt through text, so "
                                     "MII's text interface cannot be compared token by token")
    return texts


class MiiBackend(KernelInjectedBackend):
    description = "DeepSpeed-MII legacy NON_PERSISTENT deployment, in a worker (tp >= 2: LOCAL gRPC server deployment)"
    label = "DeepSpeed-MII"
    colour = "#2ca02c"
    output_is_text = True          # mii_query_handle returns generated_text
    requires = ("deepspeed", "mii")
    missing = staticmethod(missing_package)

    def __init__(self, path: Path, dtype: str, device: str, tp: int, max_tokens: int, max_batch: int = 1, *,
                 engine_config: dict | None = None):
        if tp > 1:
            raise BackendUnavailable(f"mii with tp={tp} is the gRPC server deployment, not the in-process one")
        on_gpu = device.startswith("cuda")
        check_kernels_can_run(dtype, device)
        mii = import_mii()
        compat.install()
        init_distributed_env(device)
        from transformers import AutoTokenizer

        self.device = device
        self.name = f"neoxmii-{path.name}-{next(_counter)}"
        self.tokenizer = AutoTokenizer.from_pretrained(str(path))
        before = gpu_used_bytes(device)
        from pytest_neoxmii.serving_config import merged
        mii_config = merged({
            "dtype": TORCH_DTYPES[dtype], "tensor_parallel": 1,
            "skip_model_check": True,            # offline: no hub look-up of a local path
            "replace_with_kernel_inject": on_gpu,
            "load_with_sys_mem": not on_gpu,     # CPU: MII must not place the model on cuda:0
            "enable_cuda_graph": False,
            "max_tokens": max_tokens,
        }, engine_config)
        mii_config["dtype"] = TORCH_DTYPES[dtype]   # a user's spelling of the same dtype ("fp16", "half")
        inject = on_gpu and bool(mii_config["replace_with_kernel_inject"])   # kernels expected only if asked
        try:
            mii.deploy(
                task="text-generation", model=str(path), deployment_name=self.name,
                deployment_type=mii.DeploymentType.NON_PERSISTENT, mii_config=mii_config)
        except ImportError:
            raise                                      # a package MII needs: the engine's skip (worker.py)
        except Exception as exc:
            # MII loads the checkpoint itself: its failure in one line, the traceback kept in the worker's log
            traceback.print_exc()
            raise DeploymentError(f"MII could not deploy '{path}': {in_brief(exc)}") from exc
        self._mii = mii
        self.handle = mii.mii_query_handle(self.name)
        self.pipeline = mii.non_persistent_models[self.name][0]
        if not on_gpu:
            self.pipeline.device = torch.device("cpu")  # MII overwrites it with cuda:0 (docs/STACK.md trap 7)
        self.model = self.pipeline.model               # the DeepSpeed engine MII built
        # Recorded only while generate() queries: a timed query (latency.py) asks for no logits.
        self._records: list[dict] | None = None
        module = getattr(self.model, "module", self.model)
        planted = planted_fault.plant(module)          # a validation run's planted defect; nothing when unset
        capture.capture_generate(module, self._record, capture.CAPTURE_TOP_K,
                                 enabled=lambda: self._records is not None)
        kernels = self._verify_kernels(module, inject=inject, on_gpu=on_gpu,
                                       max_batch=max_batch, config_name="mii")
        held, measured = held_since(device, before)
        self.info = BackendInfo(
            backend="mii", dtype=dtype, device=device, tensor_parallel=1, kernels=kernels,
            gpu_memory_bytes=held, gpu_tensor_bytes=torch.cuda.memory_allocated(device) if on_gpu else None,
            workspace_bytes=self.workspace_bytes,
            notes=["MII legacy NON_PERSISTENT, queried through mii_query_handle"] + ([measured] if measured else [])
            + spread_note(self.workspace_readings) + planted_fault.note(planted))

    def query_texts(self, texts: list[str], max_new_tokens: int) -> list[str]:
        result = self.handle.query({"query": texts}, do_sample=False, max_new_tokens=max_new_tokens,
                                   min_new_tokens=max_new_tokens, return_full_text=False,
                                   pad_token_id=self.tokenizer.pad_token_id)
        return [r[0]["generated_text"] if isinstance(r, list) else r["generated_text"] for r in result]

    def _record(self, record: dict) -> None:
        self._records.append(record)

    def generate(self, batch: PromptBatch, max_new_tokens: int, top_k: int = 5) -> Generation:
        texts = prompt_texts(self.tokenizer, batch)
        self._records = []
        try:
            self.query_texts(texts, max_new_tokens)     # the user's path; what is judged is what was recorded
            records = self._records
        finally:
            self._records = None
        try:
            return capture.generation(records, batch, max_new_tokens, top_k)
        except capture.CaptureMismatch as exc:
            raise RuntimeError(f"MII deployment {self.name}: {exc}") from None

    def close(self) -> None:
        if getattr(self, "_mii", None) is None:
            return
        self._mii.non_persistent_models.pop(self.name, None)
        self._mii = None
        self.pipeline = None
        self.handle = None
        super().close()
