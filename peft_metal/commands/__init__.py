"""The `peft-metal` subcommands, one module each: `add_parser` builds the subcommand's arguments beside `run`, its
handler; `peft_metal/cli.py` assembles them."""

from . import card, demo, evaluate, export, prompt, prompt_targets, serve, train

# In the order `peft-metal --help` lists them.
COMMANDS = (train, export, card, prompt, prompt_targets, evaluate, serve, demo)
