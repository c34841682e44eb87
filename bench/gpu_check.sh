#!/usr/bin/env bash
# bench/gpu_check.sh: the GPU check of issue 18 in one run of under 8 minutes on one H100/H200.
#
#   0. the machine: GPU, driver, Python, torch, the packages the steps use
#   1. the CUDA tests: pytest -m cuda (tests/conftest.py skips them where there is no GPU)
#   2. detector: full ResNet-101 C4, 600/1000, 300 proposals, scikit-image photographs as JPEG;
#      fp32 / bf16 / fp16, batch 1 and 16 images of one input size per pass; time per stage (decode,
#      preprocess, backbone, RPN, box head, selection, encode), images/s, TFLOP/s, autocast error
#   3. extraction job (Ray, one GPU actor, bf16) over 384 photographs: job images/s / detector alone
#   4. ViLBERT paper-config training step (bench_model.py: SDPA vs plain attention, bf16 and fp32, batch
#      64) and the batch sweep (bench_batch_sweep.py: bf16 + SDPA, batch 8 doubling to out of memory):
#      samples/s, MFU against the measured matmul peak and the datasheet dense bf16 peak, peak memory,
#      the largest batch that fits
#   5. retrieval scoring pairs/s (bench_eval.py), then, while time is left, the batching rule on mixed
#      COCO-like sizes (bench_detector.py --batching) and training end to end with the DataLoader
#      (bench_train.py)
# Every step runs under `timeout` inside a shared budget (--budget, default 450 s), so a hang costs
# one step, not the run. Everything goes to ONE file, "$OUT/gpu_check.md" (OUT: the device tool's
# output folder; bench/results/gpu when unset), and a summary table is printed last.
#
# The GPU machine (nvidia-h200) has python3 with torch, torchvision, scikit-image, pytest, pyarrow,
# tokenizers ... but not ray, webdataset (nor their jsonschema / braceexpand): these travel as wheels.
#   here, once, with PyPI:   bash bench/gpu_check.sh --fetch-wheels     (fills .whl/, about 48 MB)
#   then the device tool:    run(command="bash bench/gpu_check.sh", carry=[".whl"], timeout_s=540)
# The script installs the wheels (pip --target, no network) only when ray or webdataset is missing.
#
#   bash bench/gpu_check.sh --cpu-smoke    every step with tiny sizes on the CPU (a few minutes)
#   bash bench/gpu_check.sh --dry-run      the plan, and a check that every option exists (seconds)
# PYTHON picks the interpreter (default: .venv/bin/python when present, else python3).

set -u
cd "$(dirname "$0")/.." || exit 2
ROOT=$(pwd)

MODE=gpu
BUDGET=""
ONLY=""
usage() { sed -n '2,33p' "$0" | sed 's/^# \{0,1\}//'; }
while [ $# -gt 0 ]; do
    case "$1" in
        --cpu-smoke) MODE=smoke ;;
        --dry-run) MODE=dry ;;
        --fetch-wheels) MODE=fetch ;;
        --budget) BUDGET=$2; shift ;;
        --only) ONLY=$2; shift ;;
        -h | --help) usage; exit 0 ;;
        *) echo "unknown argument: $1" >&2; usage >&2; exit 2 ;;
    esac
    shift
done

[ -n "$BUDGET" ] || BUDGET=$([ "$MODE" = smoke ] && echo 900 || echo 450)

if [ -n "${PYTHON:-}" ]; then PY=$PYTHON
elif [ -x .venv/bin/python ]; then PY=.venv/bin/python
else PY=python3; fi

WHEELS=.whl
# Versions the project's CPU venv runs; ray loses its Java jars (32 MB) so that all fits the 64 MiB tree.
WHEEL_PINS="ray==2.60.0 webdataset==1.0.2 braceexpand==0.1.7 jsonschema==4.26.0 \
jsonschema-specifications==2025.9.1 referencing==0.37.0 rpds-py==2026.9.1"

if [ "$MODE" = fetch ]; then
    mkdir -p "$WHEELS"
    # shellcheck disable=SC2086  # the pins are separate words
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
        -d "$WHEELS" $WHEEL_PINS || exit 1
    "$PY" - "$WHEELS" <<'EOF' || exit 1
"""Drop ray/jars (the Java workers) from the ray wheel, keeping its RECORD consistent."""
import glob, os, sys, zipfile
for path in glob.glob(os.path.join(sys.argv[1], "ray-*.whl")):
    with zipfile.ZipFile(path) as src:
        if not any(n.startswith("ray/jars/") for n in src.namelist()):
            continue
        tmp = path + ".tmp"
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_DEFLATED) as dst:
            for info in src.infolist():
                if info.filename.startswith("ray/jars/"):
                    continue
                data = src.read(info)
                if info.filename.endswith(".dist-info/RECORD"):
                    lines = data.decode().splitlines(keepends=True)
                    data = "".join(x for x in lines if not x.startswith("ray/jars/")).encode()
                dst.writestr(info, data)
    os.replace(tmp, path)
    print(f"{os.path.basename(path)}: ray/jars removed, {os.path.getsize(path) / 2**20:.1f} MiB")
EOF
    du -sh "$WHEELS"
    echo "carry [\"$WHEELS\"] with: bash bench/gpu_check.sh"
    exit 0
fi

OUT=${OUT:-bench/results/gpu}
mkdir -p "$OUT"
RESULTS=$OUT/gpu_check.md
SCRATCH=$(mktemp -d)
trap 'rm -rf "$SCRATCH"' EXIT
START=$(date +%s)
SUMMARY=()

export PYTHONUNBUFFERED=1 RAY_AUTH_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

{
    echo "# GPU check (bench/gpu_check.sh, mode $MODE)"
    echo
    echo "- started: $(date -u '+%Y-%m-%d %H:%M:%S UTC'); budget ${BUDGET} s; host $(hostname)"
    echo "- commit: $(git rev-parse --short HEAD 2>/dev/null || echo 'unknown (no .git on this copy)')"
} >"$RESULTS"

# The wheels go in only when a package the steps import is missing (a machine that has them installs nothing).
if [ "$MODE" != dry ] && ! "$PY" -c "import ray, webdataset" 2>/dev/null; then
    if ls "$WHEELS"/*.whl >/dev/null 2>&1; then
        SITE=/tmp/gpu_check_site
        t=$(date +%s)
        "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" \
            "$WHEELS"/*.whl >>"$RESULTS" 2>&1 || echo "- pip install of $WHEELS failed (see above)" >>"$RESULTS"
        export PYTHONPATH=$ROOT:$SITE
        echo "- installed $(find "$WHEELS" -name '*.whl' | wc -l) wheels from $WHEELS into $SITE in $(($(date +%s) - t)) s" >>"$RESULTS"
    else
        echo "- ray or webdataset is missing and there is no $WHEELS/: the steps that need them will fail" >>"$RESULTS"
    fi
fi

if command -v timeout >/dev/null; then
    limited() { timeout -k 10 "$@"; }
else  # no coreutils timeout: the steps run unbounded (said in the results file)
    limited() { shift; "$@"; }
    echo "- no \`timeout\` on this machine: steps are not time-boxed" >>"$RESULTS"
fi

wanted() { [ -z "$ONLY" ] || [[ ",$ONLY," == *",$1,"* ]]; }

# step NAME MAX_SECONDS CMD...: run CMD under timeout (the smaller of MAX_SECONDS and the budget left),
# its output into the results file (and stdout), its status and time into the summary.
step() {
    local name=$1 box=$2
    shift 2
    wanted "$name" || return 0
    local left=$((BUDGET - ($(date +%s) - START) - 5))
    local limit=$((box < left ? box : left))
    {
        echo
        echo "## $name"
        echo
        echo "\`$*\` (limit ${limit} s)"
        echo
    } >>"$RESULTS"
    if [ "$MODE" = dry ]; then
        check_options "$@"
        return 0
    fi
    if [ "$limit" -lt 15 ]; then
        echo "skipped: the budget is spent" | tee -a "$RESULTS"
        SUMMARY+=("| $name | skipped (budget) | 0 |")
        return 0
    fi
    echo '```' >>"$RESULTS"
    local t0 rc
    t0=$(date +%s)
    echo "=== $name (limit ${limit} s)"
    limited "$limit" "$@" 2>&1 | tee -a "$RESULTS"
    rc=${PIPESTATUS[0]}
    echo '```' >>"$RESULTS"
    local took=$(($(date +%s) - t0)) status=ok
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then status="TIMED OUT"
    elif [ "$rc" -ne 0 ]; then status="failed (exit $rc)"; fi
    echo "- $name: $status in ${took} s" | tee -a "$RESULTS"
    SUMMARY+=("| $name | $status | $took |")
}

# attach FILE TITLE: a JSON file a step wrote, into the results file
attach() {
    [ -s "$1" ] || return 0
    { echo; echo "$2:"; echo; echo '```json'; cat "$1"; echo '```'; } >>"$RESULTS"
}

# Dry run: every --option of a python step must exist in its script (argparse add_argument).
DRY_FAIL=0
check_options() {
    local script="" arg
    for arg in "$@"; do
        case "$arg" in bench/*.py) script=$arg ;; esac
    done
    [ -n "$script" ] || return 0
    for arg in "$@"; do
        case "$arg" in
            --*)
                if ! grep -q -- "\"${arg%%=*}\"" "$script"; then
                    echo "MISSING OPTION: $script has no $arg" | tee -a "$RESULTS"
                    DRY_FAIL=1
                fi
                ;;
        esac
    done
    echo "options ok: $script" >>"$RESULTS"
}

cat >"$SCRATCH/machine.py" <<'EOF'
"""The machine: Python, torch, CUDA device, the packages the steps import, nvidia-smi."""
import importlib, os, platform, shutil, subprocess, sys
import torch
print(f"python {platform.python_version()} ({sys.executable}); {os.cpu_count()} CPUs; torch {torch.__version__}")
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print(f"cuda {torch.version.cuda}; {p.name}, {p.total_memory / 2**30:.1f} GiB, {p.multi_processor_count} SMs, "
          f"capability {p.major}.{p.minor}; cudnn {torch.backends.cudnn.version()}; "
          f"tf32 matmul {torch.backends.cuda.matmul.allow_tf32}, tf32 cudnn {torch.backends.cudnn.allow_tf32}")
else:
    print("no CUDA device")
for name in ("torchvision", "numpy", "PIL", "skimage", "ray", "webdataset", "pyarrow", "tokenizers", "pytest"):
    try:
        m = importlib.import_module(name)
        print(f"{name} {getattr(m, '__version__', '?')} ({os.path.dirname(m.__file__)})")
    except Exception as err:
        print(f"{name}: MISSING ({type(err).__name__}: {err})")
if shutil.which("nvidia-smi"):
    q = "name,driver_version,memory.total,memory.used,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    subprocess.run(["nvidia-smi", f"--query-gpu={q}", "--format=csv"], check=False)
EOF

# shellcheck disable=SC2054  # the commas are inside arguments (comma lists), not between elements
if [ "$MODE" = smoke ]; then
    DEV=cpu
    DET=(--device cpu --depth 50 --min-size 64 --max-size 96 --post-nms-topk 4 --images 2 --batch-size 1,2
        --repeats 1 --dtypes fp32,bf16 --matmul-size 256 --selection-repeats 2 --detect-rate yes)
    BATCHING=(--batching --device cpu --depth 50 --min-size 64 --max-size 96 --post-nms-topk 4 --images 4
        --batch-size 2 --repeats 1 --dtypes fp32 --matmul-size 256)
    PIPE=(--device cpu --photos --images 4 --workers 1 --depth 50 --min-size 64 --max-size 96
        --max-proposals 4 --min-boxes 2 --max-boxes 4 --batch-size 2 --shard-size 2)
    MODEL=(--device cpu --config tiny --batch 2 --steps 1 --warmup 1 --variants sdpa-bf16,sdpa-fp32
        --attention-repeats 1 --peak-size 256)
    SWEEP=(--device cpu --config tiny --start 2 --max-batch 4 --steps 1 --peak-size 256)
    EVAL=(--device cpu --presets tiny --batch-size 4 --rounds 1 --skip-metrics)
    TRAIN=(--configs tiny --device cpu --images 16 --batch-size 4 --steps 1 --warmup 1 --workers 0 --repeats 1)
    TESTS=(-m cuda -q -p no:cacheprovider tests/test_train_masking.py tests/test_eval_e2e.py)
else
    DEV=cuda
    DET=(--device cuda --images 64 --batch-size 1,16 --repeats 2 --dtypes fp32,bf16,fp16 --selection-repeats 10)
    BATCHING=(--batching --device cuda --images 48 --batch-size 4,12 --repeats 2 --dtypes bf16)
    PIPE=(--device cuda --photos --images 384 --workers 1 --depth 101 --min-size 600 --max-size 1000
        --max-proposals 300 --min-boxes 10 --max-boxes 36 --batch-size 8 --shard-size 64 --precision bf16)
    MODEL=(--device cuda --batch 64 --steps 10 --warmup 3 --variants sdpa-bf16,eager-bf16,sdpa-fp32
        --attention-repeats 10)
    SWEEP=(--device cuda --start 8 --max-batch 8192 --steps 3 --budget-s 75)
    EVAL=(--device cuda --presets tiny,vilbert-base --precisions fp32,bf16 --batch-size 256 --rounds 3)
    TRAIN=(--configs vilbert-base --device cuda --images 512 --batch-size 64 --steps 20 --warmup 3
        --workers 4 --repeats 1 --precision bf16)
    TESTS=(-m cuda -q -p no:cacheprovider --continue-on-collection-errors tests)
fi

step machine 60 "$PY" "$SCRATCH/machine.py"
step cuda-tests 150 "$PY" -m pytest "${TESTS[@]}"
step detector 200 "$PY" bench/bench_detector.py "${DET[@]}"
step extraction-job 150 "$PY" bench/bench_pipeline.py "${PIPE[@]}" --out "$SCRATCH/pipeline.json"
attach "$SCRATCH/pipeline.json" "bench_pipeline.py figures"
step training-step 120 "$PY" bench/bench_model.py "${MODEL[@]}" --out "$SCRATCH/model.json"
attach "$SCRATCH/model.json" "bench_model.py figures"
step batch-sweep 110 "$PY" bench/bench_batch_sweep.py "${SWEEP[@]}" --out "$SCRATCH/sweep.json"
attach "$SCRATCH/sweep.json" "bench_batch_sweep.py figures"
step retrieval-scoring 60 "$PY" bench/bench_eval.py "${EVAL[@]}"
step batching-rule 75 "$PY" bench/bench_detector.py "${BATCHING[@]}"
step training-end-to-end 100 "$PY" bench/bench_train.py "${TRAIN[@]}"

if [ "$MODE" = dry ]; then
    echo "dry run ($DEV plan) written to $RESULTS"
    [ "$DRY_FAIL" -eq 0 ] && echo "every option exists" || echo "some options do not exist (see above)"
    exit "$DRY_FAIL"
fi

{
    echo
    echo "## Summary ($(($(date +%s) - START)) s of a ${BUDGET} s budget)"
    echo
    echo "| step | status | seconds |"
    echo "|---|---|---|"
    printf '%s\n' "${SUMMARY[@]+"${SUMMARY[@]}"}"
} | tee -a "$RESULTS"
# the headline figures again, so the end of the output (all the device tool returns inline) has them
grep -E '^\| (fp32|bf16|fp16|one image|same input|padded|tiny|vilbert-base) |^batch +[0-9]+:|^largest batch|^job, |^detector alone|^(sdpa|eager)-' \
    "$RESULTS" | awk '!seen[$0]++' | cut -c1-220
echo "results: $RESULTS"
FAILED=0
for row in "${SUMMARY[@]+"${SUMMARY[@]}"}"; do
    case "$row" in *"| ok |"*) ;; *) FAILED=1 ;; esac
done
exit "$FAILED"
