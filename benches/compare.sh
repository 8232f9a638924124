#!/usr/bin/env bash
# One run, both engines: dvl bench (f32 kernels, --bf16, AVX2) and the PyTorch peer on the same
# shapes, schedule and thread count, then the tiny model's end-to-end generation both ways.
# Prints JSON lines (dvl's and the peer's) to stdout; never run by CI.
#
#   benches/compare.sh [SHAPES...]        default: tiny 0.5b 3b
# Environment: PEER_PY (default /work/peer-venv/bin/python, see benches/peer/README.md),
#   THREADS (2), PREFIX (288), REPS (5), SYNTH_DIR (/tmp/dvl-synth).
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_PY=${PEER_PY:-/work/peer-venv/bin/python}
THREADS=${THREADS:-2}
PREFIX=${PREFIX:-288}
REPS=${REPS:-5}
SYNTH_DIR=${SYNTH_DIR:-/tmp/dvl-synth}
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(tiny 0.5b 3b)

cargo build --release -p dvl >&2
DVL=target/release/dvl

for shape in "${shapes[@]}"; do
  if [ "$shape" = tiny ]; then
    model=models/tiny-dvl
  else
    model="$SYNTH_DIR/$shape"
    [ -f "$model/config.json" ] || $DVL synth --shape "$shape" --out "$model" >&2
  fi
  # Default f32 (on AMX tiles as three bf16 terms where AMX exists), bf16 matmul inputs
  # (AMX), the AVX-512 FMA kernels alone (DVL_AMX_F32=0; steps only), and the AVX2 path
  # (steps only).
  for run in "|" "|--bf16" "DVL_AMX_F32=0|--no-vision" "|--isa avx2 --no-vision"; do
    envs=${run%%|*} opts=${run#*|}
    # shellcheck disable=SC2086
    env $envs $DVL bench --model "$model" --threads "$THREADS" --prefix "$PREFIX" --reps "$REPS" \
      $opts --json | sed "s/^{/{\"engine\":\"dvl\",\"shape\":\"$shape\",/"
  done
  if [ -x "$PEER_PY" ]; then
    "$PEER_PY" benches/peer/peer.py --shape "$shape" --threads "$THREADS" --prefix "$PREFIX" \
      --reps "$REPS" --json-summary | tail -n 1
  fi
done

# End to end on the shipped tiny model, the golden a_text_static8 schedule (G 32, 8 steps).
prompt="What is two plus two?"
for i in 1 2 3; do
  $DVL generate --model models/tiny-dvl --prompt "$prompt" --gen-length 32 --steps 8 \
    --threads "$THREADS" --json \
    | python3 -c 'import json,sys; d=json.load(sys.stdin); print(json.dumps({"engine":"dvl","shape":"tiny","what":"generate_ms","value":d["timings"]["total_ms"],"forward_calls":d["forward_calls"]}))'
done
if [ -x "$PEER_PY" ]; then
  "$PEER_PY" benches/peer/peer.py --shape tiny --threads "$THREADS" --no-vision --reps 1 --generate \
    | grep generate_ms
fi
