#!/usr/bin/env python3
"""PyTorch peer benchmark for `dvl bench` (see README.md next to this file).

Times the four costs `dvl bench` reports -- vision tower, block-causal prefill, one denoising
step, one commit step -- with stock transformers modules (Qwen2ForCausalLM and
Qwen2_5_VisionTransformerPretrainedModel) on CPU in bf16 with random weights, and optionally
runs the full block-diffusion decode (spec §8) with the real tiny checkpoint.

Every figure is printed as one JSON line on stdout; progress and checks go to stderr.
"""

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file
from transformers import DynamicCache, Qwen2Config, Qwen2ForCausalLM
from transformers.initialization import no_init_weights
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

BLOCK = 8  # bd3lm_block_size
MASK_ID = 151671  # spec §0 fact 4
EOS_ID = 151645
IMAGE_SIDE = 448  # one 448×448 image: 32×32 patches of 14 px -> 256 merged tokens

REPO = Path(__file__).resolve().parents[2]
DEFAULT_CHECKPOINT = REPO / "models" / "tiny-dvl"
DEFAULT_GOLDEN = Path("/work/shared/fixtures/tiny-dvl/a/golden/a_text_static8.json")

# Text decoder shapes: hidden, layers, q heads, kv heads, MLP intermediate, vocab, tied lm_head.
TEXT_SHAPES = {
    "tiny": dict(hidden=64, layers=3, heads=4, kv=2, inter=160, vocab=151936, tied=True),
    "0.5b": dict(hidden=896, layers=24, heads=14, kv=2, inter=4864, vocab=151936, tied=True),
    "3b": dict(hidden=2048, layers=36, heads=16, kv=2, inter=11008, vocab=151936, tied=True),
    "7b": dict(hidden=3584, layers=28, heads=28, kv=4, inter=18944, vocab=152064, tied=False),
}
# Qwen2.5-VL ViT shapes (the tiny checkpoint's tower for "tiny", the released tower otherwise).
VISION_SHAPES = {
    "tiny": dict(depth=4, hidden=64, heads=2, inter=96, fullatt=[1, 3]),
    "full": dict(depth=32, hidden=1280, heads=16, inter=3420, fullatt=[7, 15, 23, 31]),
}


# ---------------------------------------------------------------------------------------------
# Model construction
# ---------------------------------------------------------------------------------------------


def text_config(shape: str, rope_theta=1e6, rms_norm_eps=1e-6, max_positions=128000) -> Qwen2Config:
    """A Qwen2Config of `shape`: a TEXT_SHAPES name or a dict with the same keys."""
    s = TEXT_SHAPES[shape] if isinstance(shape, str) else shape
    return Qwen2Config(
        hidden_size=s["hidden"],
        num_hidden_layers=s["layers"],
        num_attention_heads=s["heads"],
        num_key_value_heads=s["kv"],
        intermediate_size=s["inter"],
        vocab_size=s["vocab"],
        tie_word_embeddings=s["tied"],
        rope_theta=rope_theta,
        rms_norm_eps=rms_norm_eps,
        max_position_embeddings=max_positions,
        attn_implementation="sdpa",
    )


def vision_config(shape: str, out_hidden: int) -> Qwen2_5_VLVisionConfig:
    s = VISION_SHAPES["tiny" if shape == "tiny" else "full"]
    return Qwen2_5_VLVisionConfig(
        depth=s["depth"],
        hidden_size=s["hidden"],
        num_heads=s["heads"],
        intermediate_size=s["inter"],
        out_hidden_size=out_hidden,
        fullatt_block_indexes=s["fullatt"],
        window_size=112,
        patch_size=14,
        spatial_merge_size=2,
        temporal_patch_size=2,
        in_channels=3,
        hidden_act="silu",
        attn_implementation="sdpa",
    )


def build(cls, config, dtype: torch.dtype):
    """Construct without any weight initialisation (no kaiming/normal pass over billions of
    values); the rotary inv_freq buffers are still computed by the modules' __init__."""
    with no_init_weights():
        model = cls._from_config(config, dtype=dtype)
    model.tie_weights()  # normally done by the skipped init_weights; no-op when untied
    return model.eval()


@torch.no_grad()
def fill_random(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Cheap random weights: every parameter is tiled from one pool of N(0, std) values
    (a memory copy, not an RNG pass), RMSNorm weights are set to 1. Speed does not depend on
    the values; this only keeps activations in a normal range. A pool length that is prime
    keeps matrix rows from repeating exactly."""
    pool_len = 1_000_003
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(pool_len, generator=gen) * std
    pools = {}  # one copy of the pool per parameter dtype
    for p in model.parameters():  # tied parameters are yielded once
        src = pools.setdefault(p.dtype, pool.to(p.dtype))
        flat = p.view(-1)
        rows, tail = divmod(flat.numel(), pool_len)
        flat[: rows * pool_len].view(rows, pool_len).copy_(src.expand(rows, pool_len))
        flat[rows * pool_len :].copy_(src[:tail])
    for m in model.modules():
        if "RMSNorm" in type(m).__name__:
            m.weight.fill_(1.0)


def load_text_decoder(path: Path, dtype: torch.dtype) -> Qwen2ForCausalLM:
    """A checkpoint directory's text decoder (its config.json, every *.safetensors shard) as
    a Qwen2ForCausalLM, lm_head tied to embed_tokens where the config says so."""
    c = json.loads((path / "config.json").read_text())
    shape = dict(hidden=c["hidden_size"], layers=c["num_hidden_layers"],
                 heads=c["num_attention_heads"], kv=c["num_key_value_heads"],
                 inter=c["intermediate_size"], vocab=c["vocab_size"],
                 tied=c["tie_word_embeddings"])
    config = text_config(shape, c["rope_theta"], c["rms_norm_eps"], c["max_position_embeddings"])
    model = build(Qwen2ForCausalLM, config, torch.bfloat16)
    state = {}
    for shard in sorted(path.glob("*.safetensors")):
        state.update(load_file(str(shard)))
    prefixes = ("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head.")
    text = {k: v for k, v in state.items() if k.startswith(prefixes)}
    missing, unexpected = model.load_state_dict(text, strict=False)
    if unexpected or missing != (["lm_head.weight"] if config.tie_word_embeddings else []):
        raise RuntimeError(f"checkpoint mismatch: missing={missing} unexpected={unexpected}")
    if config.tie_word_embeddings:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    return model.to(dtype)


# ---------------------------------------------------------------------------------------------
# Block-causal forward with the reference's cache semantics (spec §7.3)
# ---------------------------------------------------------------------------------------------


def block_causal_mask(start: int, rows: int, dtype: torch.dtype) -> torch.Tensor:
    """Additive 4-D mask [1, 1, rows, start+rows] for query positions start..start+rows against
    key positions 0..start+rows: 0 where key_block <= query_block, -inf elsewhere.

    transformers 5.x returns a 4-D attention_mask unchanged from create_causal_mask, and its
    sdpa path sets is_causal only when no mask is given, so this mask is the only masking."""
    q_block = torch.arange(start, start + rows) // BLOCK
    k_block = torch.arange(start + rows) // BLOCK
    visible = k_block[None, :] <= q_block[:, None]
    mask = torch.zeros(rows, start + rows, dtype=dtype)
    mask.masked_fill_(~visible, float("-inf"))
    return mask[None, None]


def forward_rows(model, emb, start, mask, cache, store: bool) -> torch.Tensor:
    """Run `emb` ([1, rows, hidden]) at positions start.. through the decoder (all layers and
    the final RMSNorm). The DynamicCache appends the rows' K/V during the forward; with
    store=False they are cropped off again so the cache holds exactly what it held before."""
    rows = emb.shape[1]
    positions = torch.arange(start, start + rows)[None]
    out = model.model(
        inputs_embeds=emb, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True
    )
    if not store:
        cache.crop(-rows)
    return out.last_hidden_state


def greedy(model, hidden: torch.Tensor):
    """lm_head over every row, fp32 cast, per-row argmax and its softmax probability
    (spec §8.6, temperature 0)."""
    logits = model.lm_head(hidden)[0].float()
    x0 = logits.argmax(-1)
    conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
    return x0, conf


def check_block_causal(model) -> None:
    """Prove the mask is block-causal, not causal: over two blocks, perturbing row 5 must
    change row 0 (same block, later row) while perturbing row 12 must leave block 0 intact."""
    emb = model.model.embed_tokens(torch.arange(1000, 1000 + 2 * BLOCK))[None]
    mask = block_causal_mask(0, 2 * BLOCK, emb.dtype)

    def run(x):
        return forward_rows(model, x, 0, mask, DynamicCache(config=model.config), True)[0]

    base = run(emb)
    bumped5, bumped12 = emb.clone(), emb.clone()
    bumped5[0, 5] += 1.0
    bumped12[0, 12] += 1.0
    out5, out12 = run(bumped5), run(bumped12)
    ok = (
        not torch.equal(out5[0], base[0])
        and torch.equal(out12[:BLOCK], base[:BLOCK])
        and not torch.equal(out12[BLOCK], base[BLOCK])
    )
    if not ok:
        raise RuntimeError("attention mask is not block-causal")
    log("mask check: block-causal (row 0 sees row 5; block 0 does not see block 1)")


# ---------------------------------------------------------------------------------------------
# Timing
# ---------------------------------------------------------------------------------------------


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def time_ms(fn, reps: int, warmup: int) -> float:
    """Median wall time of `fn` in ms over `reps` runs after `warmup` untimed runs
    (upper median for even counts, as dvl bench does)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(reps, 1)):
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    return sorted(times)[len(times) // 2]


def bench_vision(shape: str, out_hidden: int, reps: int, warmup: int, dtype: torch.dtype) -> float:
    vis = build(Qwen2_5_VisionTransformerPretrainedModel, vision_config(shape, out_hidden), dtype)
    fill_random(vis, seed=1)
    cfg = vis.config
    grid_side = IMAGE_SIDE // (cfg.patch_size * cfg.spatial_merge_size) * cfg.spatial_merge_size
    patches = grid_side * grid_side
    patch_dim = cfg.in_channels * cfg.temporal_patch_size * cfg.patch_size**2  # 1176
    # Same deterministic pixel pattern as dvl bench; fp32 like a preprocessor's output.
    i = torch.arange(patches * patch_dim, dtype=torch.int64)
    pixels = ((i * 7919 % 1000).float() / 500.0 - 1.0).view(patches, patch_dim)
    grid = torch.tensor([[1, grid_side, grid_side]])

    def run():
        # Patch embed (incl. fp32->bf16 cast), 2-D rope, window index/permute, all blocks,
        # merger (ln_q + MLP) and the un-permutation: the merged tokens the LLM would take.
        merged = vis(pixels, grid_thw=grid).pooler_output
        assert merged.shape == (patches // 4, out_hidden)

    return time_ms(run, reps, warmup)


def bench_text(model, prefix: int, reps: int, warmup: int) -> dict:
    embed = model.model.embed_tokens
    dtype = embed.weight.dtype
    # Inputs are prepared outside the timed regions, as in dvl bench: a synthetic prompt of
    # real embedding rows, and one block of MASK embeddings.
    ids = (1000 + (torch.arange(prefix) * 37) % 50_000)[None]
    prompt = embed(ids)
    block = embed(torch.full((1, BLOCK), MASK_ID))
    prefill_mask = block_causal_mask(0, prefix, dtype)
    block_mask = block_causal_mask(prefix, BLOCK, dtype)  # all zeros: block sees cache + itself
    cache = DynamicCache(config=model.config)

    def prefill():
        # `prefix` rows, block-causal, K/V stored into a fresh DynamicCache.
        nonlocal cache
        cache = DynamicCache(config=model.config)
        forward_rows(model, prompt, 0, prefill_mask, cache, store=True)

    def step():
        # 8 query rows vs cache + themselves, K/V not kept (crop), final norm, lm_head,
        # fp32 logits, per-row softmax + argmax.
        h = forward_rows(model, block, prefix, block_mask, cache, store=False)
        greedy(model, h)

    def commit():
        # 8 rows, K/V appended to the cache; the crop that resets the cache for the next
        # repetition is part of the measured time.
        forward_rows(model, block, prefix, block_mask, cache, store=True)
        cache.crop(-BLOCK)

    out = {"prefill_ms": time_ms(prefill, reps, warmup)}
    assert cache.get_seq_length() == prefix
    out["step_ms"] = time_ms(step, reps, warmup)
    assert cache.get_seq_length() == prefix
    out["commit_ms"] = time_ms(commit, reps, warmup)
    assert cache.get_seq_length() == prefix
    return out


# ---------------------------------------------------------------------------------------------
# Full block-diffusion decode (spec §8), greedy, low_confidence_static
# ---------------------------------------------------------------------------------------------


def transfer_schedule(block: int, steps: int) -> list:
    base, rem = divmod(block, steps)
    return [base + 1 if i < rem else base for i in range(steps + 1)]


def generate(model, prompt_ids: list, gen_length: int, steps: int, strategy: str = "static",
             threshold: float = 0.85, closest: list = None, prompt_rows=None):
    """Returns (x_ids[P:P+G], forward count). Prompt given as token ids, embedded here, or
    as `prompt_rows` ([P, hidden], e.g. with image features in place; `prompt_ids` then only
    needs P entries).
    `strategy`: "static" (low_confidence_static) or "dynamic" (low_confidence_dynamic with
    `threshold`), spec §8.7. `closest`, if a list, receives the relative confidence gap of
    every decision a rounding could flip: a top-n cut (last committed vs best left masked)
    and, for dynamic, each masked row's distance to the threshold."""
    embed = model.model.embed_tokens
    dtype = embed.weight.dtype
    P, G, B = len(prompt_ids), gen_length, BLOCK
    if B >= P + G:
        raise ValueError("full-diffusion layout (block >= prompt + gen) is not supported")
    nblocks = math.ceil((P + G) / B)
    total = nblocks * B
    prefill_blocks = P // B
    lpf = prefill_blocks * B
    mask_emb = embed(torch.tensor([MASK_ID]))[0]
    if prompt_rows is None:
        prompt_emb = embed(torch.tensor(prompt_ids))[None]
    else:
        prompt_emb = prompt_rows.to(dtype)[None]
        assert len(prompt_ids) == prompt_emb.shape[1], "one id per prompt row"
    x_ids = torch.full((total,), MASK_ID)
    x_ids[:P] = torch.tensor(prompt_ids)
    schedule = transfer_schedule(B, steps)
    cache = DynamicCache(config=model.config)
    forwards = 0

    if lpf > 0:  # §8.3: whole prompt blocks, block-causal, K/V stored
        forward_rows(model, prompt_emb[:, :lpf], 0, block_causal_mask(0, lpf, dtype), cache, True)
        forwards += 1

    for b in range(prefill_blocks, nblocks):  # §8.5
        s0, s1 = b * B, (b + 1) * B
        cur_emb = mask_emb.expand(B, -1).clone()
        tail = max(0, min(P, s1) - s0)  # prompt tokens sharing this block
        cur_emb[:tail] = prompt_emb[0, s0 : s0 + tail]
        cur_ids = x_ids[s0:s1].clone()
        mask = block_causal_mask(s0, B, dtype)
        for step in range(steps + 1):
            # The reference's embedding-equality mask test (so a committed MASK id stays masked).
            is_mask = ((cur_emb - mask_emb).abs() < 1e-5).all(-1)
            if not is_mask.any():
                forward_rows(model, cur_emb[None], s0, mask, cache, store=True)  # clean commit
                forwards += 1
                break
            h = forward_rows(model, cur_emb[None], s0, mask, cache, store=False)
            forwards += 1
            x0, p = greedy(model, h)
            conf = torch.where(is_mask, p, torch.tensor(float("-inf")))
            above = conf > threshold  # strict; never an unmasked row (conf -inf)
            if closest is not None and strategy == "dynamic":
                closest += ((conf[is_mask] - threshold).abs() / threshold).tolist()
            if strategy == "dynamic" and int(above.sum()) >= schedule[step]:
                pick = above.nonzero()[:, 0]  # all of them, possibly more than scheduled
            else:
                # Highest confidence first; stable sort puts the lowest index first on ties.
                k = min(schedule[step], int(is_mask.sum()))
                order = torch.sort(conf, descending=True, stable=True).indices
                pick = order[:k]
                if closest is not None and 0 < k < int(is_mask.sum()):
                    last, left = float(conf[order[k - 1]]), float(conf[order[k]])
                    closest.append((last - left) / last)
            if len(pick) > 0:
                cur_ids[pick] = x0[pick]
                cur_emb[pick] = embed(x0[pick])
        x_ids[s0:s1] = cur_ids
        if s1 > P and (x_ids[max(P, s0) : s1] == EOS_ID).any():  # §8.9, after the block
            break
    return x_ids[P : P + G].tolist(), forwards


# ---------------------------------------------------------------------------------------------
# CLI
# ---------------------------------------------------------------------------------------------


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", choices=list(TEXT_SHAPES), default="3b")
    ap.add_argument("--threads", type=int, default=2, help="torch.set_num_threads (default 2)")
    ap.add_argument("--prefix", type=int, default=288, help="cached prompt rows (rounded down to a multiple of 8)")
    ap.add_argument("--reps", type=int, default=5, help="timed repetitions per figure (median reported)")
    ap.add_argument("--warmup", type=int, default=1, help="untimed runs before each figure")
    ap.add_argument("--no-vision", action="store_true", help="skip the vision tower figure")
    ap.add_argument("--generate", action="store_true",
                    help="also time the full decode with the real tiny checkpoint (--shape tiny only)")
    ap.add_argument("--checkpoint", type=Path, default=DEFAULT_CHECKPOINT)
    ap.add_argument("--golden", type=Path, default=DEFAULT_GOLDEN,
                    help="golden JSON giving prompt_ids and the expected ids")
    ap.add_argument("--prompt-ids", type=str, default=None,
                    help="comma-separated prompt ids (overrides the golden prompt; no comparison)")
    ap.add_argument("--gen-length", type=int, default=32)
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--dtype", choices=["bf16", "f32"], default="bf16",
                    help="weights and activations of the shape benchmarks (f32: PyTorch's fastest CPU "
                         "path where the CPU has no bf16 arithmetic, e.g. AVX2 only)")
    ap.add_argument("--generate-dtype", choices=["bf16", "f32"], default="bf16")
    ap.add_argument("--json-summary", action="store_true", help="finally print one object with all figures")
    args = ap.parse_args()
    if args.generate and args.shape != "tiny":
        ap.error("--generate needs --shape tiny (the only real checkpoint)")
    prefix = args.prefix // BLOCK * BLOCK
    if prefix == 0:
        ap.error("--prefix must hold at least one block of 8")

    torch.set_num_threads(args.threads)
    common = {
        "peer": "pytorch",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "threads": torch.get_num_threads(),
        "shape": args.shape,
        "dtype": args.dtype,
    }
    figures = {}

    def emit(what: str, value: float, **extra) -> None:
        figures[what] = value
        print(json.dumps({**common, "what": what, "value": round(value, 3), **extra}), flush=True)

    with torch.inference_mode():
        t = time.perf_counter()
        dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
        model = build(Qwen2ForCausalLM, text_config(args.shape), dtype)
        fill_random(model)
        log(f"built {args.shape} text model in {time.perf_counter() - t:.1f} s")
        check_block_causal(model)

        if not args.no_vision:
            emit("vision_ms", bench_vision(args.shape, model.config.hidden_size, args.reps, args.warmup, dtype),
                 image=[IMAGE_SIDE, IMAGE_SIDE])
        for what, value in bench_text(model, prefix, args.reps, args.warmup).items():
            emit(what, value, prefix=prefix, block=BLOCK)
        del model

        if args.generate:
            dtype = torch.bfloat16 if args.generate_dtype == "bf16" else torch.float32
            tiny = load_text_decoder(args.checkpoint, dtype)
            expected = None
            if args.prompt_ids is not None:
                prompt = [int(x) for x in args.prompt_ids.split(",")]
            else:
                golden = json.loads(args.golden.read_text())
                prompt, expected = golden["prompt_ids"], golden["ids"]
            result = {}

            def decode():
                # Everything from prompt ids to output ids: embedding lookups, block-causal
                # prefill, every denoising/commit forward, sampling and the schedule.
                result["ids"], result["forwards"] = generate(tiny, prompt, args.gen_length, args.steps)

            ms = time_ms(decode, args.reps, args.warmup)
            emit("generate_ms", ms, dtype=args.generate_dtype, prompt_len=len(prompt),
                 gen_length=args.gen_length, steps=args.steps, forwards=result["forwards"],
                 ids=result["ids"], golden_match=None if expected is None else result["ids"] == expected)

    if args.json_summary:
        print(json.dumps({**common, "what": "summary", "prefix": prefix,
                          **{k: round(v, 3) for k, v in figures.items()}}), flush=True)


if __name__ == "__main__":
    main()
