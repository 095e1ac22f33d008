"""The ``cuda`` marker: tests that need an NVIDIA GPU (``tests/test_cuda.py``).

They are skipped, with the reason, where ``torch.cuda.is_available()`` is false, so
the suite runs unchanged on a CPU machine. On a GPU machine:
``python -m pytest -m cuda tests/test_cuda.py`` (or ``bash scripts/gpu_check.sh``).
"""

from __future__ import annotations

import pytest


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "cuda: needs an NVIDIA GPU (torch.cuda.is_available()); skipped without")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
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
