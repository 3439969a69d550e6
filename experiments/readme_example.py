"""Does a PGM answer the README's own example right? The quickstart's four one-line reviews as shots, then seven short
reviews of our own as queries, each answered greedily with one token, as the quickstart does. A PGM that leans to
one label on short sentiment inputs (the mix probe's PGM answered "negative" to all seven) fails here before any
panel shows it; a ship candidate must answer all seven.

    python experiments/readme_example.py PGM [PGM ...] [--name readme_example]

Writes `<name>.json` and `.md` under benchmarks/results/metaicl.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py)
import torch
from report import machine_description, write_report

from peft_metal import load_pretrained_pgm

SHOTS = [("Great film!", "positive"), ("Boring.", "negative"), ("Loved it.", "positive"), ("A waste of time.", "negative")]
QUERIES = [
    ("What a delight.", "positive"), ("Painfully dull.", "negative"), ("I would watch it again.", "positive"),
    ("Terrible acting.", "negative"), ("A masterpiece.", "positive"), ("Not worth the ticket.", "negative"),
    ("Charming and funny.", "positive"),
]


def answers_of(pgm: str) -> list[str]:
    """The one-token greedy answer to each query after the prompt the PGM makes from the README's shots."""
    model, tokenizer = load_pretrained_pgm("smollm2-135m", pgm=pgm)
    with torch.no_grad():
        prompt = model.generate_prompt(SHOTS, tokenizer=tokenizer)
        queries = [model.base_model.template.format_query(text) for text, _ in QUERIES]
        batch = tokenizer(queries, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        out = model.generate(prompt=prompt, input_ids=batch.input_ids, attention_mask=batch.attention_mask,
                             max_new_tokens=1, do_sample=False)
    return [answer.strip() for answer in tokenizer.batch_decode(out[:, batch.input_ids.shape[1]:], skip_special_tokens=True)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("pgms", nargs="+", help="saved PGM folders (a run's checkpoint-N/pgm, or pgms/...)")
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results/metaicl"))
    parser.add_argument("--name", default="readme_example")
    args = parser.parse_args()

    gold = [label for _, label in QUERIES]
    rows = []
    for pgm in args.pgms:
        answers = answers_of(pgm)
        rows.append({"pgm": pgm, "answers": answers, "right": sum(a == g for a, g in zip(answers, gold))})
    report = {"shots": SHOTS, "queries": QUERIES, "pgms": rows, "machine": machine_description()}
    lines = [f"The README's four shots, {len(QUERIES)} queries, one greedy token each ({machine_description()}).", "",
             "| PGM | right | answers |", "|---|---|---|"]
    lines += [f"| `{row['pgm']}` | {row['right']} / {len(gold)} | {', '.join(row['answers'])} |" for row in rows]
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
