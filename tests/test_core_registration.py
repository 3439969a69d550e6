"""Registration with PEFT: get_peft_model, save/load, PeftConfig, AutoPeftModel, model card, version guard."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import DESIGNS, FAMILIES, SHOTS, K, make_lm, make_pgm, padding_module
from peft import AutoPeftModelForCausalLM, PeftConfig, PeftModel, get_peft_model
from peft.utils import PeftType
from safetensors import safe_open
from transformers import AutoModelForCausalLM

import peft_metal
from peft_metal import MetaLPromptConfig
from peft_metal.registration import check_peft_version

PAYLOAD = {"discrete": ("token_ids",), "weighted_sum": ("embeds",), "hidden_state": ("embeds",), "prefix": ("keys", "values")}


def perturb_padding(model, seed: int = 7) -> None:
    """Make the padding differ from its (seeded) init, so a test of loading cannot pass by re-initialization."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in padding_module(model).parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))


def assert_same_prompt(a, b, atol: float = 1e-6) -> None:
    assert a.design == b.design and a.num_tokens == b.num_tokens
    assert a.base_fingerprint == b.base_fingerprint
    for name in PAYLOAD[a.design] + ("demonstrations",):
        x, y = getattr(a, name), getattr(b, name)
        assert x.shape == y.shape, name
        if x.is_floating_point():
            torch.testing.assert_close(x, y, atol=atol, rtol=0)
        else:
            assert torch.equal(x, y), name
    assert a.text == b.text


def test_peft_type_registered():
    assert PeftType.METAL_PROMPT == "METAL_PROMPT"
    assert MetaLPromptConfig(task_type="CAUSAL_LM").peft_type == PeftType.METAL_PROMPT
    # registering twice is harmless
    assert peft_metal.registration.register() is PeftType.METAL_PROMPT


@pytest.mark.parametrize("family", FAMILIES)
def test_get_peft_model_returns_peft_model(family):
    model = make_pgm(family, "prefix")
    assert isinstance(model, PeftModel)
    assert type(model.base_model).__name__ == "MetaLPromptModel"
    assert isinstance(model.peft_config["default"], MetaLPromptConfig)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("metal_padding" in n for n in trainable)
    assert all("lora_" in n or "metal_padding" in n for n in trainable)


@pytest.mark.parametrize("design", DESIGNS)
@pytest.mark.parametrize("family", FAMILIES)
def test_save_and_load_round_trip(family, design, tok, tmp_path):
    model = make_pgm(family, design)
    perturb_padding(model)
    original = model.generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    model.save_pretrained(tmp_path)

    config_json = json.loads((tmp_path / "adapter_config.json").read_text())
    assert config_json["peft_type"] == "METAL_PROMPT"
    assert config_json["prompt_design"] == design
    assert config_json["num_prompt_tokens"] == K

    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert keys, "empty adapter file"
    assert all("lora_" in k or "metal_padding" in k for k in keys), [
        k for k in keys if "lora_" not in k and "metal_padding" not in k
    ]
    assert any("lora_A" in k for k in keys) and any("lora_B" in k for k in keys)
    assert any("metal_padding" in k for k in keys)
    base_names = {n for n, _ in make_lm(family).named_parameters()}
    assert not any(k.split("base_model.model.", 1)[-1] in base_names for k in keys)
    adapter_numel = sum(p.numel() for n, p in model.named_parameters() if "lora_" in n or "metal_padding" in n)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        saved_numel = sum(f.get_tensor(k).numel() for k in f.keys())
    assert saved_numel == adapter_numel

    loaded_config = PeftConfig.from_pretrained(tmp_path)
    assert isinstance(loaded_config, MetaLPromptConfig)
    assert loaded_config.prompt_design == design and loaded_config.num_prompt_tokens == K

    torch.manual_seed(999)  # a different LoRA init before loading: only the loaded weights can make them equal
    restored = PeftModel.from_pretrained(make_lm(family), tmp_path)
    assert isinstance(restored.peft_config["default"], MetaLPromptConfig)
    again = restored.eval().generate_prompt(SHOTS, tokenizer=tok, num_demonstrations=1)
    assert_same_prompt(original, again)


@pytest.mark.parametrize("reparameterization", ["lstm", "mlp", "none"])
def test_load_under_another_adapter_name(reparameterization, tok, tmp_path):
    """Saved keys must not depend on the adapter name: loading as "task" restores the same PGM."""
    model = make_pgm("llama", "hidden_state", padding_reparameterization=reparameterization)
    perturb_padding(model)
    original = model.generate_prompt(SHOTS, tokenizer=tok)
    model.save_pretrained(tmp_path)
    with safe_open(str(tmp_path / "adapter_model.safetensors"), framework="pt") as f:
        keys = list(f.keys())
    assert not [k for k in keys if ".default." in k or k.endswith(".default")]
    restored = PeftModel.from_pretrained(make_lm("llama"), tmp_path, adapter_name="task")
    assert restored.active_adapters == ["task"]
    assert_same_prompt(original, restored.eval().generate_prompt(SHOTS, tokenizer=tok))


@pytest.mark.parametrize("family", FAMILIES)
def test_load_is_trainable_keeps_padding_trainable(family, tmp_path):
    model = make_pgm(family, "hidden_state")
    model.save_pretrained(tmp_path)
    restored = PeftModel.from_pretrained(make_lm(family), tmp_path, is_trainable=True)
    trainable = {n for n, p in restored.named_parameters() if p.requires_grad}
    assert any("lora_" in n for n in trainable)
    assert any("metal_padding" in n for n in trainable), "padding frozen after loading with is_trainable=True"


@pytest.mark.parametrize("family", FAMILIES)
def test_load_for_inference_freezes_padding(family, tmp_path):
    """PeftModel.from_pretrained defaults to inference mode: nothing, the padding included, is trainable."""
    make_pgm(family, "hidden_state").save_pretrained(tmp_path)
    loaded = PeftModel.from_pretrained(make_lm(family), tmp_path)
    assert [n for n, p in loaded.named_parameters() if p.requires_grad] == []


@pytest.mark.parametrize("family", FAMILIES)
def test_auto_peft_model_from_saved_base(family, tok, tmp_path):
    base_dir, adapter_dir = tmp_path / "base", tmp_path / "adapter"
    make_lm(family).save_pretrained(base_dir)
    lm = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    lm.generation_config.eos_token_id = None
    cfg = MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design="hidden_state", num_prompt_tokens=K, r=4, init_lora_weights=False)
    model = get_peft_model(lm, cfg).eval()
    perturb_padding(model)
    assert model.peft_config["default"].base_model_name_or_path == str(base_dir)
    original = model.generate_prompt(SHOTS, tokenizer=tok)
    model.save_pretrained(adapter_dir)

    auto = AutoPeftModelForCausalLM.from_pretrained(adapter_dir)
    assert isinstance(auto, PeftModel)
    assert isinstance(auto.peft_config["default"], MetaLPromptConfig)
    assert_same_prompt(original, auto.eval().generate_prompt(SHOTS, tokenizer=tok))


@pytest.mark.parametrize("design", DESIGNS)
def test_model_card_names_base_design_and_k(design, tmp_path):
    base_dir = tmp_path / "my-base"
    make_lm("llama").save_pretrained(base_dir)
    lm = AutoModelForCausalLM.from_pretrained(base_dir)
    model = get_peft_model(lm, MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design=design, num_prompt_tokens=5, r=4))
    model.save_pretrained(tmp_path / "out")
    card = (tmp_path / "out" / "README.md").read_text()
    assert str(base_dir) in card
    assert f"Prompt design: `{design}`" in card
    assert "Prompt length K: 5" in card
    # saving again replaces the section instead of duplicating it
    model.save_pretrained(tmp_path / "out")
    assert (tmp_path / "out" / "README.md").read_text().count("## MetaL-Prompt") == 1


@pytest.mark.parametrize("version", ["0.20.0", "0.22.0", "1.0.0"])
def test_check_peft_version_rejects_unsupported(version):
    with pytest.raises(ImportError) as info:
        check_peft_version(version)
    message = str(info.value)
    assert "0.21.0" in message and "0.22.0" in message and version in message


def test_check_peft_version_accepts_supported():
    check_peft_version("0.21.0")
    check_peft_version("0.21.2")


def test_set_adapter_moves_padding_trainability():
    """Only the active adapter's LoRA and padding are trainable, as PEFT does for LoRA itself."""
    model = make_pgm("llama", "prefix")
    model.add_adapter("two", MetaLPromptConfig(task_type="CAUSAL_LM", prompt_design="hidden_state", num_prompt_tokens=3, r=4))
    model.set_adapter("two")
    trainable = [n for n, p in model.named_parameters() if p.requires_grad]
    assert any(".two." in n for n in trainable if "lora_" in n)
    assert any("metal_padding.two." in n for n in trainable)
    assert not [n for n in trainable if ".default." in n], "the inactive adapter is still trainable"


def test_model_card_is_complete_with_hub_metadata_and_no_template_placeholders(tmp_path):
    from peft_metal.metal_prompt.model_card import card_metadata

    model = make_pgm("llama", "prefix", lora_scope="padding")
    config = model.peft_config["default"]
    config.base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    config.training_summary = {"episodes": 8, "dev_results": {"metal": 0.5, "icl": 0.625}}
    model.save_pretrained(tmp_path)
    text = (tmp_path / "README.md").read_text()
    assert "More Information Needed" not in text and "{{" not in text
    meta = card_metadata(text)
    assert meta["library_name"] == "peft" and meta["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert meta["license"] == "apache-2.0" and meta["datasets"] == ["bigbench"]
    assert {"peft-metal", "metal-prompt", "base_model:adapter:HuggingFaceTB/SmolLM2-135M-Instruct"} <= set(meta["tags"])
    results = meta["model-index"][0]["results"]
    assert sorted(m["value"] for r in results for m in r["metrics"]) == [0.5, 0.625]
    assert "import peft_metal" in text and "PeftModel.from_pretrained" in text and "Findings of EMNLP 2023" in text
    assert "LoRA scope: `padding`" in text and "- metal: 0.500" in text
    # a PGM meta-trained on one's own tasks, or not at all, claims no dataset
    for summary in ({"episodes": 8, "settings": json.dumps({"task_dir": "my_tasks"})}, None):
        config.training_summary = summary
        model.save_pretrained(tmp_path / "other")
        assert "datasets" not in card_metadata((tmp_path / "other" / "README.md").read_text())


def test_a_pgm_meta_trained_on_metaicl_names_it_on_its_card(tmp_path):
    """MetaICL's tasks as the dataset, its dev results as measured on MetaICL's dev tasks; with a task_dir beside it,
    still MetaICL (one's own tasks are claimed as nothing)."""
    from peft_metal.metal_prompt.model_card import card_metadata

    model = make_pgm("llama", "prefix", lora_scope="padding")
    config = model.peft_config["default"]
    for settings in ({"metaicl_dir": "../shared/metaicl"}, {"metaicl_dir": "m", "task_dir": "mine"}):
        config.training_summary = {
            "episodes": 8, "settings": json.dumps(settings),
            "dev_results": {"metal (dev-panel, seeds 100,13)": 0.5, "metal macro-F1 (dev-panel, seeds 100,13)": 0.25},
        }
        model.save_pretrained(tmp_path)
        meta = card_metadata((tmp_path / "README.md").read_text())
        assert meta["datasets"] == ["metaicl"]
        results = meta["model-index"][0]["results"]
        assert {r["dataset"]["type"] for r in results} == {"metaicl"}
        assert {r["dataset"]["name"] for r in results} == {"MetaICL dev tasks (peft-metal)"}
        assert sorted((m["type"], m["value"]) for r in results for m in r["metrics"]) == [("accuracy", 0.5), ("f1", 0.25)]


def test_a_card_says_in_words_what_the_pgm_was_trained_on_and_what_it_continued(tmp_path):
    model = make_pgm("llama", "prefix", lora_scope="padding")
    config = model.peft_config["default"]
    cases = {
        json.dumps({"metaicl_dir": "m", "metaicl_tasks": ["a", "b"], "task_dir": "t", "init_from": "pgms/start"}):
            "- Trained on: MetaICL's tasks (2 train tasks of `m`) and BIG-bench-format task folders (every task under "
            "`t`), continuing `pgms/start`",
        json.dumps({"task_dir": "t", "tasks": ["x"]}): "- Trained on: BIG-bench-format task folders (1 task under `t`), from scratch",
        json.dumps({"metaicl_dir": "m"}): "- Trained on: MetaICL's tasks (every train task of `m`), from scratch",
        json.dumps({"seed": 3}): "- Trained on: BIG-bench's train split, from scratch",
    }
    for settings, line in cases.items():
        config.training_summary = {"episodes": 8, "settings": settings}
        model.save_pretrained(tmp_path)
        assert line in (tmp_path / "README.md").read_text().splitlines()
    config.training_summary = None
    model.save_pretrained(tmp_path)
    assert "Trained on" not in (tmp_path / "README.md").read_text()


def test_a_card_names_the_dataset_of_the_panel_each_figure_was_measured_on(tmp_path):
    """A PGM meta-trained on BIG-bench, measured on MetaICL's panel and on BIG-bench's: each figure on the dataset its
    label's panel names; a figure that names no panel is on the training corpus."""
    from peft_metal.metal_prompt.model_card import card_metadata

    model = make_pgm("llama", "prefix", lora_scope="padding")
    config = model.peft_config["default"]
    config.training_summary = {"episodes": 8, "dev_results": {
        "metal macro-F1 (dev-panel, seeds 100,13)": 0.25, "metal (bigbench-panel, seeds 0,1)": 0.5,
        "metal (dev-panel-tasks, seeds 0,1)": 0.375, "metal": 0.125,
    }}
    model.save_pretrained(tmp_path)
    meta = card_metadata((tmp_path / "README.md").read_text())
    assert meta["datasets"] == ["bigbench"]
    measured = {m["value"]: r["dataset"]["type"] for r in meta["model-index"][0]["results"] for m in r["metrics"]}
    assert measured == {0.25: "metaicl", 0.5: "bigbench", 0.375: "bigbench-format", 0.125: "bigbench"}
    assert "Measured on `bigbench-panel`: BIG-bench dev panel (peft-metal); `dev-panel`: MetaICL dev tasks" in (
        (tmp_path / "README.md").read_text()
    )


def test_a_config_saves_its_target_modules_in_one_order(tmp_path):
    """`target_modules` is a set in memory, whose order changes from process to process: saved sorted, so saving a
    PGM again does not rewrite its config."""
    modules = ["v_proj", "q_proj", "up_proj", "down_proj", "o_proj", "k_proj", "gate_proj"]
    MetaLPromptConfig(task_type="CAUSAL_LM", target_modules=modules).save_pretrained(str(tmp_path))
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    assert saved["target_modules"] == sorted(modules)
    assert MetaLPromptConfig.from_pretrained(str(tmp_path)).target_modules == set(modules)


def test_every_evaluation_panel_has_a_dataset_on_the_card():
    """The card's table of panels (the tuner layer cannot import evaluation) names every panel `peft-metal eval` has."""
    from peft_metal.evaluation.panels import PANELS
    from peft_metal.metal_prompt.model_card import PANEL_DATASETS

    assert set(PANEL_DATASETS) == set(PANELS)
