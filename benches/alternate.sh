#!/usr/bin/env bash
# dvl bench and the PyTorch peer alternately, ROUNDS times per shape, so that both see the
# same machine state (a shared VM's speed drifts by tens of percent within minutes; one
# engine after the other can land on different sides of a drift). Prints JSON lines on
# stdout, and at the end the per-round ratios (benches/ratios.py) on stderr. Never run by CI.
#
#   benches/alternate.sh [SHAPES...]      default: 0.5b 3b
# Environment: PEER_PY (default /work/peer-venv/bin/python), THREADS (2), PREFIX (288),
#   REPS (3), ROUNDS (3), SYNTH_DIR (/tmp/dvl-synth), DVL_OPTS (--bf16), PEER_OPTS ("").
set -euo pipefail
cd "$(dirname "$0")/.."
PEER_PY=${PEER_PY:-/work/peer-venv/bin/python}
THREADS=${THREADS:-2} PREFIX=${PREFIX:-288} REPS=${REPS:-3} ROUNDS=${ROUNDS:-3}
SYNTH_DIR=${SYNTH_DIR:-/tmp/dvl-synth} DVL_OPTS=${DVL_OPTS---bf16} PEER_OPTS=${PEER_OPTS:-}
shapes=("$@")
[ ${#shapes[@]} -gt 0 ] || shapes=(0.5b 3b)
cargo build --release -p dvl >&2
DVL=target/release/dvl
lines=$(mktemp)
trap 'rm -f "$lines"' EXIT
for shape in "${shapes[@]}"; do
  model="$SYNTH_DIR/$shape"
  [ -f "$model/config.json" ] || $DVL synth --shape "$shape" --out "$model" >&2
  for round in $(seq "$ROUNDS"); do
    # shellcheck disable=SC2086
    $DVL bench --model "$model" --threads "$THREADS" --prefix "$PREFIX" --reps "$REPS" \
      $DVL_OPTS --json | sed "s/^{/{\"engine\":\"dvl\",\"shape\":\"$shape\",\"round\":$round,/"
    # shellcheck disable=SC2086
    "$PEER_PY" benches/peer/peer.py --shape "$shape" --threads "$THREADS" --prefix "$PREFIX" \
      --reps "$REPS" $PEER_OPTS --json-summary 2>/dev/null | tail -n 1 \
      | sed "s/^{/{\"round\":$round,/"
  done
done | tee "$lines"
python3 benches/ratios.py "$lines" >&2
