"""Shared fixtures for the core tests: a tiny char-level tokenizer and tiny random causal LMs of four families.

Everything here is built in memory (no network, no downloads). Models are seeded, so two calls of `make_lm` with the
same arguments give bit-identical weights: one can be wrapped into a PGM while the other serves as the untouched
reference LM.
"""

from __future__ import annotations

import json
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from peft.tuners.tuners_utils import BaseTunerLayer
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    GemmaConfig,
    GemmaForCausalLM,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen2ForCausalLM,
)

import peft_metal  # noqa: F401  (registers METAL_PROMPT with PEFT)
from peft_metal import MetaLPromptConfig, get_peft_model
from peft_metal.compat import cache_kwargs, returned_cache
from peft_metal.data import Example, Task
from peft_metal.data.bigbench import TASKS_ENV, bigbench_root
from peft_metal.data.corpora import DATA_ENV, corpus_dir
from peft_metal.training import MetaTrainer, TrainingArguments

VOCAB_SIZE = 128
MAX_POSITIONS = 256
PAD_ID = 1
FAMILIES = ("llama", "gpt2", "qwen2", "gemma")
DESIGNS = tuple(peft_metal.designs.DESIGNS)
SCOPES = ("all", "padding")
K = 4  # prompt tokens used by most tests

# The few tests that read BIG-bench's own tasks need a clone's task folders ($PEFT_METAL_BIGBENCH_TASKS); the package
# that carried them is no longer served.
def _has_bigbench() -> bool:
    try:
        bigbench_root()
    except FileNotFoundError:
        return False
    return True


requires_bigbench = pytest.mark.skipif(
    not _has_bigbench(), reason=f"reads BIG-bench's own tasks: needs {TASKS_ENV} (a clone's bigbench/benchmark_tasks)"
)


def _corpus(name: str) -> Path | None:
    try:
        return corpus_dir(name)
    except FileNotFoundError:
        return None


# The tests that read the task corpora (MetaICL's tasks, the BIG-bench-format tasks) find them through
# $PEFT_METAL_DATA, which the Makefile points at ../shared; without it they are skipped, saying so.
METAICL_DIR, TASKS_DIR = _corpus("metaicl"), _corpus("tasks")
requires_metaicl = pytest.mark.skipif(METAICL_DIR is None, reason=f"reads MetaICL's tasks: needs {DATA_ENV}/metaicl")
requires_tasks = pytest.mark.skipif(
    TASKS_DIR is None, reason=f"reads the BIG-bench-format task corpus: needs {DATA_ENV}/tasks"
)


SHOTS = [("good movie", "positive"), ("bad film", "negative"), ("great", "positive")]
QUERIES = ["Input: nice\nOutput:", "Input: awful film\nOutput:"]
# The shots the serving tests send, as the API's JSON objects.
SERVED_SHOTS = [
    {"input": "good movie", "output": "positive"},
    {"input": "bad film", "output": "negative"},
    {"input": "great", "output": "positive"},
    {"input": "awful", "output": "negative"},
]


def build_tokenizer() -> PreTrainedTokenizerFast:
    """One token per character: printable ASCII keeps its code point, newline is 127, <unk> 0, <pad> 1."""
    vocab = {chr(i): i for i in range(32, 127)}
    vocab["\n"] = 127
    vocab["<unk>"] = 0
    vocab["<pad>"] = PAD_ID
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split("", "isolated")
    return PreTrainedTokenizerFast(tokenizer_object=backend, unk_token="<unk>", pad_token="<pad>")


@pytest.fixture(autouse=True)
def _one_thread_for_tiny_models(request):
    """Tiny models (32-wide layers) run far faster on one thread than on several, and do not suffer when the machine
    is shared: the core tests and every module marked `pytest.mark.one_thread` get one. Others keep torch's default."""
    if not (request.module.__name__.startswith("test_core_") or request.node.get_closest_marker("one_thread")):
        yield
        return
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tok() -> PreTrainedTokenizerFast:
    return build_tokenizer()


def _config(family: str, max_positions: int, **overrides: Any):
    common = dict(
        vocab_size=VOCAB_SIZE,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=max_positions,
        pad_token_id=PAD_ID,
        bos_token_id=2,
        eos_token_id=3,
        initializer_range=0.1,
    )
    if family == "llama":
        return LlamaForCausalLM, LlamaConfig(**{**common, **overrides})
    if family == "qwen2":
        return Qwen2ForCausalLM, Qwen2Config(**{**common, "use_sliding_window": False, **overrides})
    if family == "gemma":
        return GemmaForCausalLM, GemmaConfig(**{**common, "head_dim": 8, **overrides})
    if family == "gpt2":
        gpt2 = dict(
            vocab_size=VOCAB_SIZE,
            n_embd=32,
            n_layer=2,
            n_head=4,
            n_positions=max_positions,
            pad_token_id=PAD_ID,
            bos_token_id=2,
            eos_token_id=3,
            initializer_range=0.1,
        )
        return GPT2LMHeadModel, GPT2Config(**{**gpt2, **overrides})
    raise ValueError(family)


def make_lm(family: str, seed: int = 0, max_positions: int = MAX_POSITIONS, **overrides: Any):
    """A tiny random causal LM in eval mode; same (family, seed, overrides) -> identical weights."""
    model_cls, config = _config(family, max_positions, **overrides)
    torch.manual_seed(seed)
    lm = model_cls(config).eval()
    # Never stop early: every generation test asks for an exact number of new tokens.
    lm.generation_config.eos_token_id = None
    lm.generation_config.pad_token_id = PAD_ID
    return lm


@pytest.fixture
def lm_factory():
    return make_lm


def make_pgm(family: str, design: str, seed: int = 0, lm=None, **config_kwargs: Any):
    """`get_peft_model` over a fresh tiny LM (eval mode); returns the PeftModel. The package's own, which is PEFT's without
    transformers' checkpointing-rename warning at every call."""
    lm = make_lm(family, seed=seed) if lm is None else lm
    kwargs = dict(task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=K, r=4, init_lora_weights=False)
    kwargs.update(config_kwargs)
    torch.manual_seed(1234)  # LoRA init
    return get_peft_model(lm, MetaLPromptConfig(**kwargs)).eval()


@pytest.fixture
def pgm_factory():
    return make_pgm


@contextmanager
def lora_enabled(model) -> Iterator[None]:
    """Switch the LoRA layers on (as only the PGM pass does), without touching trainability."""
    layers = [m for m in model.modules() if isinstance(m, BaseTunerLayer)]
    previous = [m._disable_adapters for m in layers]
    for m in layers:
        m._disable_adapters = False
    try:
        yield
    finally:
        for m, flag in zip(layers, previous):
            m._disable_adapters = flag


def format_shots(shots) -> str:
    """The default shot template, written out independently of the library."""
    return "".join(f"Input: {x}\nOutput: {y}\n\n" for x, y in shots)


def encode(tok, text: str) -> torch.Tensor:
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"], dtype=torch.long)


def left_padded(tok, texts):
    return tok(texts, add_special_tokens=False, return_tensors="pt", padding=True, padding_side="left")


def train_on_a_labelled_task(output_dir: Path, **loss_weights: float) -> list[dict[str, Any]]:
    """Two steps of meta-training a tiny prefix PGM on one two-label task (train and dev), with the loss weights
    given; the run's log records. For tests of the terms that read a multiple-choice query's options."""
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
    vowel = Task("vowel", [Example(w, "yes" if w[0] in "aeiou" else "no", options=("no", "yes")) for w in words])
    args = TrainingArguments(
        output_dir=str(output_dir), prompt_design="prefix", lora_scope="padding", max_steps=2, learning_rate=1e-2,
        warmup_steps=1, gradient_accumulation_steps=2, xp_range=(1, 3), xl_range=(0, 1), num_queries=2,
        checkpoint_every=2, eval_every=2, log_every=1, gradient_from_answers_only=True, **loss_weights,
    )
    model = make_pgm("llama", "prefix", padding_reparameterization="mlp", lora_scope="padding")
    MetaTrainer(args, model=model, tokenizer=build_tokenizer(), train_tasks=[vowel], dev_tasks=[vowel]).train()
    return [json.loads(line) for line in (output_dir / "log.jsonl").read_text().splitlines()]


def padding_module(model):
    """The active adapter's TrainablePadding."""
    tuner = model.base_model
    return tuner.metal_padding[tuner.active_adapters[0]]


@torch.no_grad()
def assert_lora_and_padding_have_gradients(pgm) -> None:
    """After a backward: some LoRA weight and some padding parameter got a nonzero gradient."""
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in padding_module(pgm).parameters())
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in pgm.named_parameters() if "lora_" in n)


def pgm_pass(model, tok, shots):
    """Independent recomputation of the PGM forward over [embed(XP); padding].

    `lora_scope="all"`: the base LM with LoRA on over everything. `"padding"`: the base LM with LoRA off over the
    shots, then with LoRA on over the padding after their cache. On rotary models the shots take positions -len(XP)
    to -1, so the padding sits at 0..K-1. Returns the base model's output for the last pass (logits, hidden states and
    the cache over all positions).
    """
    base = model.get_base_model()
    ids = encode(tok, format_shots(shots))
    shots_embeds = base.get_input_embeddings()(ids).unsqueeze(0)
    padding = padding_module(model)().unsqueeze(0)
    start = -len(ids) if getattr(base.config, "rope_parameters", None) else 0
    positions = torch.arange(start, len(ids) + K + start).unsqueeze(0)
    if model.peft_config[model.active_adapter].lora_scope == "all":
        with lora_enabled(model):
            embeds = torch.cat([shots_embeds, padding], dim=1)
            return base(inputs_embeds=embeds, position_ids=positions, use_cache=True, output_hidden_states=True)
    shots_out = base(inputs_embeds=shots_embeds, position_ids=positions[:, : len(ids)], use_cache=True)
    with lora_enabled(model):
        return base(
            inputs_embeds=padding,
            position_ids=positions[:, len(ids) :],
            **cache_kwargs(base, returned_cache(shots_out)),
            use_cache=True,
            output_hidden_states=True,
        )


def reference_inputs(lm, prompt, query_ids: torch.Tensor) -> dict[str, Any]:
    """Keyword arguments for the plain base LM reading [prompt][demonstrations][query] (batch 1, 1-D query ids)."""
    demos = prompt.demonstrations
    design = peft_metal.designs.get_design(prompt.design)
    if design.is_text:
        return {"input_ids": torch.cat([prompt.token_ids, demos, query_ids]).unsqueeze(0)}
    if design.reads_as == peft_metal.designs.KEYS_VALUES:
        return {"input_ids": torch.cat([demos, query_ids]).unsqueeze(0), "prefix": True}
    emb = lm.get_input_embeddings()
    return {"inputs_embeds": torch.cat([prompt.embeds, emb(demos), emb(query_ids)]).unsqueeze(0)}


@torch.no_grad()
def reference_logits(lm, prompt, query_ids: torch.Tensor) -> torch.Tensor:
    """Logits of the plain base LM at the query positions (query_length x vocab)."""
    kwargs = reference_inputs(lm, prompt, query_ids)
    if kwargs.pop("prefix", False):
        kwargs.update(cache_kwargs(lm, prompt.past_key_values))
    return lm(**kwargs).logits[0, -query_ids.shape[0] :]


@torch.no_grad()
def reference_greedy(lm, prompt, query_ids: torch.Tensor, n: int) -> list[int]:
    """n tokens of greedy decoding by full recomputation (no cache reuse) on the base LM."""
    new: list[int] = []
    for _ in range(n):
        ids = torch.cat([query_ids, torch.tensor(new, dtype=torch.long)])
        new.append(int(reference_logits(lm, prompt, ids)[-1].argmax()))
    return new


@contextmanager
def serve_on_loopback(app, timeout: float = 30.0) -> Iterator[str]:
    """`app` under uvicorn on a free loopback port in a daemon thread, as `peft-metal serve` runs it; yields its URL."""
    import socket
    import threading
    import time

    import uvicorn

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + timeout
    while not server.started:
        assert time.monotonic() < deadline and thread.is_alive(), "the server did not start"
        time.sleep(0.05)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(timeout=10)
