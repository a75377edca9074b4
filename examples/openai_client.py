"""Stream a chat completion from a running server with the official openai client.

Start the server first (it serves the embedded SmolLM2 on 127.0.0.1:8000):

    python -m runtime.serve
    python examples/openai_client.py [BASE_URL]
"""
import sys

from openai import OpenAI

base_url = sys.argv[1] if len(sys.argv) > 1 else "http://127.0.0.1:8000/v1"
client = OpenAI(base_url=base_url, api_key="unused")  # the server checks a key only with --api-key
model = client.models.list().data[0].id

stream = client.chat.completions.create(
    model=model, messages=[{"role": "user", "content": "What is the capital of France?"}],
    max_tokens=32, stream=True)  # no sampling arguments: the model's recommended settings
for chunk in stream:
    if chunk.choices and chunk.choices[0].delta.content:
        print(chunk.choices[0].delta.content, end="", flush=True)
print()
