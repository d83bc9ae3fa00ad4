"""`tsq serve` from the official OpenAI Python client: the models listed, one chat answer whole
and the same answer streamed (greedy, so they agree). README's "Serving" shows it; the tests run
it against a server on the real SmolLM2.

    python scripts/serve_example.py http://127.0.0.1:8000/v1 MODEL "question" [API_KEY]

Prints one JSON line: {"models": [...], "answer": ..., "streamed": ..., "usage": {...}}.
"""

import json
import sys

from openai import OpenAI

base_url, model, question = sys.argv[1:4]
client = OpenAI(base_url=base_url, api_key=sys.argv[4] if len(sys.argv) > 4 else "none")

models = [m.id for m in client.models.list()]
messages = [{"role": "user", "content": question}]
answer = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
stream = client.chat.completions.create(
    model=model,
    messages=messages,
    max_tokens=12,
    temperature=0,
    stream=True,
    stream_options={"include_usage": True},
)
pieces, usage = [], None
for chunk in stream:
    pieces.extend(c.delta.content or "" for c in chunk.choices)
    usage = chunk.usage or usage
print(
    json.dumps(
        {
            "models": models,
            "answer": answer.choices[0].message.content,
            "streamed": "".join(pieces),
            "usage": usage.model_dump() if usage else None,
        }
    )
)
