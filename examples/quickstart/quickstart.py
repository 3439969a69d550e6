"""Quickstart: turn a few sentiment examples into a prompt with each MetaL-Prompt design on SmolLM2-135M.

The PGM here is freshly initialized (LoRA B = 0, padding from real token embeddings), so the prompts show the
mechanics, not trained quality: the README's quickstart uses the shipped, meta-trained PGM
(`peft_metal.load_pretrained_pgm`), and `peft-metal train` meta-trains one.
"""

import time

import torch

from peft_metal import GeneratedPrompt, MetaLPromptConfig, get_peft_model  # registers MetaL-Prompt with PEFT
from peft_metal.base_models import load_base_model

SHOTS = [
    ("A gripping, beautifully acted film.", "positive"),
    ("Dull from start to finish.", "negative"),
    ("I laughed the whole way through.", "positive"),
    ("The plot makes no sense and the jokes fall flat.", "negative"),
    ("One of the best films of the year.", "positive"),
    ("A waste of two hours.", "negative"),
]
QUERIES = ["An absolute delight.", "Painfully boring."]


def main() -> None:
    torch.manual_seed(0)
    lm, tokenizer = load_base_model("smollm2-135m")
    for design in ("discrete", "weighted_sum", "hidden_state", "prefix"):
        model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=16))
        model.eval()
        start = time.perf_counter()
        with torch.no_grad():
            prompt = model.generate_prompt(SHOTS, tokenizer=tokenizer, num_demonstrations=2)
        seconds = time.perf_counter() - start
        prompt.save(f"/tmp/quickstart-{design}.safetensors")
        prompt = GeneratedPrompt.load(f"/tmp/quickstart-{design}.safetensors")

        template = model.base_model.template
        queries = tokenizer(
            [template.format_query(q) for q in QUERIES], return_tensors="pt", padding=True, padding_side="left",
            add_special_tokens=False,
        )
        with torch.no_grad():
            output = model.generate(
                prompt=prompt, input_ids=queries.input_ids, attention_mask=queries.attention_mask,
                max_new_tokens=3, do_sample=False,
            )
        answers = tokenizer.batch_decode(output[:, queries.input_ids.shape[1]:], skip_special_tokens=True)
        shown = f" text={prompt.text!r}" if prompt.text is not None else ""
        print(f"[{design}] prompt of {prompt.num_tokens} positions in {seconds * 1000:.0f} ms{shown}")
        for query, answer in zip(QUERIES, answers):
            print(f"    {query!r} -> {answer.strip()!r}")
        lm = model.base_model.remove_pgm()  # the LM back, without this PGM, for the next design
    print("quickstart done: 4 designs generated, saved, reloaded and read by SmolLM2-135M")


if __name__ == "__main__":
    main()
