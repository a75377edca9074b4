"""A multi-turn chat through the model's chat template, offline.

    python examples/chat.py
"""
from runtime import LLM, SamplingParams

llm = LLM()
params = SamplingParams(max_tokens=48, temperature=0)
conversation = [{"role": "system", "content": "You are a concise assistant."},
                {"role": "user", "content": "What is the capital of France?"}]
reply = llm.chat(conversation, params)[0].outputs[0].text
print(f"assistant: {reply}")

conversation += [{"role": "assistant", "content": reply},
                 {"role": "user", "content": "And of Italy?"}]
print(f"assistant: {llm.chat(conversation, params)[0].outputs[0].text}")
