"""Lazy, per-slice reads of a Hugging Face safetensors checkpoint (one file or sharded).

Nothing is read until asked for, and a read of rows ``[a, b)`` of a stacked
tensor touches only those rows on disk (safetensors' ``get_slice``), so a rank
can take its own experts without materialising anyone else's.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import Tensor

__all__ = ["CheckpointError", "CheckpointReader"]

SINGLE = "model.safetensors"
INDEX = "model.safetensors.index.json"
FLOAT_DTYPES = {"F64", "F32", "F16", "BF16"}


class CheckpointError(ValueError):
    """A checkpoint that is not a supported model, or lacks or misshapes a tensor."""


class CheckpointReader:
    """Tensor names, shapes and (partial) reads of the safetensors files of ``path``."""

    quant = None  # the checkpoint's epmoe.quant.QuantFormat (FP8, MXFP4), set by the loader

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        if (self.path / INDEX).is_file():
            index = json.loads((self.path / INDEX).read_text())
            self._file_of = {k: self.path / f for k, f in index["weight_map"].items()}
        elif (self.path / SINGLE).is_file():
            with safe_open(self.path / SINGLE, framework="pt") as f:
                self._file_of = {k: self.path / SINGLE for k in f.keys()}  # noqa: SIM118
        else:
            raise CheckpointError(f"{self.path} holds neither {SINGLE} nor {INDEX}: not a "
                                  "safetensors checkpoint")
        self._meta: dict[str, tuple[tuple[int, ...], str]] = {}  # shape, dtype by name
        self.reads: list[tuple[str, tuple[int, int] | None]] = []  # (name, rows) of every read

    def __contains__(self, name: str) -> bool:
        return name in self._file_of

    def keys(self) -> list[str]:
        return list(self._file_of)

    def _file(self, name: str) -> Path:
        if name not in self._file_of:
            raise CheckpointError(f"checkpoint {self.path} has no tensor {name!r}")
        file = self._file_of[name]
        if not file.is_file():
            raise CheckpointError(f"{file} (listed in {INDEX} for {name!r}) does not exist")
        return file

    def _header(self, name: str) -> tuple[tuple[int, ...], str]:
        if name not in self._meta:
            with safe_open(self._file(name), framework="pt") as f:
                for key in f.keys():  # noqa: SIM118 (one header parse for the whole file)
                    sl = f.get_slice(key)
                    self._meta[key] = (tuple(sl.get_shape()), sl.get_dtype())
        return self._meta[name]

    def shape(self, name: str) -> tuple[int, ...]:
        """From the file's header; reads no tensor data."""
        return self._header(name)[0]

    def dtype(self, name: str) -> str:
        """The safetensors dtype name ("F32", "BF16", "F8_E4M3", ...), from the header."""
        return self._header(name)[1]

    def read(self, name: str, shape: tuple[int, ...] | None = None,
             rows: tuple[int, int] | None = None, quantized: bool = False) -> Tensor:
        """The tensor ``name`` (or its rows ``[a, b)`` along dim 0), checked against ``shape``.

        ``shape`` is the full tensor's expected shape; a mismatch raises a
        :class:`CheckpointError` that names the tensor. Floating-point tensors only,
        unless ``quantized`` (fp8 weights, uint8 blocks and scales: epmoe.hf.quant_load).
        """
        got = self.shape(name)
        if shape is not None and got != tuple(shape):
            raise CheckpointError(f"tensor {name!r} in {self.path} has shape {got}, "
                                  f"expected {tuple(shape)}")
        dtype = self.dtype(name)
        if dtype not in FLOAT_DTYPES and not quantized:
            raise CheckpointError(f"tensor {name!r} in {self.path} is {dtype}: epmoe loads "
                                  f"{'/'.join(sorted(FLOAT_DTYPES))} tensors only (a quantised "
                                  "checkpoint?)")
        self.reads.append((name, rows))
        # The file is mapped for this read only: its pages leave this process's
        # resident memory when the mapping closes, so a load's peak stays near the
        # weights it keeps (not those plus every page it has read).
        with safe_open(self._file(name), framework="pt") as f:
            sl = f.get_slice(name)
            t = sl[rows[0] : rows[1]] if rows is not None else sl[:]
        return t if isinstance(t, Tensor) else torch.as_tensor(t)

    def close(self) -> None:
        self._meta.clear()
