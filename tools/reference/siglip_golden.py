#!/usr/bin/env python3
"""Golden data for the DiffusionVL-Qwen2.5-7B variant (SigLIP + anyres_max_4 + mlp2x_gelu).

Run by hand, not in CI:

    python tools/reference/siglip_golden.py [--out tests/fixtures/tiny-siglip]
        [--images ../shared/fixtures/images] [--tokenizer ../shared/fixtures/tokenizer/tokenizer.json]

Needs torch, transformers (5.x), safetensors, numpy, tokenizers and Pillow <= 12.1 (Pillow 12.2+
changed the pass order of some bicubic resizes; the engine follows <= 12.1 by default).

What it does (spec: shared/spec/DIFFUSIONVL.md):

1. Builds a tiny random checkpoint in the published layout of `hustvl/DiffusionVL-Qwen2.5-7B`
   (§1.2, §1.3.1, §1.3.3): a Qwen2 text decoder, a SigLIP vision tower built with transformers'
   own `SiglipVisionModel` (one layer more than is used, plus `post_layernorm`, both of which
   the reference drops), the `mlp2x_gelu` projector and `image_newline`. Weights are bf16, in
   two shards with an index.
2. For every case: image preprocessing with the LLaVA-OneVision anyres functions (copied below
   from `llava/mm_utils.py`, spec §4.2) and transformers' `SiglipImageProcessorPil` for each 384²
   tile; several images per prompt switch to `expand2square` with (127,127,127) (§4.2 step 7).
3. SigLIP features = `hidden_states[-1]` after deleting the last encoder layer, exactly like
   `SigLipVisionTower` (§5.2), run in float64 on the bf16 weights; the projector in float64;
   the anyres merge (`unpad_image`, `F.interpolate(mode="bilinear")`, `image_newline`) as in
   `llava_arch.py` (§5.2).
4. Block-diffusion decoding exactly as §8.5 (greedy; static and dynamic strategies), where each
   forward is transformers' `Qwen2ForCausalLM` in float64 over the whole prefix with an explicit
   block-causal 4-D mask (cache-free). An independent float64 NumPy decoder that keeps a K/V
   cache as §7.3 describes must produce the same trace; its largest logit difference is stored
   in `reference_checks`. A float32 run of the whole pipeline checks that no decision is close
   to flipping (`robustness`).

The output format follows shared/fixtures/tiny-dvl/README.md; tests/fixtures/tiny-siglip/README.md
documents the differences.
"""

import argparse
import copy
import json
import math
import os
import shutil
import sys

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.numpy import save_file as np_save_file
from safetensors.torch import save_file
from tokenizers import Tokenizer
from transformers import Qwen2Config, Qwen2ForCausalLM, SiglipVisionConfig, SiglipVisionModel
from transformers.image_transforms import convert_to_rgb
from transformers.models.siglip.image_processing_pil_siglip import SiglipImageProcessorPil

MASK_ID = 151671
EOS_ID = 151645
IMAGE_TOKEN_INDEX = -200
TOKENIZER_VOCAB = 151665
BLOCK = 8
SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."

# Tiny shapes (the real model: text 3584/28 layers, SigLIP 1152/27 layers/16 heads/4304).
TEXT = dict(hidden=16, layers=2, heads=2, kv=1, inter=48, vocab=151936)
VIS = dict(hidden=32, inter=80, layers=4, heads=2, patch=14, image=384)  # 4 stored, 3 used
PINPOINTS = [[i * 384, j * 384] for i in range(1, 7) for j in range(1, 7)]
EOS_GAIN = 2.5
PREFIX_V = "model.vision_tower.vision_tower.vision_model."

CASES = [
    # name, images, question, strategy, steps, gen_length, threshold
    ("img_wide_static8", ["chelsea.png"], "Describe this image.", "low_confidence_static", 8, 32, None),
    ("img_big_dynamic", ["chelsea_800x500.png"], "What is in the picture?", "low_confidence_dynamic", 8, 32, 0.2),
    # camera.png: grayscale PNG, 2×2 grid with times exactly 1.0 (no downscale). Golden cases
    # use PNGs only: JPEG decoders (libjpeg-turbo in PIL, zune-jpeg in the engine) are not
    # bit-identical.
    ("img_square_static4", ["camera.png"], "What is shown here?", "low_confidence_static", 4, 24, None),
    ("img_rgba_static5", ["Minduka_Present_Blue_Pack.png"], "What is this?", "low_confidence_static", 5, 24, None),
    ("multi_static8", ["chelsea.png", "Minduka_Present_Blue_Pack.png"], "What is different between these pictures?",
     "low_confidence_static", 8, 32, None),
    ("text_dynamic4", [], "What is two plus two?", "low_confidence_dynamic", 4, 32, 0.2),
]


# ----------------------------------------------------------------------------------------------
# LLaVA-OneVision preprocessing (llava/mm_utils.py; spec §4.2), verbatim in substance.
# ----------------------------------------------------------------------------------------------

def select_best_resolution(original_size, possible_resolutions):
    original_width, original_height = original_size
    best_fit = None
    max_effective_resolution = 0
    min_wasted_resolution = float("inf")
    for width, height in possible_resolutions:
        scale = min(width / original_width, height / original_height)
        downscaled_width, downscaled_height = int(original_width * scale), int(original_height * scale)
        effective_resolution = min(downscaled_width * downscaled_height, original_width * original_height)
        wasted_resolution = (width * height) - effective_resolution
        if effective_resolution > max_effective_resolution or (
            effective_resolution == max_effective_resolution and wasted_resolution < min_wasted_resolution
        ):
            max_effective_resolution = effective_resolution
            min_wasted_resolution = wasted_resolution
            best_fit = (width, height)
    return best_fit


def resize_and_pad_image(image, target_resolution):
    original_width, original_height = image.size
    target_width, target_height = target_resolution
    scale_w = target_width / original_width
    scale_h = target_height / original_height
    if scale_w < scale_h:
        new_width = target_width
        new_height = min(math.ceil(original_height * scale_w), target_height)
    else:
        new_height = target_height
        new_width = min(math.ceil(original_width * scale_h), target_width)
    resized_image = image.resize((new_width, new_height))
    new_image = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    paste_x = (target_width - new_width) // 2
    paste_y = (target_height - new_height) // 2
    new_image.paste(resized_image, (paste_x, paste_y))
    return new_image


def divide_to_patches(image, patch_size):
    patches = []
    width, height = image.size
    for i in range(0, height, patch_size):
        for j in range(0, width, patch_size):
            box = (j, i, j + patch_size, i + patch_size)
            patches.append(image.crop(box))
    return patches


def get_anyres_image_grid_shape(image_size, grid_pinpoints, patch_size):
    width, height = select_best_resolution(image_size, grid_pinpoints)
    return width // patch_size, height // patch_size


def expand2square(pil_img, background_color):
    width, height = pil_img.size
    if width == height:
        return pil_img
    elif width > height:
        result = Image.new(pil_img.mode, (width, width), background_color)
        result.paste(pil_img, (0, (width - height) // 2))
        return result
    else:
        result = Image.new(pil_img.mode, (height, height), background_color)
        result.paste(pil_img, ((height - width) // 2, 0))
        return result


PROCESSOR = SiglipImageProcessorPil(size={"height": 384, "width": 384})


def processor_tile(img):
    """transformers' SigLIP processor (PIL backend): resize 384² bicubic, 1/255, mean=std=0.5."""
    out = PROCESSOR(images=img, return_tensors="np")["pixel_values"][0]
    assert out.shape == (3, 384, 384) and out.dtype == np.float32
    return out


def process_anyres_image(image, grid_pinpoints):
    """Returns (tile images as PIL, tile tensor [n,3,384,384], info)."""
    best_resolution = select_best_resolution(image.size, grid_pinpoints)
    image_padded = resize_and_pad_image(image, best_resolution)
    patches = divide_to_patches(image_padded, 384)
    shortest_edge = 384
    image_original_resize = image.resize((shortest_edge, shortest_edge))
    image_patches = [image_original_resize] + patches
    tensors = np.stack([processor_tile(p) for p in image_patches])
    info = dict(mode="anyres", best_resolution_wh=list(best_resolution),
                grid_wh=[best_resolution[0] // 384, best_resolution[1] // 384])
    return image_patches, tensors, info


def process_pad_image(image):
    square = expand2square(image, tuple(int(x * 255) for x in PROCESSOR.image_mean))
    tile = square.resize((384, 384), Image.BICUBIC) if square.size != (384, 384) else square
    tensor = processor_tile(square)[None]
    return [tile], tensor, dict(mode="pad", square_size=list(square.size))


def fnv1a64(data: bytes) -> str:
    h = 0xCBF29CE484222325
    for b in data:
        h ^= b
        h = (h * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return f"{h:016x}"


# ----------------------------------------------------------------------------------------------
# anyres merge (llava/model/llava_arch.py; spec §5.2)
# ----------------------------------------------------------------------------------------------

def unpad_image(tensor, original_size):
    original_width, original_height = original_size
    current_height, current_width = tensor.shape[1:]
    original_aspect_ratio = original_width / original_height
    current_aspect_ratio = current_width / current_height
    if original_aspect_ratio > current_aspect_ratio:
        scale_factor = current_width / original_width
        new_height = int(original_height * scale_factor)
        padding = (current_height - new_height) // 2
        return tensor[:, padding: current_height - padding, :]
    else:
        scale_factor = current_height / original_height
        new_width = int(original_width * scale_factor)
        padding = (current_width - new_width) // 2
        return tensor[:, :, padding: current_width - padding]


def merge_image(image_feature, image_size, newline, max_num_patches=4, info=None):
    """image_feature [n_tiles, 729, D] -> [tokens, D]."""
    if image_feature.shape[0] > 1:
        base_image_feature = image_feature[0]
        image_feature = image_feature[1:]
        height = width = 27
        assert height * width == base_image_feature.shape[0]
        num_patch_width, num_patch_height = get_anyres_image_grid_shape(image_size, PINPOINTS, 384)
        image_feature = image_feature.view(num_patch_height, num_patch_width, height, width, -1)
        unit = image_feature.shape[2]
        image_feature = image_feature.permute(4, 0, 2, 1, 3).contiguous()
        image_feature = image_feature.flatten(1, 2).flatten(2, 3)
        image_feature = unpad_image(image_feature, image_size)
        c, h, w = image_feature.shape
        times = math.sqrt(h * w / (max_num_patches * unit ** 2))
        if info is not None:
            info.update(unpadded_hw=[h, w], times=times)
        if times > 1.1:
            image_feature = image_feature[None]
            image_feature = F.interpolate(image_feature, [int(h // times), int(w // times)], mode="bilinear")[0]
        if info is not None:
            info.update(final_hw=list(image_feature.shape[1:]))
        image_feature = torch.cat(
            (image_feature, newline[:, None, None].expand(*image_feature.shape[:-1], 1).to(image_feature.dtype)), dim=-1)
        image_feature = image_feature.flatten(1, 2).transpose(0, 1)
        image_feature = torch.cat((base_image_feature, image_feature), dim=0)
    else:
        image_feature = image_feature[0]
        image_feature = torch.cat((image_feature, newline[None].to(image_feature.dtype)), dim=0)
    return image_feature


def token_formula(W, H, n_images):
    """Spec §5.2 arithmetic without features."""
    if n_images > 1:
        return 730
    npw, nph = get_anyres_image_grid_shape((W, H), PINPOINTS, 384)
    Hc, Wc = nph * 27, npw * 27
    if W / H > Wc / Hc:
        nh = int(H * (Wc / W)); p = (Hc - nh) // 2; h, w = Hc - 2 * p, Wc
    else:
        nw = int(W * (Hc / H)); p = (Wc - nw) // 2; h, w = Hc, Wc - 2 * p
    t = math.sqrt(h * w / (4 * 27 ** 2))
    if t > 1.1:
        h, w = int(h // t), int(w // t)
    return 729 + h * (w + 1)


# ----------------------------------------------------------------------------------------------
# Tiny checkpoint
# ----------------------------------------------------------------------------------------------

def build_weights(seed):
    g = torch.Generator().manual_seed(seed)

    def randn(*shape, std=1.0):
        return torch.randn(*shape, generator=g, dtype=torch.float64) * std

    torch.manual_seed(seed)
    vcfg = SiglipVisionConfig(hidden_size=VIS["hidden"], intermediate_size=VIS["inter"],
                              num_hidden_layers=VIS["layers"], num_attention_heads=VIS["heads"],
                              patch_size=VIS["patch"], image_size=VIS["image"], layer_norm_eps=1e-6,
                              hidden_act="gelu_pytorch_tanh", vision_use_head=False)
    tower = SiglipVisionModel(vcfg)
    sd = {}
    for k, v in tower.state_dict().items():
        v = v.to(torch.float64)
        # transformers' init leaves biases at zero and LayerNorms at identity: perturb them so
        # that every parameter the engine reads matters.
        if "layer_norm" in k or "post_layernorm" in k:
            v = (1.0 + randn(*v.shape, std=0.2)) if k.endswith("weight") else randn(*v.shape, std=0.1)
        elif k.endswith("bias"):
            v = v + randn(*v.shape, std=0.1)
        sd[PREFIX_V + k] = v
    assert not any(".head." in k for k in sd), "the released tower has no pooling head"

    H, V, I = TEXT["hidden"], TEXT["vocab"], TEXT["inter"]
    hd = H // TEXT["heads"]
    kvd = TEXT["kv"] * hd
    sd["model.embed_tokens.weight"] = randn(V, H)
    for l in range(TEXT["layers"]):
        p = f"model.layers.{l}."
        sd[p + "input_layernorm.weight"] = 1.0 + randn(H, std=0.1)
        sd[p + "post_attention_layernorm.weight"] = 1.0 + randn(H, std=0.1)
        # q/k 4× larger than unit-variance: with thousands of image rows a flatter attention
        # averages everything away and every masked row predicts the same token.
        sd[p + "self_attn.q_proj.weight"] = randn(H, H, std=4 / math.sqrt(H))
        sd[p + "self_attn.q_proj.bias"] = randn(H, std=0.3)
        sd[p + "self_attn.k_proj.weight"] = randn(kvd, H, std=4 / math.sqrt(H))
        sd[p + "self_attn.k_proj.bias"] = randn(kvd, std=0.3)
        sd[p + "self_attn.v_proj.weight"] = randn(kvd, H, std=1 / math.sqrt(H))
        sd[p + "self_attn.v_proj.bias"] = randn(kvd, std=0.3)
        sd[p + "self_attn.o_proj.weight"] = randn(H, H, std=1 / math.sqrt(H))
        sd[p + "mlp.gate_proj.weight"] = randn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.up_proj.weight"] = randn(I, H, std=1 / math.sqrt(H))
        sd[p + "mlp.down_proj.weight"] = randn(H, I, std=1 / math.sqrt(I))
    sd["model.norm.weight"] = 1.0 + randn(H, std=0.1)
    sd["lm_head.weight"] = randn(V, H, std=4.0 / math.sqrt(H))
    # A live EOS row, so that some cases stop early (spec §8.9).
    sd["lm_head.weight"][EOS_ID] *= EOS_GAIN
    C = VIS["hidden"]
    sd["model.mm_projector.0.weight"] = randn(H, C, std=1 / math.sqrt(C))
    sd["model.mm_projector.0.bias"] = randn(H, std=0.1)
    sd["model.mm_projector.2.weight"] = randn(H, H, std=1 / math.sqrt(H))
    sd["model.mm_projector.2.bias"] = randn(H, std=0.1)
    sd["model.image_newline"] = randn(H)
    # Stored in bf16; every reference computation uses the exact bf16 values.
    return {k: v.to(torch.bfloat16) for k, v in sd.items()}, vcfg


def config_json(vcfg):
    H = TEXT["hidden"]
    return {
        "architectures": ["LlavaDiffusionVLQwenForCausalLM"],
        "model_type": "diffusionvl_qwen",
        "hidden_size": H,
        "intermediate_size": TEXT["inter"],
        "num_hidden_layers": TEXT["layers"],
        "num_attention_heads": TEXT["heads"],
        "num_key_value_heads": TEXT["kv"],
        "hidden_act": "silu",
        "max_position_embeddings": 32768,
        "max_window_layers": TEXT["layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 1000000.0,
        "rope_scaling": None,
        "sliding_window": 32768,
        "use_sliding_window": False,
        "tie_word_embeddings": False,
        "vocab_size": TEXT["vocab"],
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "enable_bd3lm": True,
        "bd3lm_block_size": BLOCK,
        "bd3lm_block_aligned_eos": True,
        "bd3lm_sampling_eps_min": 1e-3,
        "bd3lm_sampling_eps_max": 1.0,
        "bd3lm_antithetic_sampling": True,
        "mm_projector_type": "mlp2x_gelu",
        "mm_hidden_size": VIS["hidden"],
        "mm_vision_tower": "google/siglip2-so400m-patch14-384",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
        "mm_patch_merge_type": "spatial_unpad",
        "mm_newline_position": "one_token",
        "image_aspect_ratio": "anyres_max_4",
        "image_grid_pinpoints": PINPOINTS,
        "tokenizer_model_max_length": 8192,
        "tokenizer_padding_side": "right",
        "vision_config": {
            "model_type": "siglip_vision_model",
            "hidden_size": vcfg.hidden_size,
            "intermediate_size": vcfg.intermediate_size,
            "num_hidden_layers": vcfg.num_hidden_layers,
            "num_attention_heads": vcfg.num_attention_heads,
            "num_channels": 3,
            "image_size": vcfg.image_size,
            "patch_size": vcfg.patch_size,
            "hidden_act": vcfg.hidden_act,
            "layer_norm_eps": vcfg.layer_norm_eps,
        },
    }


def save_checkpoint(out, weights, cfg):
    text = {k: v for k, v in weights.items() if k.startswith("model.embed_tokens") or k.startswith("model.layers")
            or k == "model.norm.weight"}
    rest = {k: v for k, v in weights.items() if k not in text}
    shards = [("model-00001-of-00002.safetensors", text), ("model-00002-of-00002.safetensors", rest)]
    weight_map = {}
    total = 0
    for name, part in shards:
        save_file({k: v.contiguous() for k, v in sorted(part.items())}, os.path.join(out, name),
                  metadata={"format": "pt"})
        os.chmod(os.path.join(out, name), 0o644)
        for k, v in part.items():
            weight_map[k] = name
            total += v.numel() * 2
    with open(os.path.join(out, "model.safetensors.index.json"), "w") as f:
        json.dump({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, f, indent=1)
    with open(os.path.join(out, "config.json"), "w") as f:
        json.dump(cfg, f, indent=1)


# ----------------------------------------------------------------------------------------------
# Reference models (float64 on the bf16 weights)
# ----------------------------------------------------------------------------------------------

class Reference:
    def __init__(self, weights, vcfg, dtype=torch.float64):
        self.dtype = dtype
        self.weights = weights
        W = {k: v.to(dtype) for k, v in weights.items()}
        self.W = W
        # SigLIP: transformers' module, last layer deleted as SigLipVisionTower does (SIG L570).
        vcfg = copy.deepcopy(vcfg)
        vcfg._attn_implementation = "sdpa"
        tower = SiglipVisionModel(vcfg).to(dtype)
        tower.load_state_dict({k[len(PREFIX_V):]: v for k, v in W.items() if k.startswith(PREFIX_V)})
        del tower.encoder.layers[-1:]
        tower.eval()
        self.tower = tower
        # Qwen2 text model.
        H = TEXT["hidden"]
        tcfg = Qwen2Config(vocab_size=TEXT["vocab"], hidden_size=H, intermediate_size=TEXT["inter"],
                           num_hidden_layers=TEXT["layers"], num_attention_heads=TEXT["heads"],
                           num_key_value_heads=TEXT["kv"], rms_norm_eps=1e-6, max_position_embeddings=32768,
                           rope_parameters={"rope_type": "default", "rope_theta": 1e6}, tie_word_embeddings=False,
                           use_sliding_window=False)
        tcfg._attn_implementation = "sdpa"
        lm = Qwen2ForCausalLM(tcfg).to(dtype)
        missing = lm.load_state_dict({k: v for k, v in W.items() if k.startswith("model.layers")
                                      or k in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")},
                                     strict=False)
        assert not missing.unexpected_keys and all("rotary" in k for k in missing.missing_keys), missing
        # transformers computes RoPE angles in float32 whatever the model dtype; at position
        # 3000 that is up to 2e-4 rad off. The golden data uses exact float64 angles (spec §7.2
        # math; the engine also computes angles in f64).
        hd = H // TEXT["heads"]
        inv_freq = 1e6 ** (-torch.arange(0, hd, 2, dtype=torch.float64) / hd)

        def rope64(x, position_ids):
            freqs = position_ids[0].to(torch.float64)[:, None] * inv_freq[None]
            emb = torch.cat((freqs, freqs), dim=-1)[None]
            return emb.cos().to(x.dtype), emb.sin().to(x.dtype)

        lm.model.rotary_emb.forward = rope64
        # Likewise Qwen2RMSNorm upcasts to float32 (a no-op for bf16 models, a downcast here):
        # keep float64 (normalise, cast to the model dtype, multiply by the weight: spec §7.1).
        for mod in lm.modules():
            if type(mod).__name__ == "Qwen2RMSNorm":
                def rms64(x, mod=mod):
                    xf = x.to(torch.float64)
                    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + mod.variance_epsilon)
                    return mod.weight * y.to(x.dtype)
                mod.forward = rms64
        lm.eval()
        self.lm = lm
        self.embed = W["model.embed_tokens.weight"]
        self.newline = W["model.image_newline"]

    @torch.no_grad()
    def siglip(self, tiles):
        out = self.tower(pixel_values=torch.from_numpy(tiles).to(self.dtype), output_hidden_states=True)
        feats = out.hidden_states[-1]
        # hidden_states[-1] must be the raw output of the last kept layer (no post_layernorm).
        assert len(out.hidden_states) == VIS["layers"]  # embeddings + (layers - 1)
        return feats

    @torch.no_grad()
    def projector(self, feats):
        W = self.W
        x = F.linear(feats, W["model.mm_projector.0.weight"], W["model.mm_projector.0.bias"])
        x = F.gelu(x)  # exact erf GELU
        return F.linear(x, W["model.mm_projector.2.weight"], W["model.mm_projector.2.bias"])

    @torch.no_grad()
    def forward(self, x_emb):
        """Cache-free forward over a prefix [L, H] with the block-causal mask; returns
        (prenorm [L,H], hidden [L,H]) — hidden is after the final RMSNorm."""
        L = x_emb.shape[0]
        blk = torch.arange(L) // BLOCK
        visible = blk[:, None] >= blk[None, :]
        mask = torch.zeros(L, L, dtype=self.dtype).masked_fill(~visible, float("-inf"))[None, None]
        captured = {}
        hook = self.lm.model.layers[-1].register_forward_hook(
            lambda m, i, o: captured.__setitem__("pre", o[0] if isinstance(o, tuple) else o))
        out = self.lm.model(inputs_embeds=x_emb[None], attention_mask=mask,
                            position_ids=torch.arange(L)[None], use_cache=False)
        hook.remove()
        return captured["pre"][0], out.last_hidden_state[0]

    def logits(self, hidden):
        return hidden @ self.W["lm_head.weight"].T


class NumpyDecoder:
    """Independent Qwen2 decoder with the K/V cache semantics of spec §7.3 (NumPy)."""

    def __init__(self, weights, dtype=np.float64):
        self.dt = dtype
        self.W = {k: v.to(torch.float64).numpy().astype(dtype) for k, v in weights.items()
                  if not k.startswith(PREFIX_V)}
        H = TEXT["hidden"]
        self.hd = H // TEXT["heads"]
        half = self.hd // 2
        self.inv_freq = 1e6 ** (-np.arange(half, dtype=np.float64) * 2 / self.hd)
        self.reset()

    def reset(self):
        self.k = [np.zeros((0, TEXT["kv"] * self.hd), self.dt) for _ in range(TEXT["layers"])]
        self.v = [np.zeros((0, TEXT["kv"] * self.hd), self.dt) for _ in range(TEXT["layers"])]

    def rms(self, x, w):
        x64 = x.astype(np.float64)
        return (x64 / np.sqrt((x64 ** 2).mean(-1, keepdims=True) + 1e-6)).astype(self.dt) * w

    def rope(self, x, pos, heads):
        ang = pos[:, None].astype(np.float64) * self.inv_freq[None]
        cos = np.concatenate([np.cos(ang)] * 2, -1).astype(self.dt)
        sin = np.concatenate([np.sin(ang)] * 2, -1).astype(self.dt)
        x = x.reshape(len(pos), heads, self.hd)
        h2 = self.hd // 2
        rot = np.concatenate([-x[..., h2:], x[..., :h2]], -1)
        return (x * cos[:, None] + rot * sin[:, None]).reshape(len(pos), heads * self.hd)

    def forward(self, x, store):
        """x [T, H] at positions cache_len.., block-causal; store K/V if store."""
        W, hd = self.W, self.hd
        nh, nkv = TEXT["heads"], TEXT["kv"]
        T = x.shape[0]
        p0 = self.k[0].shape[0]
        pos = np.arange(p0, p0 + T)
        x = x.astype(self.dt).copy()
        for l in range(TEXT["layers"]):
            p = f"model.layers.{l}."
            a = self.rms(x, W[p + "input_layernorm.weight"])
            q = a @ W[p + "self_attn.q_proj.weight"].T + W[p + "self_attn.q_proj.bias"]
            k = a @ W[p + "self_attn.k_proj.weight"].T + W[p + "self_attn.k_proj.bias"]
            v = a @ W[p + "self_attn.v_proj.weight"].T + W[p + "self_attn.v_proj.bias"]
            q, k = self.rope(q, pos, nh), self.rope(k, pos, nkv)
            K = np.concatenate([self.k[l], k]); Vv = np.concatenate([self.v[l], v])
            if store:
                self.k[l], self.v[l] = K, Vv
            kb = np.arange(K.shape[0]) // BLOCK
            vis = (pos[:, None] // BLOCK) >= kb[None]
            o = np.zeros((T, nh * hd), self.dt)
            g = nh // nkv
            for h in range(nh):
                kh = K[:, (h // g) * hd:(h // g + 1) * hd]
                vh = Vv[:, (h // g) * hd:(h // g + 1) * hd]
                s = (q[:, h * hd:(h + 1) * hd] @ kh.T) / np.sqrt(hd)
                s = np.where(vis, s, -np.inf)
                s = np.exp(s - s.max(-1, keepdims=True))
                o[:, h * hd:(h + 1) * hd] = (s / s.sum(-1, keepdims=True)) @ vh
            x = x + o @ W[p + "self_attn.o_proj.weight"].T
            m = self.rms(x, W[p + "post_attention_layernorm.weight"])
            gt = m @ W[p + "mlp.gate_proj.weight"].T
            u = m @ W[p + "mlp.up_proj.weight"].T
            x = x + ((gt / (1 + np.exp(-gt))) * u) @ W[p + "mlp.down_proj.weight"].T
        return x

    def logits(self, x):
        hn = self.rms(x, self.W["model.norm.weight"])
        return hn @ self.W["lm_head.weight"].T


def siglip_numpy(weights, tiles):
    """Independent SigLIP encoder (spec §5.2) in float64 NumPy, for the cross-check."""
    W = {k[len(PREFIX_V):]: v.to(torch.float64).numpy() for k, v in weights.items() if k.startswith(PREFIX_V)}
    C, nh = VIS["hidden"], VIS["heads"]
    hd = C // nh
    n = tiles.shape[0]
    pe = W["embeddings.patch_embedding.weight"].reshape(C, -1)
    # Conv2d(k=14, s=14, valid) on 384 pixels: 27 patches cover 378; the last 6 rows/columns
    # are never read.
    t = tiles[:, :, :378, :378].astype(np.float64).reshape(n, 3, 27, 14, 27, 14).transpose(0, 2, 4, 1, 3, 5).reshape(n, 729, 588)
    x = t @ pe.T + W["embeddings.patch_embedding.bias"] + W["embeddings.position_embedding.weight"]

    def ln(x, w, b):
        mu = x.mean(-1, keepdims=True)
        var = ((x - mu) ** 2).mean(-1, keepdims=True)
        return (x - mu) / np.sqrt(var + 1e-6) * w + b

    for l in range(VIS["layers"] - 1):
        p = f"encoder.layers.{l}."
        a = ln(x, W[p + "layer_norm1.weight"], W[p + "layer_norm1.bias"])
        q, k, v = (a @ W[p + f"self_attn.{z}_proj.weight"].T + W[p + f"self_attn.{z}_proj.bias"] for z in "qkv")
        o = np.zeros_like(x)
        for h in range(nh):
            sl = slice(h * hd, (h + 1) * hd)
            s = q[..., sl] @ k[..., sl].transpose(0, 2, 1) / np.sqrt(hd)
            s = np.exp(s - s.max(-1, keepdims=True))
            o[..., sl] = (s / s.sum(-1, keepdims=True)) @ v[..., sl]
        x = x + o @ W[p + "self_attn.out_proj.weight"].T + W[p + "self_attn.out_proj.bias"]
        m = ln(x, W[p + "layer_norm2.weight"], W[p + "layer_norm2.bias"])
        f = m @ W[p + "mlp.fc1.weight"].T + W[p + "mlp.fc1.bias"]
        f = 0.5 * f * (1 + np.tanh(math.sqrt(2 / math.pi) * (f + 0.044715 * f ** 3)))
        x = x + f @ W[p + "mlp.fc2.weight"].T + W[p + "mlp.fc2.bias"]
    return x


# ----------------------------------------------------------------------------------------------
# Block-diffusion decoding (spec §8.5), greedy
# ----------------------------------------------------------------------------------------------

def schedule(block, steps):
    base, rem = divmod(block, steps)
    return [base + (1 if i < rem else 0) for i in range(steps + 1)]


def choose(conf, n, strategy, threshold):
    """conf: list of (row, p) for masked rows. Returns (rows, rule)."""
    order = sorted(conf, key=lambda t: (-t[1], t[0]))
    if strategy == "low_confidence_dynamic":
        above = [i for i, c in order if c > threshold]
        if len(above) >= n:
            return above, "threshold"
        return [i for i, _ in order[:n]], "topk"
    return [i for i, _ in order[:n]], None


def decode(P_emb, embed, mask_row, block_logits, prefill, G, steps, strategy, threshold, probes=None):
    """Generic §8.5 loop. `block_logits(x_prefix_emb, s0, s1, commit_rows)` returns logits of
    rows s0..s1 ([B, V] float64 numpy) for a denoising forward; `prefill(x)` runs the prefill.
    Returns the case trace dict."""
    P = P_emb.shape[0]
    H = P_emb.shape[1]
    B = BLOCK
    assert B < P + G
    nblocks = -(-(P + G) // B)
    total = nblocks * B
    x_emb = np.concatenate([P_emb, np.repeat(mask_row[None], total - P, 0)])
    x_ids = [MASK_ID] * total
    prefill_blocks = P // B
    Lpf = prefill_blocks * B
    passes = 0
    if Lpf > 0:
        prefill(x_emb[:Lpf])
        passes += 1
    sched = schedule(B, steps)
    trace = []
    stopped = False
    first = True
    for b in range(prefill_blocks, nblocks):
        s0, s1 = b * B, b * B + B
        cur = x_emb[s0:s1].copy()
        cur_ids = x_ids[s0:s1]
        bt = dict(block=b, start=s0, prompt_tail=max(0, min(B, P - s0)), steps=[])
        denoise = 0
        for step in range(steps + 1):
            is_mask = np.all(np.abs(cur - mask_row[None]) < 1e-5, axis=-1)
            if not is_mask.any():
                block_logits(x_emb[:s0], cur, s0, commit=True)
                passes += 1
                break
            z = block_logits(x_emb[:s0], cur, s0, commit=False, first=first)
            first = False
            passes += 1
            denoise += 1
            zmax = z.max(-1, keepdims=True)
            lse = (zmax[:, 0] + np.log(np.exp(z - zmax).sum(-1)))
            x0 = z.argmax(-1)
            conf = np.exp(z[np.arange(B), x0] - lse)
            for i in range(B):
                if is_mask[i]:
                    assert x0[i] != MASK_ID, "a case commits the MASK id; pick another seed"
            masked = [(i, float(conf[i])) for i in range(B) if is_mask[i]]
            n = sched[step]
            rows, rule = choose(masked, n, strategy, threshold)
            st = dict(step=step, n_scheduled=n, masked_before=len(masked))
            if rule:
                st["rule"] = rule
            left = [c for i, c in masked if i not in rows]
            if rows and left and rule != "threshold":
                st["cut_gap"] = float(min(c for i, c in masked if i in rows) - max(left))
            com = []
            for i in rows:
                zz = z[i].copy(); zz[x0[i]] = -np.inf
                com.append(dict(pos=s0 + i, block_index=i, gen_index=s0 + i - P, token=int(x0[i]),
                                conf=float(f"{conf[i]:.6g}"), margin=float(z[i, x0[i]] - zz.max())))
                cur_ids[i] = int(x0[i])
                cur[i] = embed(int(x0[i]))
            st["committed"] = com
            st["masked_conf"] = [[i, float(f"{c:.6g}")] for i, c in masked]
            bt["steps"].append(st)
        else:
            raise AssertionError("block did not finish")  # §8.12 item 1 never happens here
        x_emb[s0:s1] = cur
        x_ids[s0:s1] = cur_ids
        bt.update(denoise_passes=denoise, commit_passes=1, forward_passes=denoise + 1,
                  cache_len_after=s1, eos_in_block=bool(s1 > P and EOS_ID in x_ids[max(P, s0):s1]))
        trace.append(bt)
        if bt["eos_in_block"]:
            stopped = True
            break
    return dict(ids=x_ids[P:P + G], trace=trace, forward_passes=passes, stopped_at_eos=stopped,
                total_length=total, nblocks=nblocks, prefill_blocks=prefill_blocks, prefill_length=Lpf)


def trace_key(res):
    return [[[(c["pos"], c["token"]) for c in s["committed"]] for s in b["steps"]] for b in res["trace"]]


# ----------------------------------------------------------------------------------------------
# Cases
# ----------------------------------------------------------------------------------------------

def prompt_of(question, n_images):
    user = (" ".join(["<image>"] * n_images) + "\n" if n_images else "") + question
    return (f"<|im_start|>system\n{SYSTEM}<|im_end|>\n<|im_start|>user\n{user}<|im_end|>\n"
            f"<|im_start|>assistant\n")


def tokenize(tok, text):
    ids = []
    for i, chunk in enumerate(text.split("<image>")):
        if i:
            ids.append(IMAGE_TOKEN_INDEX)
        if chunk:
            ids.extend(tok.encode(chunk, add_special_tokens=False).ids)
    return ids


def load_image(path):
    return convert_to_rgb(Image.open(path), return_numpy=False)


def vision_pipeline(ref, images):
    """Preprocess, encode, project and merge every image. Returns per-image data."""
    out = []
    n = len(images)
    for img in images:
        if n > 1:
            pil_tiles, tiles, info = process_pad_image(img)
        else:
            pil_tiles, tiles, info = process_anyres_image(img, PINPOINTS)
        feats = ref.siglip(tiles)
        proj = ref.projector(feats)
        merged = merge_image(proj, img.size, ref.newline, 4, info)
        out.append(dict(pil_tiles=pil_tiles, tiles=tiles, info=info, feats=feats, proj=proj, merged=merged))
    return out


def assemble(ref, prompt_ids, vis):
    rows, k = [], 0
    for t in prompt_ids:
        if t == IMAGE_TOKEN_INDEX:
            rows.append(vis[k]["merged"]); k += 1
        else:
            rows.append(ref.embed[t][None])
    return torch.cat(rows).to(torch.float64).numpy()


def run_case(ref, npdec, tok, find_image, case, out_dir, ref32=None, npdec32=None):
    name, files, question, strategy, steps, G, threshold = case
    images = [load_image(find_image(f)) for f in files]
    text = prompt_of(question, len(files))
    prompt_ids = tokenize(tok, text)
    vis = vision_pipeline(ref, images)
    P_emb = assemble(ref, prompt_ids, vis)
    P = P_emb.shape[0]
    embed = lambda t: ref.embed[t].numpy()
    mask_row = ref.embed[MASK_ID].numpy()
    tensors = {}

    # Primary: transformers Qwen2, cache-free full-prefix forwards.
    def hf_prefill(x):
        pre, hid = ref.forward(torch.from_numpy(x))
        tensors["prefill_last_block_prenorm"] = pre[-BLOCK:].numpy()
        tensors["prefill_last_block_hidden"] = hid[-BLOCK:].numpy()

    def hf_block(prefix, cur, s0, commit, first=False):
        if commit:
            return None
        x = torch.from_numpy(np.concatenate([prefix, cur]))
        _, hid = ref.forward(x)
        hb = hid[s0:]
        z = ref.logits(hb).numpy()
        hf_logits.append(z)
        if first:
            tensors["first_step_hidden"] = hb.numpy()
            zt = torch.from_numpy(z)
            vals, idx = torch.sort(zt, dim=-1, descending=True, stable=True)
            tensors["first_step_logits_top64_values"] = vals[:, :64].numpy()
            tensors["first_step_logits_top64_indices"] = idx[:, :64].numpy().astype(np.int64)
            tensors["first_step_logsumexp"] = torch.logsumexp(zt, -1).numpy()
            tensors["first_step_logits_tail"] = z[:, TOKENIZER_VOCAB - 1:]
        return z

    hf_logits = []
    res = decode(P_emb, embed, mask_row, hf_block, hf_prefill, G, steps, strategy, threshold)

    # Independent cached NumPy decoder: same trace; largest logit difference.
    worst = [0.0]
    calls = [0]

    def np_prefill(x):
        npdec.reset()
        npdec.forward(x, store=True)

    def np_block(prefix, cur, s0, commit, first=False):
        assert npdec.k[0].shape[0] == s0
        x = npdec.forward(cur, store=commit)
        if commit:
            return None
        z = npdec.logits(x)
        zr = hf_logits[calls[0]]
        calls[0] += 1
        worst[0] = max(worst[0], float(np.abs(z - zr).max()))
        return z

    res_np = decode(P_emb, embed, mask_row, np_block, np_prefill, G, steps, strategy, threshold)
    assert trace_key(res_np) == trace_key(res) and res_np["ids"] == res["ids"], f"{name}: NumPy decoder disagrees"

    # SigLIP cross-check against an independent implementation.
    sig_diff = 0.0
    for v in vis:
        d = np.abs(siglip_numpy(ref.weights, v["tiles"]) - v["feats"].numpy()).max()
        sig_diff = max(sig_diff, float(d))
    assert sig_diff < 1e-9, f"{name}: transformers SigLIP and the NumPy encoder differ by {sig_diff}"
    assert worst[0] < 1e-9, f"{name}: cached NumPy decoder and transformers differ by {worst[0]}"

    # Robustness: the whole pipeline again in float32 (vision, projector, merge, decoder).
    robustness = {}
    if ref32 is not None:
        vis32 = vision_pipeline(ref32, images)
        P32 = assemble(ref32, prompt_ids, vis32).astype(np.float32)

        def p32(x):
            npdec32.reset(); npdec32.forward(x, store=True)

        def b32(prefix, cur, s0, commit, first=False):
            x = npdec32.forward(cur.astype(np.float32), store=commit)
            return None if commit else npdec32.logits(x).astype(np.float64)

        r32 = decode(P32, lambda t: ref32.embed[t].numpy(), ref32.embed[MASK_ID].numpy(), b32, p32, G, steps,
                     strategy, threshold)
        robustness["fp32"] = dict(identical_trace=trace_key(r32) == trace_key(res) and r32["ids"] == res["ids"],
                                  vision_features_rel_l2=float(
                                      np.linalg.norm(P32 - P_emb) / np.linalg.norm(P_emb)))
    margins = [c["margin"] for b in res["trace"] for s in b["steps"] for c in s["committed"]]
    gaps = [s["cut_gap"] for b in res["trace"] for s in b["steps"] if "cut_gap" in s]
    robustness["min_commit_margin"] = min(margins)
    robustness["min_static_cut_gap"] = min(gaps) if gaps else None
    if strategy == "low_confidence_dynamic":
        robustness["min_threshold_distance"] = min(
            abs(c - threshold) for b in res["trace"] for s in b["steps"] for _, c in s["masked_conf"])

    # Tensors.
    if vis:
        all_tiles = np.concatenate([v["tiles"] for v in vis])
        tensors["tiles_sub"] = np.ascontiguousarray(all_tiles[:, :, ::8, ::8])
        tensors["siglip_features"] = torch.cat([v["feats"] for v in vis]).numpy()
        tensors["projector_output"] = torch.cat([v["proj"] for v in vis]).numpy()
        tensors["vision_features"] = torch.cat([v["merged"] for v in vis]).numpy()
    tensors = {k: (v.astype(np.float32) if v.dtype != np.int64 else v) for k, v in tensors.items()}
    np_save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()},
                 os.path.join(out_dir, f"{name}.safetensors"))
    os.chmod(os.path.join(out_dir, f"{name}.safetensors"), 0o644)

    img_entries = []
    for f, img, v in zip(files, images, vis):
        n_img = v["merged"].shape[0]
        assert n_img == token_formula(img.size[0], img.size[1], len(files)), "token formula disagrees"
        e = dict(file=f, original_size_wh=list(img.size), **v["info"], n_tiles=int(v["tiles"].shape[0]),
                 tile_fnv1a64=[fnv1a64(np.asarray(t.convert("RGB")).tobytes()) for t in v["pil_tiles"]],
                 tile_channel_sums=[[float(np.float64(t[c]).sum()) for c in range(3)] for t in v["tiles"]],
                 n_image_tokens=int(n_img))
        # The hashed uint8 tiles are exactly what the processor normalised.
        for t, ten in zip(v["pil_tiles"], v["tiles"]):
            u8 = np.asarray(t.convert("RGB")).transpose(2, 0, 1)
            again = ((u8.astype(np.float64) * (1 / 255)).astype(np.float32) - np.float32(0.5)) / np.float32(0.5)
            assert np.array_equal(again, ten), f"{name}: tile bytes and processor output disagree"
        img_entries.append(e)
    ids = res["ids"]
    cut = []
    for t in ids:
        if t in (EOS_ID, MASK_ID):
            break
        cut.append(t)
    text_out = "".join(tok.decode([t]) if t < TOKENIZER_VOCAB else f"<id:{t}>" for t in cut)
    props = dict(
        multi_commit=any(s.get("rule") == "threshold" and len(s["committed"]) >= 2 for b in res["trace"]
                         for s in b["steps"]),
        fallback=any(s.get("rule") == "topk" for b in res["trace"] for s in b["steps"]),
        nonmono=any([c["pos"] for s in b["steps"] for c in s["committed"]]
                    != sorted(c["pos"] for s in b["steps"] for c in s["committed"]) for b in res["trace"]),
        no_eos=EOS_ID not in ids,
        anyres_downscale=any(e.get("times", 0) > 1.1 for e in img_entries),
        pad_mode=any(e["mode"] == "pad" for e in img_entries),
    )
    g = dict(
        format="tiny-siglip-golden/1", case=name, model="tiny-siglip",
        inputs=dict(images=files, question=question, gen_length=G, steps=steps, block_size=BLOCK,
                    strategy=strategy, threshold=threshold, temperature=0.0, top_k=0, top_p=1.0),
        constants=dict(mask_id=MASK_ID, eos_id=EOS_ID, image_placeholder_id=IMAGE_TOKEN_INDEX),
        prompt_text=text, prompt_ids=prompt_ids, n_prompt_ids=len(prompt_ids), images=img_entries,
        n_tiles=sum(e["n_tiles"] for e in img_entries),
        n_image_tokens=sum(e["n_image_tokens"] for e in img_entries), prompt_rows=P, gen_length=G,
        total_length=res["total_length"], nblocks=res["nblocks"], prefill_blocks=res["prefill_blocks"],
        prefill_length=res["prefill_length"], trace=res["trace"], ids=ids,
        stopped_at_eos=res["stopped_at_eos"], forward_passes=res["forward_passes"], text=text_out,
        properties=props, robustness=robustness,
        reference_checks=dict(numpy_cached_decoder_max_abs_logit_diff=worst[0],
                              numpy_siglip_max_abs_diff=sig_diff),
        tensors=f"{name}.safetensors",
    )
    with open(os.path.join(out_dir, f"{name}.json"), "w") as f:
        json.dump(g, f, indent=1)
    print(f"{name}: P={P} tiles={g['n_tiles']} image_tokens={g['n_image_tokens']} passes={res['forward_passes']}"
          f" eos={res['stopped_at_eos']} props={props} robust={robustness} checks={g['reference_checks']}",
          flush=True)
    return g


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    repo = os.path.dirname(os.path.dirname(here))
    shared = os.path.join(os.path.dirname(repo), "shared", "fixtures")
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(repo, "tests", "fixtures", "tiny-siglip"))
    ap.add_argument("--images", default=os.path.join(shared, "images"))
    ap.add_argument("--tokenizer", default=os.path.join(shared, "tokenizer", "tokenizer.json"))
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--cases", default="", help="comma-separated subset")
    args = ap.parse_args()
    import PIL
    major, minor = (int(x) for x in PIL.__version__.split(".")[:2])
    if (major, minor) > (12, 1):
        sys.exit(f"Pillow {PIL.__version__}: use Pillow <= 12.1 (bicubic pass order, see engine images/resize.rs)")
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    out = args.out
    gold = os.path.join(out, "golden")
    img_out = os.path.join(out, "images")
    os.makedirs(gold, exist_ok=True)
    os.makedirs(img_out, exist_ok=True)

    weights, vcfg = build_weights(args.seed)
    save_checkpoint(out, weights, config_json(vcfg))

    # A derived image large enough for a 3×2 grid whose unpadded map is downscaled (times > 1.1).
    big = load_image(os.path.join(args.images, "chelsea.png")).resize((800, 500), Image.BICUBIC)
    big.save(os.path.join(img_out, "chelsea_800x500.png"), optimize=True)

    # Case images the repository does not ship (tests/fixtures/images) are copied beside the
    # fixture so that fresh clones find them.
    repo_images = os.path.join(repo, "tests", "fixtures", "images")
    for case in CASES:
        for f in case[1]:
            src = os.path.join(args.images, f)
            if os.path.exists(src) and not os.path.exists(os.path.join(repo_images, f)):
                shutil.copyfile(src, os.path.join(img_out, f))

    def find_image(f):
        for d in (img_out, args.images):
            if os.path.exists(os.path.join(d, f)):
                return os.path.join(d, f)
        raise FileNotFoundError(f)

    # The Qwen2.5 tokenizer: a link to the copy the repository ships (not another 8 MB).
    tok_link = os.path.join(out, "tokenizer.json")
    if not os.path.lexists(tok_link):
        os.symlink(os.path.relpath(os.path.join(repo, "models", "tiny-dvl", "tokenizer.json"), out), tok_link)
    tok = Tokenizer.from_file(args.tokenizer)
    ref = Reference(weights, vcfg)
    ref32 = Reference(weights, vcfg, dtype=torch.float32)
    npdec = NumpyDecoder(weights)
    npdec32 = NumpyDecoder(weights, np.float32)
    wanted = set(args.cases.split(",")) if args.cases else None
    manifest = []
    for case in CASES:
        if wanted and case[0] not in wanted:
            continue
        g = run_case(ref, npdec, tok, find_image, case, gold, ref32, npdec32)
        manifest.append(dict(case=g["case"], json=f"golden/{g['case']}.json", images=g["inputs"]["images"],
                             strategy=g["inputs"]["strategy"], steps=g["inputs"]["steps"],
                             gen_length=g["gen_length"], n_tiles=g["n_tiles"],
                             n_image_tokens=g["n_image_tokens"], prompt_rows=g["prompt_rows"],
                             forward_passes=g["forward_passes"], stopped_at_eos=g["stopped_at_eos"],
                             fp32_identical=g["robustness"].get("fp32", {}).get("identical_trace")))
    if not wanted:
        with open(os.path.join(out, "manifest.json"), "w") as f:
            json.dump(dict(format="tiny-siglip-golden/1", seed=args.seed, text=TEXT, vision=VIS,
                           generator="tools/reference/siglip_golden.py", cases=manifest), f, indent=1)


if __name__ == "__main__":
    main()
