import os

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    has_gpu = torch.cuda.is_available()
    skip = pytest.mark.skip(reason="needs a CUDA GPU (run tests/gpu/run.sh on the GPU machine)")
    for item in items:
        # a CPU test file's cases parametrized on device "cuda" belong to the GPU suite (-m gpu) too
        callspec = getattr(item, "callspec", None)
        if callspec is not None and any(isinstance(v, str) and v == "cuda" for v in callspec.params.values()):
            item.add_marker(pytest.mark.gpu)
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_backend():
    """Every test starts on the default backend with validation on."""
    import spiel.ops as ops

    ops.set_backend(os.environ.get("SPIEL_BACKEND", "auto"))
    ops.set_validation(True)
    yield
    ops.set_backend("auto")
    ops.set_validation(True)


@pytest.fixture
def one_thread():
    """Tiny tensors: one intra-op thread is faster (and far faster on a shared, loaded machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def random_indices(numel: int, k: int, dtype=torch.int64, generator=None, device="cpu") -> torch.Tensor:
    """k sorted unique flat positions out of numel."""
    return torch.randperm(numel, generator=generator)[:k].sort().values.to(device=device, dtype=dtype)
