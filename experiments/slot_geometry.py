"""How different are a prefix prompt's K slots from one another, and what does refinement change in them?

    python experiments/slot_geometry.py --pgm pgms/smollm2-compressed-ce-answers --targets runs/prompt-targets-84
        --tasks anachronisms,social_iqa [--name slot_geometry]

For each task, the PGM's one-pass prompt from the 16 shots its prompt target was refined on (`peft-metal
prompt-targets`; without `--targets`, 16 shots drawn with seed 0), and, with `--targets`, the target minus that
prompt (what refinement adds). Per layer, keys and values are a K x (heads x head-dim) matrix; reported, averaged over
layers and tasks: the share of its squared norm in the mean over the K slots (1: every slot the same), and its
effective rank (exp of the entropy of the normalized squared singular values; K at most). Writes `<name>.json` and
`.md` under benchmarks/results.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import benchmarks_path  # noqa: F401  (benchmarks/ on the path: report.py, timing.py, task_carrying.py)
import torch
from prompt_target_gap import draws_of  # experiments/prompt_target_gap.py: the target's own draw of shots
from report import provenance, write_report  # benchmarks/report.py: the JSON + markdown every benchmark leaves

import peft_metal  # noqa: F401
from peft_metal.base_models import load_base_model
from peft_metal.evaluation import load_eval_tasks
from peft_metal.pgm import attach_pgm
from peft_metal.precision import cast_frozen_weights
from peft_metal.training.prompt_targets import MANIFEST, load_prompt_targets


def slot_matrices(tensor: torch.Tensor) -> torch.Tensor:
    """layers x kv-heads x K x head-dim -> layers x K x (kv-heads x head-dim)."""
    layers, heads, slots, dim = tensor.shape
    return tensor.float().permute(0, 2, 1, 3).reshape(layers, slots, heads * dim)


def geometry(tensor: torch.Tensor) -> dict[str, float]:
    """Share of the squared norm in the slots' mean, and effective rank, each averaged over layers."""
    matrices = slot_matrices(tensor)
    slots = matrices.shape[1]
    mean_share = slots * matrices.mean(dim=1).pow(2).sum(-1) / matrices.pow(2).sum(dim=(1, 2))
    energy = torch.linalg.svdvals(matrices).pow(2)
    energy = energy / energy.sum(-1, keepdim=True)
    rank = torch.exp(-(energy * torch.log(energy.clamp_min(1e-12))).sum(-1))
    return {"mean_share": mean_share.mean().item(), "effective_rank": rank.mean().item()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--pgm", type=Path, required=True, help="a saved prefix-design PGM folder")
    parser.add_argument("--tasks", required=True, help="comma-separated train tasks (with targets when --targets)")
    parser.add_argument("--targets", type=Path, help="a folder of `peft-metal prompt-targets` made from this PGM")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--output", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--name", default="slot_geometry")
    args = parser.parse_args()

    lm, tokenizer = load_base_model(args.model)
    model = attach_pgm(lm, str(args.pgm)).eval()
    precision = cast_frozen_weights(model, "auto")
    if model.base_model.metal_config.prompt_design != "prefix":
        raise SystemExit(f"{args.pgm} makes {model.base_model.metal_config.prompt_design} prompts, not prefix ones.")
    settings = json.loads((args.targets / MANIFEST).read_text()) if args.targets else {"shots": 16, "seed": 0}
    tasks = load_eval_tasks(args.tasks.split(","))
    targets = load_prompt_targets(args.targets, [task.name for task in tasks], model.base_model) if args.targets else {}
    rows: dict[tuple[str, str], list[dict[str, float]]] = {}
    for task in tasks:
        shots = draws_of(task, settings["shots"], 0, settings["seed"])[0]
        with torch.no_grad():
            prompt = model.generate_prompt([example.as_shot() for example in shots], tokenizer)
        made = {"one pass": {name: getattr(prompt, name).float() for name in ("keys", "values")}}
        if task.name in targets:
            made["target"] = targets[task.name]
            made["target minus one pass"] = {name: targets[task.name][name] - made["one pass"][name] for name in made["one pass"]}
        for kind, tensors in made.items():
            for name, tensor in tensors.items():
                rows.setdefault((kind, name), []).append(geometry(tensor))
        print(f"{task.name}: done", flush=True)

    table = [
        {"prompt": kind, "tensor": name, **{key: sum(r[key] for r in found) / len(found) for key in found[0]}}
        for (kind, name), found in rows.items()
    ]
    slots = model.base_model.metal_config.num_prompt_tokens
    lines = [
        f"Slot geometry of `{args.pgm}`'s prompts ({slots} slots) on {len(args.tasks.split(','))} train tasks, "
        f"{precision} frozen weights; averaged over layers and tasks (mean share 1: all slots alike; effective rank "
        f"at most {slots}).",
        "",
        "| prompt | tensor | share in the slots' mean | effective rank |",
        "|---|---|---|---|",
        *(f"| {r['prompt']} | {r['tensor']} | {r['mean_share']:.3f} | {r['effective_rank']:.2f} |" for r in table),
    ]
    report = {**provenance(), "pgm": str(args.pgm), "targets": str(args.targets), "precision": precision, "rows": table}
    write_report(args.output, args.name, report, lines)


if __name__ == "__main__":
    main()
