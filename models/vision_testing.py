"""Random Qwen2-VL checkpoints and encoder shapes for tests and benchmarks (no hub access)."""
from __future__ import annotations

import os
from typing import Any

import torch

TINY_IMAGE_TOKEN, TINY_VISION_START, TINY_VISION_END, TINY_VIDEO_TOKEN = 250, 251, 252, 253


def tiny_qwen2_vl_config(**vision_overrides: Any) -> Any:
    """A small Qwen2-VL: 2 decoder layers (hidden 64), 2 ViT blocks (width 32), 14-px patches, 2x2 merge."""
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, max_position_embeddings=1024, bos_token_id=1, eos_token_id=2,
                rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]})
    vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=4, mlp_ratio=2, patch_size=14,
                  spatial_merge_size=2, temporal_patch_size=2)
    vision.update(vision_overrides)
    config = Qwen2VLConfig(text_config=text, vision_config=vision, image_token_id=TINY_IMAGE_TOKEN,
                           vision_start_token_id=TINY_VISION_START, vision_end_token_id=TINY_VISION_END,
                           video_token_id=TINY_VIDEO_TOKEN)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return config


def write_tiny_qwen2_vl_checkpoint(directory: str, seed: int = 0) -> str:
    """A random transformers Qwen2-VL saved with ``save_pretrained`` (weights ~1 MB)."""
    from transformers import Qwen2VLForConditionalGeneration

    os.makedirs(directory, exist_ok=True)
    torch.manual_seed(seed)
    model = Qwen2VLForConditionalGeneration(tiny_qwen2_vl_config()).to(torch.float32)
    with torch.no_grad():  # default init is too flat to tell attention backends or positions apart
        for name, param in model.named_parameters():
            if param.dim() > 1:
                param.normal_(0.0, 0.1)
    model.save_pretrained(directory)
    return directory


def qwen2_vl_2b_vision_config() -> Any:
    """The Qwen2-VL-2B vision encoder's shape: 32 blocks, width 1280, 16 heads, output 1536."""
    from transformers.models.qwen2_vl.configuration_qwen2_vl import Qwen2VLVisionConfig

    return Qwen2VLVisionConfig(depth=32, embed_dim=1280, hidden_size=1536, num_heads=16, mlp_ratio=4, patch_size=14,
                               spatial_merge_size=2, temporal_patch_size=2, hidden_act="quick_gelu")


_TINY_CHAT_TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
                       "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def write_tiny_qwen2_vl_tokenizer(directory: str) -> str:
    """A word-level tokenizer for the tiny checkpoint: ids below 250 are words, 250..255 the specials
    (image pad, vision start/end, video pad, <|im_start|>, <|im_end|>), and a chat template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    chars = ["\n"] + [chr(c) for c in range(32, 127)]
    words = ["[UNK]"] + chars + [f"w{i}" for i in range(250 - 1 - len(chars))]
    vocab = {w: i for i, w in enumerate(words)}
    specials = {"<|image_pad|>": TINY_IMAGE_TOKEN, "<|vision_start|>": TINY_VISION_START,
                "<|vision_end|>": TINY_VISION_END, "<|video_pad|>": TINY_VIDEO_TOKEN, "<|im_start|>": 254,
                "<|im_end|>": 255}
    vocab.update(specials)
    tok = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Split("", "isolated")  # one character per token
    tok.add_special_tokens(list(specials))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", unk_token="[UNK]",
                                   pad_token="<|im_end|>")
    fast.chat_template = _TINY_CHAT_TEMPLATE
    fast.save_pretrained(directory)
    return directory


def qwen2_vl_2b_config() -> Any:
    """Qwen2-VL-2B's shape (decoder 28 layers, hidden 1536, 12/2 heads; the 2B vision encoder)."""
    from transformers import Qwen2VLConfig

    text = dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                num_attention_heads=12, num_key_value_heads=2, max_position_embeddings=32768, rms_norm_eps=1e-6,
                tie_word_embeddings=True,
                rope_parameters={"rope_type": "default", "rope_theta": 1000000.0, "mrope_section": [16, 24, 24]})
    config = Qwen2VLConfig(text_config=text, vision_config=qwen2_vl_2b_vision_config().to_dict(),
                           tie_word_embeddings=True)
    config.architectures = ["Qwen2VLForConditionalGeneration"]
    return config
