"""The `openai` client against `peft-metal serve`: store a prompt made from a task's shots, then ask for completions.

    PEFT_METAL_API_KEY=... python examples/serve/client.py [--url http://127.0.0.1:8000] [--base-model smollm2-135m]
"""

from __future__ import annotations

import argparse
import os

import httpx
from openai import OpenAI

SHOTS = [
    {"input": "A gripping, beautifully acted film.", "output": "positive"},
    {"input": "Dull from start to finish.", "output": "negative"},
    {"input": "I laughed the whole way through.", "output": "positive"},
    {"input": "A waste of two hours.", "output": "negative"},
]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", default="http://127.0.0.1:8000", help="where `peft-metal serve` listens")
    parser.add_argument("--base-model", default="smollm2-135m", help="the server's --model")
    args = parser.parse_args(argv)
    key = os.environ.get("PEFT_METAL_API_KEY", "none")  # a server started without a key takes any

    # The prompt is made once per task and stored; the OpenAI API has no such call, so it is a plain POST.
    created = httpx.post(
        f"{args.url}/v1/prompts", json={"task": "sentiment", "shots": SHOTS},
        headers={"Authorization": f"Bearer {key}"}, timeout=600,
    )
    created.raise_for_status()
    model = created.json()["model"]  # "metal:<prompt_id>"
    print(f"stored prompt: {model}")

    client = OpenAI(base_url=f"{args.url}/v1", api_key=key)
    text = client.completions.create(
        model=model, prompt="Input: What a ride!\nOutput:", max_tokens=3, temperature=0, stop=["\n"]
    )
    print(f"after the prompt: {text.choices[0].text!r}")
    scored = client.completions.create(
        model=model, prompt="What a ride!",
        extra_body={"options": ["positive", "negative"], "template": True},  # peft-metal's option scoring
    )
    print(f"options: {scored.choices[0].text!r}")
    plain = client.completions.create(model=args.base_model, prompt="Input: What a ride!\nOutput:", max_tokens=3,
                                      temperature=0)
    print(f"the base model alone: {plain.choices[0].text!r}")
    print("client done")


if __name__ == "__main__":
    main()
