#!/usr/bin/env python3
"""Differential check of dvl against the reference stack on inputs the fixtures do not hold.

Run by hand, not in CI (needs torch + transformers; see README.md beside this file):

    python tools/reference/qwen_vl_diff.py [--model DIR] [--text 24] [--vision 12] [--modes]
        [--seed 0] [--dvl target/release/dvl]

The golden fixtures cover a few prompts and images; hidden cases use other seeds, shapes and
images. This runs `dvl generate` on random ones and compares, for a Qwen2.5-VL-layout
checkpoint (`diffusionvl_qwenvl`, e.g. the shipped models/tiny-dvl or the fixtures' b):

* --text N: N random text-only prompts (all prompt lengths mod 8), random generation lengths
  and steps per block, static or dynamic strategy (thresholds around the tiny models'
  near-uniform confidences, ~1/vocabulary, and the default 0.85). Reference: the spec §8.5 decode loop of
  benches/peer/peer.py on transformers' Qwen2ForCausalLM in float64 with an explicit
  block-causal mask, with the deviation spec §8.11 allows and dvl makes: the MASK id is never
  chosen (its logit still counts in the softmax). Without it the reference can commit MASK,
  re-predict it and leave a hole in its cache (§8.12). Output ids and forward passes must be
  equal, unless one of the reference's decisions (a top-n cut, a threshold) was within 1e-5
  relative: below float32 resolution, reported as inconclusive. The probes of `--dump`
  (`prefill_last_block_hidden`, `first_step_hidden`) must be within relative L2 1e-5 (or,
  for a badly conditioned random shape, twice what stock transformers gets in float32).
* --image-prompts N: the same with one or two random images in each prompt (their features
  from transformers' tower in float64 in place of the image tags), `vision_features` too.
* --vision N: N random images of random sizes and aspect ratios (PNG). `pixel_values` must
  equal transformers' Qwen2VLImageProcessor's exactly, and `vision_features` must be within
  relative L2 1e-5 of Qwen2_5_VisionTransformerPretrainedModel (+ merger) in float64.
* --modes: one image per PIL mode (L, LA, P, P with tRNS, RGBA, I;16, 1, grey / RGB / CMYK
  JPEG): `pixel_values` exactly equal.
* --random-shape SEED: instead of --model, a tiny random checkpoint of a shape drawn from SEED
  (heads, GQA ratio, head dims, widths, layers, ViT depth, full-attention blocks, window size,
  tied or separate lm_head), written in the published layout to a temporary directory.

Pillow must be <= 12.1 (later releases run the vertical bicubic pass first for tall images
that shrink a lot; dvl follows <= 12.1, as the reference models were evaluated with).
Exit status 1 when any comparison fails.
"""

import argparse
import glob
import json
import random
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import PIL
import torch
from PIL import Image
from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer
from transformers import Qwen2ForCausalLM, Qwen2VLImageProcessor
from transformers.models.qwen2_5_vl.configuration_qwen2_5_vl import Qwen2_5_VLVisionConfig
from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import (
    Qwen2_5_VisionTransformerPretrainedModel,
)

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO / "benches" / "peer"))
import peer  # noqa: E402  (the reference decode loop and model construction)

SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
# A decision this close (relative confidence gap) is below float32 resolution of the
# softmax: the reference's own float32 and float64 runs can take either side.
TIE = 1e-5
WORDS = "the cat sat on a mat while two dogs ran far away into blue hills and one bird sang".split()


def random_checkpoint(out: Path, seed: int) -> str:
    """A tiny checkpoint in the published layout (fixtures README §2.2) of a random shape, with
    the fixtures' config.json, tokenizer and preprocessor config otherwise. Returns the shape."""
    rng = random.Random(seed)
    g = torch.Generator().manual_seed(seed)

    def rnd(*shape, std=0.2):
        return (torch.randn(*shape, generator=g) * std).to(torch.bfloat16)

    def norm(n):
        return (1 + torch.randn(n, generator=g) * 0.1).to(torch.bfloat16)

    heads, hd = rng.choice([1, 2, 3, 4, 6]), rng.choice([8, 10, 12, 16, 18, 20])
    kv = rng.choice([d for d in range(1, heads + 1) if heads % d == 0])
    H, inter, layers, tied = heads * hd, rng.randint(16, 200), rng.randint(1, 3), rng.random() < 0.5
    vheads, depth = rng.randint(1, 5), rng.randint(1, 5)
    C, CI = vheads * rng.choice([8, 12, 16]), rng.randint(16, 160)
    fullatt = sorted(rng.sample(range(depth), rng.randint(0, depth)))
    window = rng.choice([56, 112, 224])
    vocab = 151936
    t = {"model.embed_tokens.weight": rnd(vocab, H, std=0.5), "model.norm.weight": norm(H)}
    if not tied:
        t["lm_head.weight"] = rnd(vocab, H, std=0.5)
    for i in range(layers):
        p = f"model.layers.{i}."
        t[p + "input_layernorm.weight"], t[p + "post_attention_layernorm.weight"] = norm(H), norm(H)
        for name, rows in (("q", heads * hd), ("k", kv * hd), ("v", kv * hd)):
            t[p + f"self_attn.{name}_proj.weight"] = rnd(rows, H, std=0.3)
            t[p + f"self_attn.{name}_proj.bias"] = rnd(rows)
        t[p + "self_attn.o_proj.weight"] = rnd(H, heads * hd)
        t[p + "mlp.gate_proj.weight"], t[p + "mlp.up_proj.weight"] = rnd(inter, H), rnd(inter, H)
        t[p + "mlp.down_proj.weight"] = rnd(H, inter)
    v = "model.vision_tower.vision_tower."
    t[v + "patch_embed.proj.weight"] = rnd(C, 3, 2, 14, 14, std=0.05)
    for b in range(depth):
        p = f"{v}blocks.{b}."
        t[p + "norm1.weight"], t[p + "norm2.weight"] = norm(C), norm(C)
        t[p + "attn.qkv.weight"], t[p + "attn.qkv.bias"] = rnd(3 * C, C), rnd(3 * C)
        t[p + "attn.proj.weight"], t[p + "attn.proj.bias"] = rnd(C, C), rnd(C)
        for name, shape in (("gate_proj", (CI, C)), ("up_proj", (CI, C)), ("down_proj", (C, CI))):
            t[p + f"mlp.{name}.weight"], t[p + f"mlp.{name}.bias"] = rnd(*shape), rnd(shape[0])
    m = "model.mm_projector.merger."
    t[m + "ln_q.weight"] = norm(C)
    t[m + "mlp.0.weight"], t[m + "mlp.0.bias"] = rnd(4 * C, 4 * C, std=0.1), rnd(4 * C)
    t[m + "mlp.2.weight"], t[m + "mlp.2.bias"] = rnd(H, 4 * C, std=0.1), rnd(H)
    out.mkdir(parents=True, exist_ok=True)
    save_file(t, str(out / "model.safetensors"), metadata={"format": "pt"})
    base = REPO / "models" / "tiny-dvl"
    cfg = json.loads((base / "config.json").read_text())
    half = hd // 2
    text = dict(hidden_size=H, intermediate_size=inter, num_hidden_layers=layers,
                num_attention_heads=heads, num_key_value_heads=kv, tie_word_embeddings=tied,
                max_window_layers=layers)
    for d in (cfg, cfg["text_config"]):
        d.update(text)
        d["rope_scaling"]["mrope_section"] = [half - 2 * (half // 3), half // 3, half // 3]
    cfg["vision_config"].update(depth=depth, hidden_size=C, intermediate_size=CI, num_heads=vheads,
                                out_hidden_size=H, fullatt_block_indexes=fullatt,
                                window_size=window)
    cfg["mm_hidden_size"] = C
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for f in ("tokenizer.json", "preprocessor_config.json"):
        shutil.copyfile(base / f, out / f)
    return (f"text {H} = {heads} heads x {hd} ({kv} kv), intermediate {inter}, {layers} layers, "
            f"{'tied' if tied else 'separate'} lm_head; ViT {C} = {vheads} heads, intermediate "
            f"{CI}, depth {depth}, full attention {fullatt}, window {window}")


def run_dvl(args, model: Path, extra: list) -> dict:
    cmd = [str(args.dvl), "generate", "--model", str(model), "--threads", "2", *extra]
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"dvl failed: {' '.join(cmd)}\n{r.stderr}")
    return json.loads(r.stdout) if "--json" in extra else {}


def state_dict(model: Path) -> dict:
    tensors = {}
    for f in sorted(glob.glob(str(model / "*.safetensors"))):
        tensors.update(load_file(f))
    return tensors


# ---- text: decode ids against the reference loop ------------------------------------------


def rel_l2(got, want) -> float:
    got, want = got.double(), want.double()
    return float((got - want).norm() / want.norm()) if got.shape == want.shape else float("inf")


def exact_float64(lm: Qwen2ForCausalLM, rope_theta: float) -> Qwen2ForCausalLM:
    """transformers computes RoPE angles (from float32 inverse frequencies) and RMSNorm in
    float32 whatever the model's dtype: ~1e-5 relative off at a few hundred positions. The
    golden data computes both in float64 (dvl its angles too); so does this, as
    siglip_golden.py does."""
    rotary = lm.model.rotary_emb
    head_dim = lm.config.hidden_size // lm.config.num_attention_heads
    inv_freq = rope_theta ** (-torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)

    def rope64(x, position_ids):
        angles = position_ids[..., None].to(torch.float64) * inv_freq
        emb = torch.cat((angles, angles), dim=-1)
        return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

    rotary.forward = rope64
    for module in lm.modules():
        if type(module).__name__ == "Qwen2RMSNorm":
            def rms64(x, module=module):
                y = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + module.variance_epsilon)
                return module.weight * y

            module.forward = rms64
    return lm


def check_decode(args, model: Path, tensors: dict, rng: random.Random, tmp: Path, cases: int,
                 with_images: bool) -> tuple:
    """`cases` random prompts decoded by dvl and by the reference loop; with images, one or
    two random images per prompt, their features from transformers' tower in the prompt."""
    rope_theta = json.loads((model / "config.json").read_text())["rope_theta"]
    ref_model = exact_float64(peer.load_text_decoder(model, torch.float64), rope_theta)
    tok = Tokenizer.from_file(str(model / "tokenizer.json"))
    stock32 = []

    def ref32():
        if not stock32:
            stock32.append(peer.load_text_decoder(model, torch.float32))
        return stock32[0]

    if with_images:
        vis, processor = vision_model(model, tensors)
        nrng = np.random.default_rng(rng.randrange(1 << 30))
    greedy, forward_rows = peer.greedy, peer.forward_rows
    # The reference's probes (fixtures README §5): the final-norm rows of the prefill's last
    # block and of the first denoising forward.
    probes = {}

    def recording_forward_rows(m, emb, start, mask, cache, store):
        hidden = forward_rows(m, emb, start, mask, cache, store)
        if store and start == 0:
            probes.setdefault("prefill_last_block_hidden", hidden[0, -peer.BLOCK:])
        elif not store:
            probes.setdefault("first_step_hidden", hidden[0])
        return hidden

    def greedy_never_mask(m, hidden):
        # peer.greedy with the MASK id out of the argmax but in the softmax (spec §8.11).
        logits = m.lm_head(hidden)[0].float()
        allowed = logits.clone()
        allowed[:, peer.MASK_ID] = float("-inf")
        x0 = allowed.argmax(-1)
        conf = torch.softmax(logits, -1).gather(-1, x0[:, None])[:, 0]
        return x0, conf

    peer.greedy, peer.forward_rows = greedy_never_mask, recording_forward_rows
    passed = failed = ties = 0
    for case in range(cases):
        question = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        gen, steps = rng.choice([1, 5, 8, 13, 16, 24, 40]), rng.choice([1, 2, 3, 4, 5, 7, 8, 9])
        strategy = rng.choice(["static", "dynamic"])
        threshold = rng.choice([0.85, 3e-5, 1e-5, 8e-6, 7e-6])
        images = [random_image(rng, nrng, tmp / f"prompt{case}_{i}.png")
                  for i in range(rng.choice([1, 1, 2]) if with_images else 0)]
        tags = " ".join(["<image>"] * len(images)) + "\n" if images else ""
        prompt = (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{tags}{question}"
                  "<|im_end|>\n<|im_start|>assistant\n")
        # Spec §2.3: chunks between <image> tags tokenised on their own.
        chunks = [tok.encode(c, add_special_tokens=False).ids for c in prompt.split("<image>")]
        ids, rows, features = [], [], []
        embed = ref_model.model.embed_tokens.weight
        for i, chunk in enumerate(chunks):
            ids += chunk
            rows.append(embed[chunk])
            if i < len(images):
                batch = processor(images=[Image.open(images[i])], return_tensors="pt")
                with torch.inference_mode():
                    feats = vis(batch["pixel_values"].double(),
                                grid_thw=batch["image_grid_thw"]).pooler_output
                ids += [-200] * feats.shape[0]
                rows.append(feats)
                features.append(feats)
        image_args = [a for path in images for a in ("--image", str(path))]
        got = run_dvl(args, model, ["--prompt", question, *image_args, "--gen-length", str(gen),
                                    "--steps", str(steps), "--strategy", strategy,
                                    "--threshold", str(threshold), "--json",
                                    "--dump", str(tmp / "text")])
        dumped = load_file(str(tmp / "text" / "dump.safetensors"))
        if got["prompt_rows"] != len(ids):
            raise RuntimeError(f"prompt rows: dvl {got['prompt_rows']}, here {len(ids)}")
        what = f"P={len(ids)} (mod 8: {len(ids) % 8}) G={gen} steps={steps} {strategy}"
        if strategy == "dynamic":
            what += f" {threshold:g}"
        closest = []
        probes.clear()
        with torch.inference_mode():
            want, forwards = peer.generate(ref_model, ids, gen, steps, strategy, threshold,
                                           closest, torch.cat(rows) if images else None)
        gap = min(closest, default=1.0)
        if images:
            what += f", {len(images)} image(s)"
            probes["vision_features"] = torch.cat(features)
        errors = {k: rel_l2(dumped[k], v) for k, v in probes.items()}
        worst = max(errors.values(), default=0.0)
        tolerance = 1e-5
        if worst > tolerance:
            # A badly conditioned random shape can amplify float32 rounding past 1e-5: then
            # hold dvl to twice what stock transformers in float32 gets on the same input.
            exact = dict(probes)
            probes.clear()
            with torch.inference_mode():
                peer.generate(ref32(), ids, gen, steps, strategy, threshold, None,
                              torch.cat(rows).float() if images else None)
            tolerance = max(tolerance, 2 * max(rel_l2(probes[k], exact[k]) for k in probes))
            probes.clear()
            probes.update(exact)
            what += f" (probes within {worst:.1e}, float32 transformers {tolerance / 2:.1e})"
        else:
            what += f" (probes within {worst:.1e})"
        if worst > tolerance or set(probes) - set(dumped):
            failed += 1
            print(f"FAIL  decode {what}: probe relative L2 {errors} ({question!r})")
        elif want == got["ids"] and forwards == got["forward_passes"]:
            passed += 1
            print(f"ok    decode {what}: {forwards} forwards, eos {got['stopped_at_eos']}")
        elif gap < TIE:
            ties += 1
            print(f"tie   decode {what}: differs, but a decision of the reference was within "
                  f"{gap:.1e} relative (its own float32 and float64 softmax can disagree)")
        else:
            failed += 1
            print(f"FAIL  decode {what}: ids {got['ids']} vs {want}, forwards "
                  f"{got['forward_passes']} vs {forwards}, closest decision {gap:.1e} "
                  f"({question!r})")
    peer.greedy, peer.forward_rows = greedy, forward_rows
    return passed, failed, ties


# ---- vision: pixel_values and features against transformers -------------------------------


def vision_model(model: Path, tensors: dict):
    c = json.loads((model / "config.json").read_text())
    vc = c["vision_config"]
    cfg = Qwen2_5_VLVisionConfig(
        depth=vc["depth"], hidden_size=vc["hidden_size"], num_heads=vc["num_heads"],
        intermediate_size=vc["intermediate_size"], out_hidden_size=vc["out_hidden_size"],
        fullatt_block_indexes=vc["fullatt_block_indexes"], window_size=vc["window_size"],
        patch_size=vc["patch_size"], spatial_merge_size=vc["spatial_merge_size"],
        temporal_patch_size=vc["temporal_patch_size"], in_channels=3,
        hidden_act=vc["hidden_act"], attn_implementation="eager",
    )
    vis = peer.build(Qwen2_5_VisionTransformerPretrainedModel, cfg, torch.bfloat16)
    tower, merger = "model.vision_tower.vision_tower.", "model.mm_projector.merger."
    sd = {}
    for k, v in tensors.items():
        if k.startswith(tower):
            sd[k[len(tower):]] = v
        elif k.startswith(merger):
            sd["merger." + k[len(merger):]] = v
    missing, unexpected = vis.load_state_dict(sd, strict=False)
    if unexpected or [m for m in missing if "inv_freq" not in m]:
        raise RuntimeError(f"vision mismatch: missing={missing} unexpected={unexpected}")
    processor = Qwen2VLImageProcessor(
        min_pixels=c["min_pixels"], max_pixels=c["max_pixels"], patch_size=vc["patch_size"],
        merge_size=vc["spatial_merge_size"], temporal_patch_size=vc["temporal_patch_size"],
    )
    return vis.to(torch.float64), processor


def dump_of(args, model: Path, image: Path, tmp: Path) -> dict:
    out = tmp / "dump"
    run_dvl(args, model, ["--image", str(image), "--prompt", "hi", "--gen-length", "1",
                          "--steps", "1", "--dump", str(out)])
    return load_file(str(out / "dump.safetensors"))


def random_image(rng: random.Random, nrng, path: Path) -> Path:
    """A PNG of a random size and aspect ratio: noise over a gradient (content at every
    frequency, so resampling errors show)."""
    aspect = rng.choice([1, 1.3, 2, 3.7, 0.4, 0.15, 6, 11])
    w = int(rng.uniform(40, 1200))
    h = max(28, int(w / aspect))
    w = max(28, w)
    yy, xx = np.mgrid[0:h, 0:w]
    noise = nrng.integers(0, 64, (h, w, 3))
    img = (noise + (xx * 191 // max(w - 1, 1))[..., None] + (yy * 7)[..., None]) % 256
    Image.fromarray(img.astype(np.uint8)).save(path)
    return path


def check_vision(args, model: Path, tensors: dict, rng: random.Random, tmp: Path) -> tuple:
    vis, processor = vision_model(model, tensors)
    nrng = np.random.default_rng(rng.randrange(1 << 30))
    passed = failed = 0
    for i in range(args.vision):
        path = random_image(rng, nrng, tmp / f"random{i}.png")
        w, h = Image.open(path).size
        got = dump_of(args, model, path, tmp)
        batch = processor(images=[Image.open(path)], return_tensors="pt")
        pixels, grid = batch["pixel_values"].double(), batch["image_grid_thw"]
        with torch.inference_mode():
            want = vis(pixels, grid_thw=grid).pooler_output
        pix_err = float((got["pixel_values"].double() - pixels).abs().max())
        feats = got["vision_features"].double()
        rel = float((feats - want).norm() / want.norm()) if feats.shape == want.shape else 1.0
        ok = got["pixel_values"].shape == pixels.shape and pix_err == 0.0 and rel <= 1e-5
        passed, failed = passed + ok, failed + (not ok)
        print(f"{'ok   ' if ok else 'FAIL '} vision {w}x{h} grid {grid.tolist()[0]}: "
              f"pixels max |diff| {pix_err:.1e}, features relative L2 {rel:.1e}")
    return passed, failed, 0


def check_modes(args, model: Path, tmp: Path) -> tuple:
    c = json.loads((model / "config.json").read_text())
    processor = Qwen2VLImageProcessor(min_pixels=c["min_pixels"], max_pixels=c["max_pixels"])
    rng = np.random.default_rng(5)
    h, w = 300, 420
    rgb = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
    alpha = rng.integers(0, 256, (h, w), dtype=np.uint8)
    grey16 = rgb[..., 0].astype(np.uint16) * 257 - rng.integers(0, 200, (h, w)).astype(np.uint16)
    palette = Image.fromarray(rgb).convert("P", palette=Image.ADAPTIVE, colors=50)
    images = {
        "L.png": (Image.fromarray(rgb[..., 0]), {}),
        "LA.png": (Image.fromarray(np.dstack([rgb[..., 0], alpha]), "LA"), {}),
        "P.png": (palette, {}),
        "P-tRNS.png": (palette, {"transparency": 3}),
        "RGBA.png": (Image.fromarray(np.dstack([rgb, alpha]), "RGBA"), {}),
        "I16.png": (Image.fromarray(grey16), {}),
        "1.png": (Image.fromarray(rgb[..., 0] > 128), {}),
        "L.jpg": (Image.fromarray(rgb[..., 0]), {}),
        "RGB.jpg": (Image.fromarray(rgb), {}),
        "CMYK.jpg": (Image.fromarray(rgb).convert("CMYK"), {}),
    }
    passed = failed = 0
    for name, (im, options) in images.items():
        path = tmp / name
        im.save(path, **options)
        got = dump_of(args, model, path, tmp)["pixel_values"].double()
        opened = Image.open(path)
        want = processor(images=[opened], return_tensors="pt")["pixel_values"].double()
        ok = got.shape == want.shape and float((got - want).abs().max()) == 0.0
        passed, failed = passed + ok, failed + (not ok)
        err = float((got - want).abs().max()) if got.shape == want.shape else float("nan")
        print(f"{'ok   ' if ok else 'FAIL '} mode {name} (PIL {opened.mode}): max |diff| {err:.1e}")
    return passed, failed, 0


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=REPO / "models" / "tiny-dvl")
    ap.add_argument("--dvl", type=Path, default=REPO / "target" / "release" / "dvl")
    ap.add_argument("--text", type=int, default=24, help="random text-only prompts")
    ap.add_argument("--vision", type=int, default=12, help="random images")
    ap.add_argument("--image-prompts", type=int, default=4,
                    help="random prompts with one or two random images, decoded")
    ap.add_argument("--modes", action="store_true", help="one image per PIL mode")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--random-shape", type=int, default=None, metavar="SEED",
                    help="check a random-shape tiny checkpoint instead of --model")
    args = ap.parse_args()
    if tuple(int(x) for x in PIL.__version__.split(".")[:2]) > (12, 1):
        ap.error(f"Pillow {PIL.__version__}: needs <= 12.1 (see the docstring)")
    torch.set_num_threads(2)
    rng = random.Random(args.seed)
    totals = []
    with tempfile.TemporaryDirectory() as t:
        tmp = Path(t)
        if args.random_shape is not None:
            args.model = tmp / "checkpoint"
            print(f"random shape {args.random_shape}: "
                  f"{random_checkpoint(args.model, args.random_shape)}")
        tensors = state_dict(args.model)
        if args.text:
            totals.append(check_decode(args, args.model, tensors, rng, tmp, args.text, False))
        if args.image_prompts:
            totals.append(check_decode(args, args.model, tensors, rng, tmp,
                                       args.image_prompts, True))
        if args.vision:
            totals.append(check_vision(args, args.model, tensors, rng, tmp))
        if args.modes:
            totals.append(check_modes(args, args.model, tmp))
    passed, failed, ties = (sum(t[i] for t in totals) for i in range(3))
    print(f"{passed} passed, {failed} failed, {ties} inconclusive (near-ties)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()
