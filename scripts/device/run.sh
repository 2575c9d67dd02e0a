#!/usr/bin/env bash
# The GPU kit's device-side command: install what the GPU image lacks from the kit folder (gather.py made it),
# install cso_dist, run the check. No network is used.
#
#   bash scripts/device/run.sh OUT_DIR [check.py options, e.g. --budget-s 540]
#
# All wheels go in with one pip call; if it fails (one unsupported wheel stops them all), each one again on its
# own, so one failure costs only what needs that package.
# CSO_KIT      the kit folder (default .kit: wheels/ with the wheels and the deepspeed sdist, data/esconv/)
# CSO_KIT_SITE where the packages go (default /tmp/cso-kit-site; put first on PYTHONPATH)
# PYTHON       the interpreter that holds torch (default python3)
# The kit's DeepSpeed builds its ops (just in time) into a folder of its own beside $SITE: an extension folder it
# shared with another DeepSpeed install would be rebuilt by each in turn, and under a process loading it.
set -u
OUT=${1:?usage: run.sh OUT_DIR [check.py options]}
shift
KIT=${CSO_KIT:-.kit}
SITE=${CSO_KIT_SITE:-/tmp/cso-kit-site}
PY=${PYTHON:-python3}
EXT="$SITE.torch-extensions"
rm -rf "$SITE" "$EXT"  # a fresh target: pip --target keeps an older copy of a package it finds there
mkdir -p "$OUT" "$SITE" "$EXT"
LOG="$OUT/install.log"
: >"$LOG"
steps=""
step() {  # step NAME pip-arguments...: one pip install into $SITE, timed; a failure is recorded, not fatal
  local name=$1 t0 rc
  shift
  t0=$(date +%s.%N)
  echo "== $name: pip install $*" >>"$LOG"
  "$PY" -m pip install --no-index --no-deps --no-compile --disable-pip-version-check --target "$SITE" "$@" >>"$LOG" 2>&1
  rc=$?
  steps="$steps\"$name\": {\"rc\": $rc, \"start\": $t0, \"end\": $(date +%s.%N)}, "
  echo "install $name: rc $rc" >&2
  return $rc
}
step wheels "$KIT"/wheels/*.whl || for w in "$KIT"/wheels/*.whl; do step "$(basename "$w")" "$w"; done
step deepspeed --no-build-isolation "$KIT"/wheels/deepspeed-*.tar.gz
step cso_dist --no-build-isolation .
INSTALL_JSON="$SITE.install.json"
echo "{${steps%, }}" >"$INSTALL_JSON"
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}" TORCH_EXTENSIONS_DIR="$EXT" CSO_DATA_DIR="$KIT/data" CSO_KIT_INSTALL="$INSTALL_JSON"
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
exec "$PY" scripts/device/check.py --out "$OUT" "$@"
