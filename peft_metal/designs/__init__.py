"""The four prompt designs, looked up by the name used in `MetaLPromptConfig.prompt_design`."""

from .base import EMBEDDINGS, KEYS_VALUES, PGMReadout, PromptDesign
from .discrete import DiscreteDesign
from .hidden_state import HiddenStateDesign
from .prefix import PrefixDesign
from .weighted_sum import WeightedSumDesign

DESIGNS: dict[str, PromptDesign] = {
    design.name: design for design in (DiscreteDesign(), WeightedSumDesign(), HiddenStateDesign(), PrefixDesign())
}


def get_design(name: str) -> PromptDesign:
    if name not in DESIGNS:
        raise ValueError(f"Unknown prompt design {name!r}; choose one of {list(DESIGNS)}.")
    return DESIGNS[name]


__all__ = ["DESIGNS", "EMBEDDINGS", "KEYS_VALUES", "PGMReadout", "PromptDesign", "get_design"]
