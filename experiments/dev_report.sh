#!/usr/bin/env bash
# Every dev-family figure in docs/results.md, for one PGM, from one command:
#   bash experiments/dev_report.sh [PGM_DIR_OR_HUB_ID] [OUTPUT_DIR]
# Dev families only (peft_metal/data/bigbench_splits.json); reserved families are refused by the loaders.
set -euo pipefail
PGM=${1:-pgms/smollm2-discrete-k8}  # the PGM of docs/results.md's dev tables (shipped until 2026-11-30)
OUT=${2:-benchmarks/results}
DEV_TASKS=phrase_relatedness,similarities_abstraction,cause_and_effect/one_sentence,snarks,swahili_english_proverbs,code_line_description
LARGE_DEV_TASKS=reasoning_about_colored_objects,unit_conversion/si_conversion,unit_conversion/unit_identification,bbq_lite_json/age_ambig
mkdir -p "$OUT"

# MetaL-Prompt against zero-shot and ICL-16 on the same seeded shots and queries
peft-metal eval --model smollm2-135m --pgm "$PGM" --tasks "$DEV_TASKS" --shots 16 --queries 30 \
    --methods zero_shot,icl,metal,metal+demos --seed 0 --no-progress --output "$OUT/dev_main.json"
# Gradient refinement: dev accuracy against refinement steps (0 = the generated prompt as it is)
peft-metal eval --model smollm2-135m --pgm "$PGM" --tasks "$DEV_TASKS" --shots 16 --queries 30 \
    --methods metal+refine --refine-steps 0,5,10,20 --refine-lr 1e-3 --seed 0 --no-progress --output "$OUT/dev_refine.json"
# One PGM for many shot counts: |XP| x |XL|
python experiments/shot_counts.py --pgm "$PGM" --tasks "$DEV_TASKS" --xp 4,8,16,32 --xl 0,4 --queries 30 \
    --output "$OUT/shot_counts.json"
# Iterative generation: more shots than fit the context, folded in chunk by chunk
python experiments/shot_counts.py --pgm "$PGM" --tasks "$LARGE_DEV_TASKS" --xp 16,64,256 --xl 0 --queries 30 \
    --output "$OUT/many_shots.json"
