"""Ask a vision-language model (Qwen2-VL) about an image, offline.

No checkpoint is downloaded: this makes a tiny random Qwen2-VL with transformers (``from_config`` +
``save_pretrained``), so the answer is noise, but every step is the real one: the image is split
into patches, run through the compiled vision encoder and merged into the prompt. Point ``LLM`` at a
real checkpoint directory (e.g. Qwen2-VL-2B-Instruct) for real answers.

    python examples/vision_request.py
"""
import tempfile

import torch

from models.vision_testing import write_tiny_qwen2_vl_checkpoint, write_tiny_qwen2_vl_tokenizer
from runtime import LLM, SamplingParams

checkpoint = write_tiny_qwen2_vl_checkpoint(tempfile.mkdtemp(prefix="tiny-qwen2-vl-"))
write_tiny_qwen2_vl_tokenizer(checkpoint)
llm = LLM(checkpoint, dtype="float32", max_model_len=512, max_image_patches=1024)

image = torch.randint(0, 256, (112, 168, 3), dtype=torch.uint8)  # HWC; file paths and data: URLs work too
prompt = {"prompt": "<|vision_start|><|image_pad|><|vision_end|>What is in the picture?", "images": [image]}
output = llm.generate(prompt, SamplingParams(max_tokens=8, temperature=0))[0]
print(f"{len(output.prompt_token_ids)} prompt tokens (the image placeholder became one token per merged patch)")
print(f"generated token ids: {output.outputs[0].token_ids}")
