#!/usr/bin/env bash
# Side-by-side with `imitation` 1.0.1's PreferenceComparisons (pinned to gymnasium 0.29 / SB3 2.2.1, which conflict
# with mmalign's gymnasium 1.x / SB3 2.9): build its own venv, then run scripts/compare_imitation.py in both.
#
#   bash scripts/compare_imitation.sh [STEPS] [LABELS] [SEEDS...]
#
# MMALIGN_SET="key=value ..." overrides fields of mmalign's PebbleConfig (anything but task, labels, steps, seed,
# teacher, learner), TAG names that configuration in result files and tables; SKIP_IMITATION=1 runs mmalign only
# (e.g. to add a configuration next to imitation results already in OUT).
#
# Seeds follow the robotics seed protocol (docs/benchmarks/robotics_protocol.md): DEV_SEEDS (default 0-9) are the
# seeds settings were chosen on. SEEDS all inside DEV_SEEDS = a development run; SEEDS disjoint from them = a reported
# table (at least 5 seeds, or SIZED_DOWN="<why>"); a mix is refused before any work.
#
# Seeds run one after the other, imitation then mmalign for each seed (alternating, so both see the same machine
# load over time); both are pinned to one torch thread so CPU and wall seconds are comparable.
#
# The imitation venv (default /tmp/mmalign-imitation-venv, override with IMITATION_VENV) reuses torch and numpy of
# mmalign's venv through a .pth file placed *after* its own site-packages, so only the pinned pure-Python stack
# (imitation, gymnasium 0.29, SB3 2.2.1, seals, sacred, mujoco 2.3) is downloaded from PyPI, not a second torch.
set -euo pipefail
STEPS=${1:-20000}
LABELS=${2:-400}
if [ $# -ge 3 ]; then SEEDS=("${@:3}"); else SEEDS=(0 1 2); fi
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
MAIN_PY="${MAIN_PY:-$ROOT/.venv/bin/python}"
VENV="${IMITATION_VENV:-/tmp/mmalign-imitation-venv}"
OUT="${OUT:-$ROOT/runs/compare_imitation}"
THREADS="${THREADS:-1}"  # torch threads of both sides (0 = torch's default)
TAG="${TAG:-}"
SKIP_IMITATION="${SKIP_IMITATION:-0}"
SETS=()
for KV in ${MMALIGN_SET:-}; do SETS+=(--set "$KV"); done
DEV=(${DEV_SEEDS:-0 1 2 3 4 5 6 7 8 9})
PLAN=(--dev-seeds "${SEEDS[@]}")
for S in "${SEEDS[@]}"; do
  if [[ " ${DEV[*]} " != *" $S "* ]]; then
    PLAN=(--dev-seeds "${DEV[@]}" --report-seeds "${SEEDS[@]}")
    [ -n "${SIZED_DOWN:-}" ] && PLAN+=(--sized-down "$SIZED_DOWN")
    break
  fi
done
"$MAIN_PY" "$ROOT/scripts/compare_imitation.py" --check-seeds "${PLAN[@]}"
mkdir -p "$OUT"
BASE_PY="$("$MAIN_PY" -c 'import sys; print(sys.base_prefix)')/bin/python3"
if [ ! -x "$VENV/bin/python" ]; then
  "$BASE_PY" -m venv "$VENV"
  SITE="$("$VENV/bin/python" -c 'import site; print(site.getsitepackages()[0])')"
  MAIN_SITE="$("$MAIN_PY" -c 'import site; print(site.getsitepackages()[0])')"
  # zz_ sorts last: the venv's own packages shadow mmalign's gymnasium/SB3; torch/numpy come from mmalign's venv.
  echo "$MAIN_SITE" > "$SITE/zz_mmalign_main.pth"
  "$VENV/bin/pip" install -q "imitation==1.0.1" "gymnasium[mujoco]~=0.29.1" "stable-baselines3~=2.2.1" \
      "seals~=0.2.1" "mujoco>=2.3.3,<3" 2>&1 | tail -n 5
fi
"$VENV/bin/python" -c "import imitation, gymnasium, stable_baselines3 as sb3; print('imitation', imitation.__version__, 'gymnasium', gymnasium.__version__, 'sb3', sb3.__version__)"
for SEED in "${SEEDS[@]}"; do
  if [ "$SKIP_IMITATION" != 1 ]; then
    "$VENV/bin/python" "$ROOT/scripts/compare_imitation.py" --impl imitation --steps "$STEPS" --labels "$LABELS" \
        --seed "$SEED" --threads "$THREADS" --out "$OUT"
  fi
  "$MAIN_PY" "$ROOT/scripts/compare_imitation.py" --impl mmalign --steps "$STEPS" --labels "$LABELS" --seed "$SEED" \
      --threads "$THREADS" --out "$OUT" --tag "$TAG" ${SETS[@]+"${SETS[@]}"}
done
"$MAIN_PY" "$ROOT/scripts/compare_imitation.py" --summarize --out "$OUT" "${PLAN[@]}"
