#!/usr/bin/env bash
# The GPU check of issue 27, as ONE prepared run on the device machine (~7 minutes on the H200): installs the wheels
# its image lacks, runs `pytest -m gpu`, the 48-patient CV timing, the per-model step table and the epoch
# race against torchmil, and writes one log per stage under $OUT (docs/benchmarks.md, H200 section, keeps
# the numbers). Each stage has its own time limit, so a slow stage cannot starve the others.
#
#   here:    bash scripts/gpu_wheels.sh                       (wheels into the git-ignored .whl/)
#   device:  run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=510)
#   dry run on a CPU (the script's logic, small sizes): DEVICE=cpu OUT=/tmp/gpu_check PY=.venv/bin/python \
#            bash scripts/gpu_check.sh
#   a second run in the same session may take fewer stages and models:
#            STAGES="pytest small_cv models" MODELS="abmil transmil mambamil" bash scripts/gpu_check.sh
#   PROFILE=1 profiles the small-bag CV too (+70 s); PYTEST_ARGS="-k ..." selects GPU tests
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}
DEVICE=${DEVICE:-cuda}
PY=${PY:-python3}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}"
if [ "$DEVICE" = cpu ]; then        # dry run: the same stages at toy sizes
  RACE=(--bags 12 --min-size 200 --max-size 2000 --dim 64 --epochs 2); SIZES=(2000 4000); PT_DEVICE=cpu; WORKERS=2
  PT_SELECT=(-k "not every_model_and_task and not demo")
else
  RACE=(--bags 200 --min-size 1000 --max-size 50000 --dim 1024 --epochs 3); SIZES=(10000 50000); PT_DEVICE=cuda
  WORKERS=12; PT_SELECT=()
fi

STAGES=${STAGES:-pytest small_cv models race}
MODELS=${MODELS:-}
want() { [[ " $STAGES " == *" $1 "* ]]; }

stage() {   # stage NAME SECONDS CMD...: run CMD under a time limit, output to $OUT/NAME.log, one line here
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  echo "$name: exit $rc in $((SECONDS - t0)) s (limit $limit s)" | tee -a "$OUT/summary.txt"
}

: > "$OUT/summary.txt"
if [ "$DEVICE" != cpu ] && ls .whl/*.whl > /dev/null 2>&1; then   # (a dry run uses the venv)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    || { echo "wheel install failed" | tee -a "$OUT/summary.txt"; exit 1; }
  export PYTHONPATH="$PYTHONPATH:/tmp/site"
fi
{
  "$PY" -c "import torch, sys; print('python', sys.version.split()[0], 'torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none')"
  "$PY" -c "import slidemil, sksurv, lifelines, pydantic, sklearn; print('imports ok; sklearn', sklearn.__version__)"
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>/dev/null
  nproc
} > "$OUT/env.log" 2>&1
cat "$OUT/env.log" >> "$OUT/summary.txt"

# 0. the race's cohort (10 GB of h5 on the device) is written on the CPU while the GPU tests run
rm -rf /tmp/race /tmp/cv48
if want race; then
  "$PY" benchmarks/epoch_race.py --prepare --out /tmp/race "${RACE[@]}" > "$OUT/race_prepare.log" 2>&1 &
  PREPARE=$!
fi

# 1. the GPU tests (every model x task from the CLI, bf16 vs float32, packing, data path, strategies, demo)
want pytest && stage pytest_gpu "${PYTEST_LIMIT:-180}" env SLIDEMIL_GPU_TEST_DEVICE="$PT_DEVICE" "$PY" -m pytest tests/gpu -m gpu -q \
  -p no:cacheprovider -n "$WORKERS" --timeout 120 --tb=short -rfE --durations=15 "${PT_SELECT[@]}" ${PYTEST_ARGS:-}
want pytest && grep -hE "^(FAILED|ERROR)|passed|failed" "$OUT/pytest_gpu.log" | tail -40 >> "$OUT/summary.txt"

# 2. small bags: a 48-patient cohort (D 256, ~200 instances a bag), 3 folds of abmil at defaults, wall time;
#    PROFILE=1 adds the same run under cProfile (where the host's time goes: the GPU here waits on Python)
TRAIN48="-m slidemil train --features /tmp/cv48/features --labels /tmp/cv48/labels.csv --model abmil --folds 3 \
  --device $DEVICE --quiet"
PROFILED=""
if [ "${PROFILE:-0}" = 1 ]; then
  PROFILED="&& \"$PY\" -m cProfile -o /tmp/cv48.prof $TRAIN48 --out /tmp/cv48/profiled > /dev/null &&
  \"$PY\" -c \"import pstats; s = pstats.Stats('/tmp/cv48.prof'); s.sort_stats('tottime').print_stats(25); s.sort_stats('cumulative').print_stats(40)\""
fi
want small_cv && stage small_cv "$(( ${PROFILE:-0} == 1 ? 120 : 50 ))" bash -c "
  \"$PY\" -c \"from slidemil.data.synthetic import make_feature_cohort as m; m('/tmp/cv48', n_patients=48, dim=256, bag_size=(150, 250), seed=0)\" &&
  TIMEFORMAT='wall seconds (3 folds, evaluation included): %R' &&
  time \"$PY\" $TRAIN48 --out /tmp/cv48/run $PROFILED"
want small_cv && grep -h "wall seconds" "$OUT/small_cv.log" >> "$OUT/summary.txt"

# 3. seconds per training step of every model (bf16 on the GPU)
want models && stage models "${MODELS_LIMIT:-100}" "$PY" benchmarks/models.py --device "$DEVICE" --sizes "${SIZES[@]}" \
  --timeout 30 ${MODELS:+--models $MODELS}
want models && grep -h "^|" "$OUT/models.log" >> "$OUT/summary.txt"

# 4. the epoch race: the floor, slidemil (bags on the GPU), packed, and torchmil's Trainer, one cohort
want race && wait "$PREPARE" && stage race 150 "$PY" benchmarks/epoch_race.py --device "$DEVICE" --torchmil-site /tmp/site --out /tmp/race "${RACE[@]}"
want race && tail -12 "$OUT/race.log" >> "$OUT/summary.txt"
cat "$OUT/summary.txt"
