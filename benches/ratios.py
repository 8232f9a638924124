#!/usr/bin/env python3
"""Per-round ratios from `benches/alternate.sh` output (JSON lines on stdin or in files).

    benches/alternate.sh 0.5b 3b | tee run.jsonl | python3 benches/ratios.py
    python3 benches/ratios.py run.jsonl

For each shape and figure (vision, prefill, denoise step, commit step) prints dvl's and the
peer's time in every round and dvl ÷ peer per round (below 1: dvl faster), then the median
ratio, and each round's step ÷ roofline (LM weight bytes ÷ the read bandwidth dvl bench
measured in that round). A round's two engines ran back to back, so on a machine whose
speed drifts the per-round ratio is the figure to read, not the ratio of medians.
Standard library only; never run by CI.
"""
import fileinput
import json
import statistics
import sys

FIGURES = ["vision_ms", "prefill_ms", "step_ms", "commit_ms"]


def read_rounds(lines):
    """{(shape, round): {"dvl": obj, "peer": obj}} from alternate.sh's JSON lines."""
    rounds = {}
    for line in lines:
        line = line.strip()
        if not line.startswith("{"):
            continue
        obj = json.loads(line)
        if obj.get("engine") == "dvl":
            side = "dvl"
        elif obj.get("peer") and obj.get("what") == "summary":
            side = "peer"
        else:
            continue
        key = (obj.get("shape"), obj.get("round", 1))
        rounds.setdefault(key, {})[side] = obj
    return rounds


def main():
    rounds = read_rounds(fileinput.input(sys.argv[1:]))
    shapes = sorted({shape for shape, _ in rounds}, key=str)
    if not shapes:
        sys.exit("ratios.py: no alternate.sh JSON lines in the input")
    for shape in shapes:
        keys = sorted(r for s, r in rounds if s == shape)
        pairs = [rounds[(shape, r)] for r in keys]
        print(f"{shape} (prefix {pairs[0].get('dvl', pairs[0].get('peer', {})).get('prefix')})")
        for fig in FIGURES:
            cells, ratios = [], []
            for pair in pairs:
                ours = pair.get("dvl", {}).get(fig)
                theirs = pair.get("peer", {}).get(fig)
                if ours is None or theirs is None:
                    continue
                cells.append(f"{ours:,.1f} / {theirs:,.1f}")
                ratios.append(ours / theirs)
            if not ratios:
                continue
            per_round = ", ".join(f"{r:.2f}" for r in ratios)
            print(
                f"  {fig[:-3]:8} dvl / peer ms: {'; '.join(cells)}"
                f"  ratio per round {per_round}  median {statistics.median(ratios):.2f}"
            )
        roof = [
            p["dvl"]["step_ms"] / p["dvl"]["roofline_step_ms"]
            for p in pairs
            if "dvl" in p and p["dvl"].get("roofline_step_ms")
        ]
        if roof:
            gbps = [p["dvl"]["read_gbps"] for p in pairs if "dvl" in p]
            print(
                f"  step / roofline per round: {', '.join(f'{r:.2f}' for r in roof)}"
                f"  (read {min(gbps):.1f}-{max(gbps):.1f} GB/s)"
            )


if __name__ == "__main__":
    main()
