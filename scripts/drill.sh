#!/usr/bin/env bash
# Soak check (not in CI): kill -9 `slidemil preprocess` and `slidemil train` at random moments, rerun them
# to completion, and verify the final outputs equal those of an uninterrupted run.
#   scripts/drill.sh [ROUNDS]        (default 10; PY=path/to/python, default .venv/bin/python)
# Prints one line per round and a summary; exits 1 if any round's outputs differ.
set -euo pipefail
ROUNDS=${1:-10}
PY=${PY:-.venv/bin/python}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT
SLIDEMIL=("$PY" -m slidemil)
TRAIN_ARGS=(--labels "$WORK/c/labels.csv" --folds 3 --epochs 8 --bootstrap 50 --quiet)

"$PY" -c "from slidemil.slides.synthetic import make_slide_cohort; make_slide_cohort('$WORK/c', n_patients=8, slides_per_patient=(1, 1), size=(1536, 2048), seed=3)"
"${SLIDEMIL[@]}" preprocess --slides "$WORK/c/slides" --out "$WORK/ref_pre" --quiet > /dev/null
"${SLIDEMIL[@]}" train --features "$WORK/ref_pre/features_handcrafted" --out "$WORK/ref_run" "${TRAIN_ARGS[@]}" > /dev/null

# run CMD... in the background and kill -9 it after a random 3-8 s (start-up takes ~3 s, the work 4-6 s more) unless it finished
kill_at_random() {
  "$@" > /dev/null 2>&1 &
  local pid=$! delay
  delay=$(awk -v s="$RANDOM" 'BEGIN { srand(s); printf "%.2f", 3 + 5 * rand() }')
  sleep "$delay"
  if kill -9 "$pid" 2> /dev/null; then wait "$pid" 2> /dev/null || true; echo "killed after ${delay}s"; else wait "$pid" || true; echo "finished before ${delay}s"; fi
}

same=0
for round in $(seq 1 "$ROUNDS"); do
  rm -rf "$WORK/pre" "$WORK/run"
  pre=$(kill_at_random "${SLIDEMIL[@]}" preprocess --slides "$WORK/c/slides" --out "$WORK/pre" --quiet)
  "${SLIDEMIL[@]}" preprocess --slides "$WORK/c/slides" --out "$WORK/pre" --quiet > /dev/null
  tr=$(kill_at_random "${SLIDEMIL[@]}" train --features "$WORK/pre/features_handcrafted" --out "$WORK/run" "${TRAIN_ARGS[@]}")
  resume=(); [ -f "$WORK/run/config.yaml" ] && resume=(--resume)
  "${SLIDEMIL[@]}" train --features "$WORK/pre/features_handcrafted" --out "$WORK/run" "${TRAIN_ARGS[@]}" "${resume[@]}" > /dev/null
  verdict=$("$PY" - "$WORK" <<'PY'
import sys
from pathlib import Path
import h5py, numpy as np
w = Path(sys.argv[1])
ok = True
for ref in sorted((w / "ref_pre" / "features_handcrafted").glob("*.h5")):
    new = w / "pre" / "features_handcrafted" / ref.name
    with h5py.File(ref) as a, h5py.File(new) as b:
        ok &= all(np.array_equal(a[k][()], b[k][()]) for k in ("features", "coords"))
for name in ("splits.csv", "predictions.csv"):
    ok &= (w / "ref_run" / name).read_bytes() == (w / "run" / name).read_bytes()
leftovers = [p for p in list((w / "pre").rglob(".*.tmp-*")) + list((w / "run").rglob(".*.tmp-*"))]
print("identical" if ok and not leftovers else f"DIFFERENT (temporary files left: {len(leftovers)})")
PY
)
  [ "$verdict" = identical ] && same=$((same + 1))
  echo "round $round: preprocess $pre; train $tr; final outputs $verdict"
done
echo "$same/$ROUNDS rounds identical to the uninterrupted run"
[ "$same" -eq "$ROUNDS" ]
