"""Other libraries as clients of peft-metal; each module needs its library (an optional extra) and is imported only
when used: `lm_eval` (lm-evaluation-harness, `pip install peft-metal[lm-eval]`)."""
