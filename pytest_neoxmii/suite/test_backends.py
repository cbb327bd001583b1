"""What each backend actually runs: kernels really injected, ZeRO really offloaded, teardown really
releasing the GPU. A backend that silently runs something else would make every parity verdict a lie."""
import time

import pytest

from pytest_neoxmii.backends import ENGINES


@pytest.mark.gpu
@pytest.mark.parametrize("name", [name for name, engine in ENGINES.items() if engine.injects_kernels])
def test_kernels_are_injected_in_every_layer(neox, name):
    if not neox.injects_kernels(name):     # on a GPU (the marker), only the user's config turns them off
        config = neox.serving_configs[name]
        pytest.skip(f"{name}: {config.path} turns kernel injection off (replace_with_kernel_inject: false)")
    backend = neox.backend(name)
    layers = neox.model.spec.num_hidden_layers
    assert backend.info.kernels == f"injected {layers}/{layers} layers", backend.info.describe()


def test_cpu_backends_say_they_run_without_kernels(neox, neox_backend_name):
    if neox.device != "cpu":
        pytest.skip("on a GPU the kernels are injected: see test_kernels_are_injected_in_every_layer")
    backend = neox.backend(neox_backend_name)
    assert "none" in backend.info.kernels, backend.info.describe()
    assert backend.info.device == "cpu"


@pytest.mark.gpu
@pytest.mark.parametrize("name", [name for name, engine in ENGINES.items() if engine.injects_kernels])
def test_deepspeed_workspace_is_what_the_registry_counts(neox, name):
    """The registry's fit arithmetic counts DeepSpeed's inference workspace from DeepSpeed's own formula
    (ModelSpec.ds_workspace_bytes); the deployment's worker measured the real one (released and taken
    again). Off by more than the driver's 2 MiB pages, and "fits" would promise what the GPU cannot hold."""
    backend = neox.backend(name)
    measured = backend.info.workspace_bytes
    if not backend.info.kernels.startswith("injected"):
        pytest.skip(f"{name} runs without injected kernels here, so without DeepSpeed's workspace "
                    f"({backend.info.describe()})")
    if measured is None and name == "mii" and backend.info.tensor_parallel > 1:
        pytest.skip("MII's gRPC server ranks do not report their workspace (tp >= 2)")
    assert measured is not None, f"{name} injected its kernels but measured no workspace: {backend.info.describe()}"
    expected = neox.workspace_bytes(name)
    print(f"{name}: DeepSpeed workspace measured {measured / 2**20:.1f} MiB per GPU, registry "
          f"{expected / 2**20:.1f} MiB (max_tokens {neox.max_tokens}, batch {neox.max_batch})")
    assert abs(measured - expected) <= 4 * 2**20, (
        f"{name}: DeepSpeed's workspace is {measured / 2**20:.1f} MiB per GPU, the registry counts "
        f"{expected / 2**20:.1f} MiB")


@pytest.mark.gpu
@pytest.mark.neox_engines("zero")     # the only engine it deploys: no other worker starts for it alone
def test_zero_inference_keeps_weights_off_the_gpu(neox):
    backend = neox.backend("zero")
    weights = neox.model.spec.weight_bytes(backend.info.dtype)
    held = backend.info.gpu_tensor_bytes
    print(f"ZeRO-Inference holds {held / 2**20:.1f} MiB of tensors on the GPU after load "
          f"({backend.info.gpu_memory_bytes / 2**20:.0f} MiB device-wide, NCCL included); weights are "
          f"{weights / 2**20:.0f} MiB")
    assert held is not None and held < 0.02 * weights


@pytest.mark.neox_last           # closes the session's deployment: after every test that uses it
def test_teardown_ends_every_process_and_gives_gpu_memory_back(neox, neox_backend_name):
    """The session's own deployment of the engine, closed after its last use: every process started for it
    ends, and on a GPU all the memory its processes held comes back. Measured across the close, with every
    other worker idle (settle), from each process's own figure where nvidia-smi attributes memory to
    processes; elsewhere from the deployment's teardown report (device-wide, within its 100 MiB)."""
    from pytest_neoxmii.deploy import gpumem, processes
    neox.settle()                                   # no other worker still loading or working ahead
    key = f"{neox_backend_name}:{neox.dtype}"
    turned = neox.took_turns.get(key)
    if turned is not None and key not in neox.backends:
        # Closed when another engine took its turn on a GPU too small for both: that close is the one judged
        # (deploying it again only to close it would cost a load).
        report = getattr(turned, "teardown_report", None)
        if report is None:                          # a model in the test process: no process of its own to find
            return
        print(report.describe())
        left = processes.tagged(turned.tag)
        assert not report.survivors and not left, f"{report.describe()}; still running: {sorted(left)}"
        assert report.memory_error is None and not report.leaked, report.describe()
        return
    backend = neox.backend(neox_backend_name)       # skips with the reason if it cannot run here
    on_gpu = neox.device != "cpu"
    own = processes.tagged(backend.tag)
    held = [gpumem.process_used_bytes(pid) for pid in own] if on_gpu else []
    # Every other process's memory left out (the reference, another job's on a shared GPU): only what the
    # deployment's processes held, or what no process holds, can move the figure.
    before = gpumem.used_beside(own).used if on_gpu and any(h is not None for h in held) else None
    neox.close_backend(neox_backend_name)
    report = backend.teardown_report
    print(report.describe())
    left = processes.tagged(backend.tag)    # every process started for it carries its tag, children too
    assert not report.survivors and not left, f"{report.describe()}; still running: {sorted(left)}"
    if not on_gpu:
        return                                      # no GPU memory to give back
    assert report.memory_error is None and report.memory_after_mib is not None, report.describe()
    if before is None:                              # no per-process figures here: the report's own check
        assert not report.leaked, report.describe()
        return
    held_mib = sum(h for h in held if h is not None) / 2**20
    deadline = time.monotonic() + 10                # the driver frees an exited process's memory soon after
    while True:
        freed_mib = sum(before.values()) - sum(gpumem.used_beside(own).used.values())
        if freed_mib >= held_mib - 16 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    print(f"{neox_backend_name}: its processes held {held_mib:.0f} MiB; the close freed {freed_mib:.0f} MiB")
    assert freed_mib >= held_mib - 16, (
        f"{neox_backend_name} teardown gave back {freed_mib:.0f} MiB of the {held_mib:.0f} MiB its processes "
        f"held: {report.describe()}")
