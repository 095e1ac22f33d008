"""The suite's order and the ``cuda`` marker.

Order: pytest-xdist (``-n 2 --dist loadfile``, pyproject.toml) hands whole files to its
two workers in collection order, so the files that take longest go first (longest
first keeps one worker from finishing a long file alone at the end); within a file
the order is unchanged.

``cuda``: tests that need an NVIDIA GPU (``tests/test_cuda.py``). They are skipped,
with the reason, where ``torch.cuda.is_available()`` is false, so the suite runs
unchanged on a CPU machine. On a GPU machine: ``python -m pytest -m cuda
tests/test_cuda.py`` (or ``bash scripts/gpu_check.sh``).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs an NVIDIA GPU (torch.cuda.is_available()); skipped without")


# The longest files on 2 cores (seconds, serial, measured with --durations=0), longest first.
LONGEST_FIRST = ("test_train.py", "test_hf_models.py", "test_families.py",
                 "test_quant_models.py", "test_rebalance.py", "test_rank_failure.py",
                 "test_two_hosts.py", "test_demo.py", "test_tensor_parallel.py",
                 "test_layer_ep.py", "test_llama4.py", "test_docs.py", "test_parallel_state.py",
                 "test_serve_live.py", "test_serve_engine.py", "test_properties.py")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # (stable)
    marked = [item for item in items if item.get_closest_marker("cuda") is not None]
    if not marked:
        return
    import torch  # (only when a cuda test was collected)

    if torch.cuda.is_available():
        return
    reason = (f"needs CUDA: torch.cuda.is_available() is False here (torch {torch.__version__}, "
              f"built with CUDA {torch.version.cuda})")
    for item in marked:
        item.add_marker(pytest.mark.skip(reason=reason))
