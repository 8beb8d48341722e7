#!/usr/bin/env bash
# Run HERE (a machine that reaches PyPI), before scripts/gpu_check.sh: downloads into .whl/ (git-ignored) the
# wheels the GPU machine's image lacks, for its Python 3.12 on x86-64. Its image already has torch, triton,
# numpy, pandas, scikit-learn, scipy, h5py, timm, typer, rich, PyYAML, matplotlib, tifffile, safetensors,
# pytest, pytest-xdist, pytest-timeout, filelock, torchmetrics and einops (device tool, KINDS.md).
#   bash scripts/gpu_wheels.sh            then carry ".whl" in the device run (scripts/gpu_check.sh says how)
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
DEST=.whl
mkdir -p "$DEST"
PLAT=(--platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64
      --platform manylinux2014_x86_64 --platform manylinux1_x86_64 --platform manylinux_2_24_x86_64
      --platform manylinux_2_31_x86_64 --platform manylinux_2_34_x86_64 --platform manylinux_2_35_x86_64)
BINARY=(
  # the versions `make install` resolved on 2026-12-04
  pydantic==2.14.4 pydantic-core==2.50.5 annotated-types==0.8.0 typing-inspection==0.4.5    # configs
  scikit-survival==0.28.0 ecos==2.0.14 osqp==1.1.3 numexpr==2.14.2                          # survival metrics
  scikit-learn==1.9.1                      # scikit-survival 0.28 needs >= 1.9, which the image may not have
  lifelines==0.30.3 autograd==1.9.1                                                         # Kaplan-Meier
  openslide-python==1.4.7 openslide-bin==4.0.1.2 imagecodecs==2026.3.6                      # slide readers
  # torchmil, for the epoch race against it (never a slidemil dependency); tensordict 0.12.4 matches torch 2.11
  torchmil==1.0.2 tensordict==0.12.4 pyvers==0.2.3 orjson==3.13.0 importlib-metadata==10.2.0
)
for spec in "${BINARY[@]}"; do
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
      "${PLAT[@]}" -d "$DEST" "$spec"
done
# autograd-gamma (lifelines) is published as a source archive only: build its (pure Python) wheel here
"$PY" -m pip wheel -q --no-deps -w "$DEST" autograd-gamma==0.5.0
ls "$DEST" | sed 's/^/  /'
du -sh "$DEST"
