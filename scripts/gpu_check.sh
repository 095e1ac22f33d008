#!/usr/bin/env bash
# The GPU check: on a Linux machine with NVIDIA GPUs, from a fresh clone,
#
#     bash scripts/gpu_check.sh
#
# installs torch==2.13.0 (PyPI's default Linux wheel is a CUDA build) and
# -e '.[test]' into a virtual environment, runs the tests marked `cuda`
# (tests/test_cuda.py) and, with 2 or more GPUs, the demo and `epmoe bench` per
# backend over NCCL, each step under a timeout and the whole within 8 minutes;
# then prints a summary table and writes gpu_check.json (scripts/gpu_summary.py).
# What it covers and what it needs: docs/gpu.md.
#
# Environment (all optional):
#   GPU_CHECK_JSON=gpu_check.json     where the JSON goes
#   GPU_CHECK_LOGS=gpu_check_logs     each step's log, the JUnit XML, the bench JSON
#   GPU_CHECK_VENV=.venv-gpu          virtual environment to create or reuse; "none":
#                                     use GPU_CHECK_PYTHON as it is
#   GPU_CHECK_PYTHON=python3          the interpreter (makes the venv, or is used)
#   TORCH_INDEX_URL=                  pip index for torch, e.g.
#                                     https://download.pytorch.org/whl/cu128
#   GPU_CHECK_NO_INSTALL=0            1: install nothing
#   GPU_CHECK_BUDGET_S=480            the whole check's time, installation included
#   GPU_CHECK_DRY_RUN=0               1 (or --dry-run): no GPU needed, nothing
#                                     installed; runs the steps that need no GPU with
#                                     the current Python and reports the others skipped
set -uo pipefail

DRY_RUN=${GPU_CHECK_DRY_RUN:-0}
for arg in "$@"; do
    case $arg in
        --dry-run) DRY_RUN=1 ;;
        -h|--help) sed -n '2,25p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
        *) echo "gpu_check.sh: unknown argument $arg (try --help)" >&2; exit 2 ;;
    esac
done

cd "$(dirname "$0")/.." || exit 2
JSON=${GPU_CHECK_JSON:-gpu_check.json}
LOGS=${GPU_CHECK_LOGS:-gpu_check_logs}
VENV=${GPU_CHECK_VENV:-.venv-gpu}
BASE_PY=${GPU_CHECK_PYTHON:-$(command -v python3 || command -v python)}
BUDGET_S=${GPU_CHECK_BUDGET_S:-480}
DEADLINE=$((SECONDS + BUDGET_S))
STARTED=$(date -u +%Y-%m-%dT%H:%M:%SZ)
mkdir -p "$LOGS"
STEPS=$LOGS/steps.tsv
: >"$STEPS"
BACKENDS=(alltoall allgather_reducescatter low_latency)

# One line per step: name, kind, result (pass/fail/timeout/skip), seconds, log, artifact, note.
record() {
    printf '%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$@" >>"$STEPS"
    printf '   -> %s (%s s) %s\n' "$3" "$4" "$7"
}

skip() {  # name kind why
    echo "== $1: skipped ($3)"
    record "$1" "$2" skip 0 "" "" "$3"
}

# run_step NAME KIND LIMIT_S ARTIFACT COMMAND...: the command under `timeout`, its output
# in $LOGS/<name>.log; never past the check's deadline.
run_step() {
    local name=$1 kind=$2 limit=$3 artifact=$4
    shift 4
    local left=$((DEADLINE - SECONDS))
    if ((left < 15)); then
        skip "$name" "$kind" "no time left of the ${BUDGET_S} s"
        return 1
    fi
    ((limit > left)) && limit=$left
    local log
    log=$LOGS/$(printf '%s' "$name" | tr -c 'A-Za-z0-9_.-' '_').log
    echo "== $name (up to ${limit} s): $*"
    local t0=$SECONDS rc=0 result=pass
    timeout --kill-after=10 "$limit" "$@" >"$log" 2>&1 || rc=$?
    if ((rc == 124 || rc == 137)); then
        result=timeout
    elif ((rc != 0)); then
        result=fail
    fi
    record "$name" "$kind" "$result" $((SECONDS - t0)) "$log" "$artifact" "exit code $rc"
    if [[ $result != pass ]]; then
        echo "   last lines of $log:"
        tail -n 15 "$log" | sed 's/^/   | /'
    fi
    [[ $result == pass ]]
}

# ---------------------------------------------------------------- the machine
SMI=$LOGS/nvidia-smi.csv
if ((DRY_RUN)); then
    skip "nvidia-smi" check "dry run"
    : >"$SMI"
elif ! command -v nvidia-smi >/dev/null; then
    echo "gpu_check.sh: nvidia-smi not found: this check needs NVIDIA GPUs and their driver" \
         "(GPU_CHECK_DRY_RUN=1 runs it without)" >&2
    exit 2
else
    run_step "nvidia-smi" check 30 "" \
        nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
    cp "$LOGS/nvidia-smi.log" "$SMI"
fi

# ---------------------------------------------------------------- the environment
if ((DRY_RUN)) || [[ $VENV == none ]]; then
    PY=$BASE_PY
else
    if [[ ! -x $VENV/bin/python ]]; then
        "$BASE_PY" -m venv "$VENV" || {
            echo "gpu_check.sh: could not create $VENV with $BASE_PY (install python3-venv," \
                 "or set GPU_CHECK_VENV=none to use $BASE_PY as it is)" >&2
            exit 2
        }
    fi
    PY=$VENV/bin/python
fi
echo "python: $PY"

if ((DRY_RUN)); then
    skip "install" install "dry run: nothing installed"
elif [[ ${GPU_CHECK_NO_INSTALL:-0} == 1 ]]; then
    skip "install" install "GPU_CHECK_NO_INSTALL=1"
else
    INDEX=()
    [[ -n ${TORCH_INDEX_URL:-} ]] && INDEX=(--index-url "$TORCH_INDEX_URL")
    run_step "install torch" install 300 "" \
        "$PY" -m pip install --progress-bar off torch==2.13.0 "${INDEX[@]}" &&
    run_step "install epmoe[test]" install 180 "" \
        "$PY" -m pip install --progress-bar off -e '.[test]'
fi

# The GPUs torch sees (0 without CUDA).
GPUS=$("$PY" -c 'import torch; print(torch.cuda.device_count() if torch.cuda.is_available() else 0)' \
       2>/dev/null || echo 0)
if ((DRY_RUN)); then
    skip "torch sees the GPUs" check "dry run"
else
    run_step "torch sees the GPUs" check 60 "" "$PY" -c '
import torch
assert torch.cuda.is_available(), f"torch {torch.__version__} (CUDA {torch.version.cuda}) sees no GPU"
for i in range(torch.cuda.device_count()):
    print(i, torch.cuda.get_device_name(i), torch.cuda.get_device_capability(i))
print("torch", torch.__version__, "CUDA", torch.version.cuda, "NCCL", torch.cuda.nccl.version())'
fi
echo "GPUs seen by torch: $GPUS"

# ---------------------------------------------------------------- the steps
# pytest-timeout ends a stuck test (its server processes are stopped in its finally).
run_step "cuda tests" pytest 300 "$LOGS/cuda_tests.xml" \
    "$PY" -m pytest -m cuda tests/test_cuda.py -p no:cacheprovider --timeout 200 -q \
    --junitxml "$LOGS/cuda_tests.xml"

if ((GPUS >= 2)); then
    run_step "demo, 2 ranks (NCCL)" demo 90 "" \
        "$PY" -m torch.distributed.run --nproc_per_node=2 demo.py
    for b in "${BACKENDS[@]}"; do
        run_step "bench $b" bench 60 "$LOGS/bench_$b.json" \
            "$PY" -m torch.distributed.run --nproc_per_node=2 -m epmoe bench --preset mixtral \
            --mode prefill --tokens 2048 --dtype bfloat16 --backend "$b" --reps 5 \
            --json "$LOGS/bench_$b.json"
    done
else
    why="needs 2 GPUs, torch sees $GPUS"
    skip "demo, 2 ranks (NCCL)" demo "$why"
    for b in "${BACKENDS[@]}"; do
        skip "bench $b" bench "$why"
    done
fi

# ---------------------------------------------------------------- the summary
SUMMARY_ARGS=(--steps "$STEPS" --json "$JSON" --nvidia-smi "$SMI" --started "$STARTED"
              --seconds "$SECONDS")
((DRY_RUN)) && SUMMARY_ARGS+=(--dry-run)
"$PY" scripts/gpu_summary.py "${SUMMARY_ARGS[@]}"
