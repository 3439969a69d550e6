"""Per-task prompt-learning baselines, trained by PEFT on the same k shots the other methods get.

* `prompt_tuning`: `peft.PromptTuningConfig`, K soft tokens initialized from a text (default) or at random.
* `p_tuning`: `peft.PromptEncoderConfig`, K virtual tokens through an MLP (default) or LSTM reparameterization.
* `prefix_tuning`: `peft.PrefixTuningConfig`, K positions of keys/values in every layer.

K (`num_virtual_tokens`) is the PGM's `num_prompt_tokens` by default, so every soft prompt has the length of the
generated one (16, MetaL-Prompt's default, when there is no PGM).

Training: `steps` Adam steps (default 50) on the LM loss of the answers given the queries of the shots, in the one
format every method uses (`ShotTemplate.format_query` + `format_answer`, labels on the answer only: `encode_queries`),
over seeded minibatches of `batch_size` shots, as `model.refine_prompt` does. Default learning rates (`DEFAULT_LRS`),
chosen for the 50-step budget: 3e-2 for prompt tuning (soft embeddings move little at smaller rates), 1e-3 for
p-tuning (its MLP/LSTM reparameterization is sensitive), 1e-2 for prefix tuning (PEFT starts the keys/values at N(0, 1),
far from anything the LM produces: on SmolLM2-135M, 16 shots of cause_and_effect, the loss went 11.2 -> 5.9 in 50
steps at 1e-3 but 11.2 -> 0.9 at 1e-2; prompt tuning at 3e-2 went 4.0 -> 2.1, p-tuning at 1e-3 4.3 -> 2.5).
The LM stays in eval mode (no dropout), as when it reads any other prompt. `encode_queries` left-pads; PEFT's
prompt-learning forward ignores `position_ids`, so the batch is turned into a right-padded one (padding after every
real token, which the causal attention never lets a real token see) and each shot's tokens get the positions they will
have at scoring.

The wrapped model is the *plain* base LM: the PGM's base model carries MetaL's LoRA layers (off outside the PGM pass),
and wrapping it in a second `PeftModel` would warn "modify a model with PEFT for a second time" and freeze the LoRA
weights (PEFT sets `requires_grad=False` on every base parameter). So each baseline wraps a structural copy of the LM
(`plain_lm_copy`): new module objects, the same parameter tensors (no weight is copied), PEFT tuner layers replaced by
their base layers. The PGM's modules, LoRA weights and LoRA on/off state are never touched; the shared base weights
are frozen (as they always are) and their `requires_grad` flags are restored after training.

Scoring: the PEFT model's own forward reads the query (it prepends the virtual tokens, or the prefix as a cache,
itself) and returns its keys/values and last logits as an `inference.Context`; the options are then scored and greedy
decoding runs from that context exactly as for every other method (`inference.score_options`, `inference.generate`).
"""

from __future__ import annotations

import copy
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from peft import (
    PeftModel,
    PrefixTuningConfig,
    PromptEncoderConfig,
    PromptEncoderReparameterizationType,
    PromptLearningConfig,
    PromptTuningConfig,
    PromptTuningInit,
    get_peft_model,
)
from peft.tuners.tuners_utils import BaseTunerLayer
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from ..compat import cache_layers, peft_wrapping_quietly, returned_cache
from ..inference import Context, check_fits, model_device
from ..metal_prompt.queries import QueryBatch, encode_queries
from ..metal_prompt.template import Shot, ShotTemplate
from .timing import synchronize

PROMPT_TUNING = "prompt_tuning"
P_TUNING = "p_tuning"
PREFIX_TUNING = "prefix_tuning"
BASELINE_METHODS = (PROMPT_TUNING, P_TUNING, PREFIX_TUNING)

DEFAULT_BASELINE_STEPS = 50
DEFAULT_LRS = {PROMPT_TUNING: 3e-2, P_TUNING: 1e-3, PREFIX_TUNING: 1e-2}
DEFAULT_BATCH_SIZE = 8
DEFAULT_NUM_VIRTUAL_TOKENS = 16  # MetaLPromptConfig.num_prompt_tokens's default, used when there is no PGM
DEFAULT_INIT_TEXT = "Read the input and write the output, following the examples."
PROMPT_TUNING_INITS = ("text", "random", "sample_vocab")
P_TUNING_ENCODERS = ("MLP", "LSTM")


@dataclass
class BaselineOptions:
    """How the prompt-learning baselines are built and trained (one set for all three; `lr=None`: per method)."""

    steps: int = DEFAULT_BASELINE_STEPS
    lr: Optional[float] = None
    batch_size: int = DEFAULT_BATCH_SIZE
    num_virtual_tokens: Optional[int] = None  # None: the PGM's K
    prompt_tuning_init: str = "text"
    prompt_tuning_init_text: str = DEFAULT_INIT_TEXT
    p_tuning_encoder: str = "MLP"
    p_tuning_hidden_size: Optional[int] = None  # None: PEFT's default (the LM's hidden size)
    prefix_projection: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 0), ("batch_size", 1)):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"baseline {name} must be an int, got {type(value).__name__}.")
            if value < minimum:
                raise ValueError(f"baseline {name} must be >= {minimum}, got {value}.")
        if self.num_virtual_tokens is not None and (
            isinstance(self.num_virtual_tokens, bool) or not isinstance(self.num_virtual_tokens, int)
            or self.num_virtual_tokens < 1
        ):
            raise ValueError(f"num_virtual_tokens must be a positive int or None, got {self.num_virtual_tokens!r}.")
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"baseline lr must be > 0 (or None for the per-method default), got {self.lr}.")
        if self.prompt_tuning_init not in PROMPT_TUNING_INITS:
            raise ValueError(f"prompt_tuning_init must be one of {PROMPT_TUNING_INITS}, got {self.prompt_tuning_init!r}.")
        if self.prompt_tuning_init == "text" and not self.prompt_tuning_init_text:
            raise ValueError("prompt_tuning_init='text' needs a non-empty prompt_tuning_init_text.")
        if self.p_tuning_encoder not in P_TUNING_ENCODERS:
            raise ValueError(f"p_tuning_encoder must be one of {P_TUNING_ENCODERS}, got {self.p_tuning_encoder!r}.")

    def lr_for(self, method: str) -> float:
        return self.lr if self.lr is not None else DEFAULT_LRS[method]


@dataclass
class TrainedBaseline:
    """A PEFT prompt-learning model trained on one task's shots, and what training it cost."""

    method: str
    model: PeftModel
    num_virtual_tokens: int
    losses: list[float]
    seconds: float


def plain_lm_copy(lm: PreTrainedModel) -> PreTrainedModel:
    """`lm` as a separate module tree over the same parameter tensors, without PEFT tuner layers.

    Modules (and small buffers such as rotary tables) are copied; every parameter is shared, so no weight is
    duplicated. Tuner layers (MetaL's LoRA) are replaced by the layer they wrap and the tuner's `peft_config`
    attribute is dropped, so the copy is the plain LM that PEFT can wrap as if it were fresh.
    """
    memo = {id(parameter): parameter for parameter in lm.parameters()}
    plain = copy.deepcopy(lm, memo)
    for name, module in list(plain.named_modules()):
        if isinstance(module, BaseTunerLayer):
            parent_name, _, child = name.rpartition(".")
            parent = plain.get_submodule(parent_name) if parent_name else plain
            setattr(parent, child, module.get_base_layer())
    if "peft_config" in plain.__dict__:
        del plain.peft_config
    return plain


def num_virtual_tokens_for(options: BaselineOptions, pgm_tokens: Optional[int]) -> int:
    if options.num_virtual_tokens is not None:
        return options.num_virtual_tokens
    return pgm_tokens if pgm_tokens is not None else DEFAULT_NUM_VIRTUAL_TOKENS


def peft_config_for(
    method: str, options: BaselineOptions, num_virtual_tokens: int, tokenizer_path: Optional[str] = None
) -> PromptLearningConfig:
    """PEFT's config for `method` (prompt tuning from text needs a tokenizer PEFT can load: `tokenizer_path`)."""
    if method == PROMPT_TUNING:
        init = PromptTuningInit[options.prompt_tuning_init.upper()]
        text = {}
        if init == PromptTuningInit.TEXT:
            if tokenizer_path is None:
                raise ValueError("Prompt tuning from text needs the tokenizer saved where PEFT can load it.")
            text = dict(prompt_tuning_init_text=options.prompt_tuning_init_text, tokenizer_name_or_path=tokenizer_path)
        return PromptTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prompt_tuning_init=init, **text
        )
    if method == P_TUNING:
        hidden = {} if options.p_tuning_hidden_size is None else {"encoder_hidden_size": options.p_tuning_hidden_size}
        return PromptEncoderConfig(
            task_type="CAUSAL_LM",
            num_virtual_tokens=num_virtual_tokens,
            encoder_reparameterization_type=PromptEncoderReparameterizationType[options.p_tuning_encoder],
            **hidden,
        )
    if method == PREFIX_TUNING:
        return PrefixTuningConfig(
            task_type="CAUSAL_LM", num_virtual_tokens=num_virtual_tokens, prefix_projection=options.prefix_projection
        )
    raise ValueError(f"Unknown baseline {method!r}; known: {', '.join(BASELINE_METHODS)}.")


def right_padded(batch: QueryBatch) -> QueryBatch:
    """The same rows with their padding moved from the left to the right (labels -100 there, mask 0)."""
    rows = []
    for tensor in (batch.input_ids, batch.attention_mask, batch.labels):
        rows.append(torch.stack([t.roll(-int((m == 0).sum())) for t, m in zip(tensor, batch.attention_mask)]))
    return QueryBatch(*rows)


def train_baseline(
    method: str,
    lm: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    shots: Sequence[Shot],
    options: Optional[BaselineOptions] = None,
    seed: int = 0,
    pgm_tokens: Optional[int] = None,
) -> TrainedBaseline:
    """A PEFT `method` model over the plain copy of `lm`, trained `options.steps` Adam steps on `shots`.

    `seconds` is the wall time from wrapping the LM to the trained prompt (the cost of creating the task's prompt);
    `losses` the minibatch loss before each step. The prompt encoder's initialization and the minibatch order are
    seeded by `seed` without touching the global RNG. `lm` is never modified.
    """
    options = options or BaselineOptions()
    if method not in BASELINE_METHODS:
        raise ValueError(f"Unknown baseline {method!r}; known: {', '.join(BASELINE_METHODS)}.")
    shots = list(shots)
    if not shots:
        raise ValueError(f"Baseline {method!r} trains on the shots: it needs at least one.")
    tokens = num_virtual_tokens_for(options, pgm_tokens)
    device = model_device(lm)
    flags = [(parameter, parameter.requires_grad) for parameter in lm.parameters()]
    with tempfile.TemporaryDirectory(prefix="peft-metal-tokenizer-") as folder:
        tokenizer_path = None
        if method == PROMPT_TUNING and options.prompt_tuning_init == "text":
            tokenizer.save_pretrained(folder)  # PEFT loads the tokenizer by path to tokenize the init text
            tokenizer_path = folder
        config = peft_config_for(method, options, tokens, tokenizer_path)
        synchronize(device)
        start = time.perf_counter()
        try:
            with torch.random.fork_rng(devices=[]), peft_wrapping_quietly():
                torch.manual_seed(seed)
                model = get_peft_model(plain_lm_copy(lm), config).eval()
            for parameter, _ in flags:  # the base weights are frozen (PEFT did so for the copy's; shared anyway)
                parameter.requires_grad_(False)
            for parameter in model.parameters():  # what trains keeps fp32 master weights over a bf16 base
                if parameter.requires_grad and parameter.is_floating_point():
                    parameter.data = parameter.data.float()
            losses = _train(model, tokenizer, template, shots, options.steps, options.lr_for(method),
                            options.batch_size, seed, device)
        finally:
            for parameter, flag in flags:
                parameter.requires_grad_(flag)
        synchronize(device)
        seconds = time.perf_counter() - start
    model.prompt_encoder.requires_grad_(False)  # trained: only read from now on
    return TrainedBaseline(method, model, tokens, losses, seconds)


def _train(
    model: PeftModel,
    tokenizer: PreTrainedTokenizerBase,
    template: ShotTemplate,
    shots: list[Shot],
    steps: int,
    lr: float,
    batch_size: int,
    seed: int,
    device: torch.device,
) -> list[float]:
    parameters = [parameter for parameter in model.parameters() if parameter.requires_grad]
    optimizer = torch.optim.Adam(parameters, lr=lr)
    order = random.Random(seed)
    losses = []
    with torch.enable_grad():
        for _ in range(steps):
            batch = right_padded(encode_queries(order.sample(shots, min(batch_size, len(shots))), tokenizer, template, device))
            loss = model(input_ids=batch.input_ids, attention_mask=batch.attention_mask, labels=batch.labels).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def baseline_context(baseline: TrainedBaseline, token_ids: Sequence[int]) -> Context:
    """The PEFT model reading [virtual tokens][token_ids] with its own forward: the LM's keys/values over all of it
    and the next-token logits, as a `Context` that options and greedy decoding continue like any other."""
    token_ids = list(token_ids)
    if not token_ids:
        raise ValueError("The PEFT model needs at least one token to read after its virtual tokens.")
    lm = baseline.model.get_base_model()
    check_fits(lm, baseline.num_virtual_tokens, len(token_ids))
    device = model_device(lm)
    input_ids = torch.tensor([token_ids], dtype=torch.long, device=device)
    outputs = baseline.model(input_ids=input_ids, attention_mask=torch.ones_like(input_ids), use_cache=True)
    layers = cache_layers(returned_cache(outputs))
    return Context(layers=layers, length=layers[0][0].shape[-2], last_logits=outputs.logits[0, -1].float())
