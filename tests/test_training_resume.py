"""Meta-training on a tiny model: the loss goes down, and a run killed after a checkpoint and resumed reaches exactly
the weights of an uninterrupted run."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch
from conftest import build_tokenizer, make_lm, make_pgm
from peft import PeftConfig

from peft_metal.data import Example, Task
from peft_metal.training import MetaTrainer, TrainingArguments
from peft_metal.training.checkpoint import latest_checkpoint


def tasks() -> list[Task]:
    words = ["ab", "cd", "ef", "gh", "ij", "kl", "mn", "op", "qr", "st", "uv", "wx"]
    upper = Task("upper", [Example(w, w.upper()) for w in words])
    reverse = Task("reverse", [Example(w, w[::-1]) for w in words])
    return [upper, reverse]


def make_trainer(
    tmp_path, design: str, max_steps: int = 4, scope: str = "all", distillation_weight: float = 0.0, **settings
) -> MetaTrainer:
    args = TrainingArguments(
        output_dir=str(tmp_path),
        prompt_design=design,
        lora_scope=scope,
        distillation_weight=distillation_weight,
        max_steps=max_steps,
        learning_rate=1e-2,
        warmup_steps=1,
        gradient_accumulation_steps=2,
        xp_range=(1, 3),
        xl_range=(0, 1),
        num_queries=2,
        checkpoint_every=2,
        eval_every=2,
        log_every=1,
        **settings,
    )
    model = make_pgm("llama", design, padding_reparameterization="mlp", lora_scope=scope)
    return MetaTrainer(args, model=model, tokenizer=build_tokenizer(), train_tasks=tasks(), dev_tasks=tasks()[:1])


def pgm_state(trainer: MetaTrainer) -> dict[str, torch.Tensor]:
    return {n: p.detach().clone() for n, p in trainer.model.named_parameters() if p.requires_grad}


@pytest.mark.parametrize(
    ("design", "scope", "distillation_weight", "extra"),
    [
        ("discrete", "all", 0.0, {}),
        ("prefix", "all", 0.0, {}),
        ("discrete", "padding", 0.0, {}),
        ("prefix", "padding", 1.0, {}),
        ("prefix", "padding", 0.0, {"gradient_from_answers_only": True}),
        ("prefix", "padding", 0.0, {"padding_learning_rate": 0.1}),
        ("prefix", "padding", 0.0, {"task_contrast_weight": 1.0, "gradient_from_answers_only": True}),
    ],
)
def test_resume_reaches_same_weights(tmp_path, design, scope, distillation_weight, extra):
    settings = dict(scope=scope, distillation_weight=distillation_weight, **extra)
    uninterrupted = make_trainer(tmp_path / "a", design, **settings)
    uninterrupted.train()
    expected = pgm_state(uninterrupted)

    killed = make_trainer(tmp_path / "b", design, **settings)
    killed.train(stop_after=2)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-2"
    resumed = make_trainer(tmp_path / "b", design, **settings)
    resumed.train(resume=True)
    actual = pgm_state(resumed)

    assert expected.keys() == actual.keys()
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)
    assert resumed.step == 4 and resumed.sampler.step == uninterrupted.sampler.step


def test_log_checkpoint_and_final_pgm(tmp_path, monkeypatch):
    def no_hub(*args, **kwargs):
        raise AssertionError("saving a PGM asked the Hub")

    monkeypatch.setattr("peft.utils.save_and_load.check_file_exists_on_hf_hub", no_hub)
    trainer = make_trainer(tmp_path, "hidden_state", max_steps=4)
    # as for a real base model: a Hub id, which PEFT would look up on every save unless told not to
    trainer.model.peft_config[trainer.model.active_adapter].base_model_name_or_path = "HuggingFaceTB/SmolLM2-135M-Instruct"
    summary = trainer.train()
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2, 3, 4]
    assert all("dev_loss" in r for r in records if r["step"] % 2 == 0)
    assert summary["optimizer_steps"] == 4 and summary["episodes"] == 8
    config = json.loads((tmp_path / "pgm" / "adapter_config.json").read_text())
    assert config["training_summary"]["optimizer_steps"] == 4
    assert "Meta-training" in (tmp_path / "pgm" / "README.md").read_text()
    assert config["padding_reparameterization"] == "none"  # baked for shipping
    assert [r["step"] for r in json.loads((tmp_path / "pgm" / "training_log.json").read_text())] == [0, 1, 2, 3, 4]
    for checkpoint in ("checkpoint-2", "checkpoint-4"):
        assert {p.name for p in (tmp_path / checkpoint).iterdir()} == {"pgm", "state.json", "state.safetensors"}


def test_training_lowers_the_loss(tmp_path):
    trainer = make_trainer(tmp_path, "prefix", max_steps=30)
    episodes = [trainer.sampler.episode(i) for i in range(8)]
    module = trainer.loss_module

    def mean_loss() -> float:
        trainer.model.eval()
        with torch.no_grad():
            return sum(module(e)["lm_loss"].item() for e in episodes) / len(episodes)

    before = mean_loss()
    trainer.train()
    assert mean_loss() < before - 0.1


def test_distillation_term_is_a_kl_that_trains_the_pgm(tmp_path):
    """MEND-style distillation: KL between the LM given all shots as demonstrations (teacher, no gradient) and the LM
    given the generated prompt (student); zero weight leaves it out of the loss."""
    from peft_metal.training import EpisodeLoss

    trainer = make_trainer(tmp_path, "weighted_sum")
    episode = trainer.sampler.episode(0)
    module = EpisodeLoss(trainer.model, trainer.tokenizer, distillation_weight=0.5)
    trainer.model.train()
    losses = module(episode)
    assert torch.isfinite(losses["distillation"]) and losses["distillation"] >= 0
    torch.testing.assert_close(losses["loss"], losses["lm_loss"] + 0.5 * losses["distillation"])
    losses["distillation"].backward()
    padding = trainer.model.base_model.metal_padding["default"]
    assert padding.embedding.grad is not None and padding.embedding.grad.abs().sum() > 0
    assert "distillation" not in EpisodeLoss(trainer.model, trainer.tokenizer)(episode)


def test_continued_training_starts_from_a_saved_pgm(tmp_path):
    """`init_from` starts a new run from a saved PGM's weights, all of them trainable again, and counts the episodes
    it had (a checkpoint's PGM, too); a PGM shaped otherwise is refused with the differing settings named."""
    from conftest import K, make_lm

    from peft_metal.training.trainer import _saved_pgm, episodes_before

    first = make_trainer(tmp_path / "first", "prefix", max_steps=4)
    first.train(stop_after=2)  # a finished run bakes its padding; stopped at a checkpoint, the LSTM/MLP is still there
    saved = tmp_path / "first" / "checkpoint-2" / "pgm"
    trained = pgm_state(first)

    args = TrainingArguments(
        output_dir=str(tmp_path / "second"), prompt_design="prefix", num_prompt_tokens=K, r=4,
        padding_reparameterization="mlp", init_from=str(saved),
    )
    continued = _saved_pgm(make_lm("llama"), args)
    # a checkpoint's PGM says how far its run had trained it: 2 steps x 2 episodes
    assert episodes_before(args) == 4
    assert PeftConfig.from_pretrained(str(saved)).training_summary["checkpoint_of"] == "first"
    exported = first.save_final(first._summary([], 0.0))  # 2 steps x 2 episodes
    assert episodes_before(dataclasses.replace(args, init_from=str(exported))) == 4
    # a run continued from it counts those 4 in its own checkpoints, not the 4 of the PGM it started from alone
    again = make_trainer(tmp_path / "again", "prefix", max_steps=4, init_from=str(saved))
    again.train(stop_after=2)
    assert episodes_before(dataclasses.replace(args, init_from=str(tmp_path / "again" / "checkpoint-2" / "pgm"))) == 8
    state = {n: p.detach() for n, p in continued.named_parameters() if p.requires_grad}
    assert state.keys() == trained.keys()
    for name in trained:
        torch.testing.assert_close(state[name], trained[name], rtol=0, atol=0, msg=name)

    wrong = TrainingArguments(
        output_dir=str(tmp_path / "third"), prompt_design="discrete", num_prompt_tokens=K, r=4,
        padding_reparameterization="mlp", init_from=str(saved),
    )
    with pytest.raises(ValueError, match="prompt_design: saved 'prefix', settings 'discrete'"):
        _saved_pgm(make_lm("llama"), wrong)


def test_grow_slots_widens_a_saved_pgm(tmp_path):
    """`grow_slots` starts a run with more slots than the saved PGM: LoRA as saved, slot i as saved slot i mod K,
    everything trainable; fewer or as many slots, or no init_from, are refused by name."""
    from conftest import K, make_lm

    from peft_metal.training.trainer import _saved_pgm

    first = make_trainer(tmp_path / "first", "prefix", scope="padding", max_steps=2)
    saved = first.save_final(first._summary([], 0.0))  # baked: padding_reparameterization "none"
    trained = pgm_state(first)
    wider = 2 * K + 1
    args = TrainingArguments(
        output_dir=str(tmp_path / "wide"), prompt_design="prefix", lora_scope="padding", num_prompt_tokens=wider,
        r=4, padding_reparameterization="none", init_from=str(saved), grow_slots=True,
    )
    grown = _saved_pgm(make_lm("llama"), args)
    state = {n: p.detach() for n, p in grown.named_parameters() if p.requires_grad}
    assert state.keys() == trained.keys()
    for name in trained:
        if "metal_padding" in name:
            assert state[name].shape[0] == wider
            torch.testing.assert_close(state[name], trained[name][torch.arange(wider) % K], rtol=0, atol=0)
        else:
            torch.testing.assert_close(state[name], trained[name], rtol=0, atol=0, msg=name)
    assert grown.peft_config["default"].num_prompt_tokens == wider

    with pytest.raises(ValueError, match=f"saved num_prompt_tokens {K}, settings {K}"):
        _saved_pgm(make_lm("llama"), dataclasses.replace(args, num_prompt_tokens=K))
    with pytest.raises(ValueError, match="grow_slots widens the PGM given by init_from"):
        TrainingArguments(grow_slots=True)


def test_padding_learning_rate_gives_the_padding_a_group_of_its_own(tmp_path):
    trainer = make_trainer(tmp_path, "prefix", scope="padding", padding_learning_rate=0.5)
    lora, padding = trainer.optimizer.param_groups
    names = {id(p): n for n, p in trainer.model.named_parameters() if p.requires_grad}
    assert {names[id(p)] for p in padding["params"]} == {n for n in names.values() if "metal_padding" in n}
    assert {names[id(p)] for p in lora["params"]} == {n for n in names.values() if "metal_padding" not in n}
    assert (lora["initial_lr"], padding["initial_lr"]) == (1e-2, 0.5)
    [group] = make_trainer(tmp_path / "default", "prefix", scope="padding").optimizer.param_groups
    assert len(group["params"]) == len(names)


def test_padding_learning_rate_must_be_positive():
    with pytest.raises(ValueError, match="padding_learning_rate must be positive"):
        TrainingArguments(padding_learning_rate=0.0)


def test_resume_refuses_a_checkpoint_with_other_optimizer_groups(tmp_path):
    make_trainer(tmp_path, "prefix", scope="padding").train(stop_after=2)
    with pytest.raises(ValueError, match="padding_learning_rate is set in one and not the other"):
        make_trainer(tmp_path, "prefix", scope="padding", padding_learning_rate=0.5).train(resume=True)


@pytest.mark.parametrize(("setting", "saved", "other"), [("lora_scope", "all", "padding"), ("prompt_design", "prefix", "discrete")])
def test_resume_refuses_a_checkpoint_of_another_pgm(tmp_path, setting, saved, other):
    kwargs = {"lora_scope": "scope", "prompt_design": "design"}
    first = {"design": "prefix", "scope": "all"}
    make_trainer(tmp_path, **first).train(stop_after=2)
    second = dict(first, **{kwargs[setting]: other})
    with pytest.raises(ValueError, match=f"{setting}: checkpoint '{saved}', run '{other}'"):
        make_trainer(tmp_path, **second).train(resume=True)


@pytest.mark.parametrize("scope", ["all", "padding"])
def test_teacher_continuing_from_the_read_shots_equals_the_lm_on_all_shots(tmp_path, scope):
    """The teacher reuses the keys/values of XP that the PGM's frozen read made: its logits are the plain LM's on
    [XP][XL][query], as if it had read every shot as a demonstration itself."""
    from conftest import make_lm

    from peft_metal.metal_prompt.queries import encode_queries

    trainer = make_trainer(tmp_path, "prefix", scope=scope, distillation_weight=1.0, mixed_precision="fp32")
    module = trainer.loss_module
    episode = next(trainer.sampler.episode(i) for i in range(50) if trainer.sampler.episode(i).xl)
    xp, xl = module._encode(episode.xp), module._encode(episode.xl)
    batch = encode_queries([e.as_shot() for e in episode.queries], trainer.tokenizer, module.template, xp.device)
    teacher, _ = module._teacher(trainer.model.base_model.read_shots(xp), xl, batch)
    reference = make_lm("llama")
    for row in range(batch.input_ids.shape[0]):
        query = batch.input_ids[row][batch.attention_mask[row].bool()]
        with torch.no_grad():
            expected = reference(input_ids=torch.cat([xp, xl, query]).unsqueeze(0)).logits[0, -len(query) :]
        torch.testing.assert_close(teacher[row, -len(query) :], expected, atol=1e-4, rtol=1e-4)


def test_export_a_checkpoint_of_a_run_that_goes_on(tmp_path, monkeypatch):
    """`peft-metal export`: a checkpoint becomes a baked, shippable PGM that makes the same prompts, with its training
    facts and dev results in its card; a missing checkpoint is named with the ones there are."""
    from conftest import SHOTS, make_lm
    from peft import PeftModel

    from peft_metal.cli import main

    trainer = make_trainer(tmp_path / "run", "prefix", scope="padding")
    trainer.train(stop_after=2)
    monkeypatch.setattr("peft_metal.training.trainer.load_base_model", lambda name: (make_lm("llama"), None))
    results = tmp_path / "dev.json"
    results.write_text(json.dumps({"summary": {"metal": {"mean": 0.5, "se": 0.1}}}))
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "pgm"),
                 "--dev-results", str(results)]) == 0
    config = json.loads((tmp_path / "pgm" / "adapter_config.json").read_text())
    assert config["padding_reparameterization"] == "none" and config["lora_scope"] == "padding"
    assert config["training_summary"]["episodes"] == 4 and config["training_summary"]["dev_results"] == {"metal": 0.5}
    assert "- metal: 0.500" in (tmp_path / "pgm" / "README.md").read_text()
    exported = PeftModel.from_pretrained(make_lm("llama"), str(tmp_path / "pgm")).eval()
    checkpoint = PeftModel.from_pretrained(make_lm("llama"), str(tmp_path / "run" / "checkpoint-2" / "pgm")).eval()
    tok = trainer.tokenizer
    with torch.no_grad():
        torch.testing.assert_close(
            exported.generate_prompt(SHOTS, tokenizer=tok).keys, checkpoint.generate_prompt(SHOTS, tokenizer=tok).keys
        )
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--step", "7", "--output", str(tmp_path / "x")]) == 2


def test_card_labels_dev_results_with_their_panel_and_seeds(tmp_path, monkeypatch, capsys):
    """`peft-metal card`: the dev results of several eval files go into a saved PGM's card, each figure named with the
    panel and seeds it was measured on (and the shots, unless MetaICL's 16); a figure replaces only the one of its own
    label, the rest stay; the weights stay as they were; a file that is no eval output is refused by name."""
    from conftest import make_lm

    from peft_metal.cli import main

    trainer = make_trainer(tmp_path / "run", "prefix", scope="padding")
    trainer.train(stop_after=2)
    monkeypatch.setattr("peft_metal.training.trainer.load_base_model", lambda name: (make_lm("llama"), None))
    assert main(["export", "--run-dir", str(tmp_path / "run"), "--output", str(tmp_path / "pgm")]) == 0
    weights = (tmp_path / "pgm" / "adapter_model.safetensors").read_bytes()
    draws = []
    for seeds, mean in (([0, 1], 0.5), ([2, 3], 0.25)):
        draws.append(tmp_path / f"draw{seeds[0]}.json")
        draws[-1].write_text(json.dumps({"summary": {"metal": {"mean": mean}, "icl": {"mean": 0.75}},
                                         "settings": {"panel": "dev-panel", "seeds": seeds, "tasks": ["a", "b"],
                                                      "shots": 16}}))
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", *map(str, draws)]) == 0
    config = json.loads((tmp_path / "pgm" / "adapter_config.json").read_text())
    assert config["training_summary"]["dev_results"] == {
        "metal (dev-panel, seeds 0,1)": 0.5, "metal (dev-panel, seeds 2,3)": 0.25
    }
    assert config["training_summary"]["episodes"] == 4
    assert "- metal (dev-panel, seeds 2,3): 0.250" in (tmp_path / "pgm" / "README.md").read_text()
    assert (tmp_path / "pgm" / "adapter_model.safetensors").read_bytes() == weights
    # another panel's figures add to these; the same draw measured again replaces its own figure
    other = tmp_path / "other.json"
    other.write_text(json.dumps({"summary": {"metal": {"mean": 0.125}}, "settings": {"panel": "bigbench-panel", "seeds": [0]}}))
    again = tmp_path / "again.json"
    again.write_text(json.dumps({"summary": {"metal": {"mean": 0.375}}, "settings": {"panel": "dev-panel", "seeds": [2, 3]}}))
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", str(other)]) == 0
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", str(again)]) == 0
    # the same draw with fewer shots is a figure of its own, not a replacement
    fewer = tmp_path / "fewer.json"
    fewer.write_text(json.dumps({"summary": {"metal": {"mean": 0.625}},
                                 "settings": {"panel": "dev-panel", "seeds": [0, 1], "shots": 4}}))
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", str(fewer)]) == 0
    config = json.loads((tmp_path / "pgm" / "adapter_config.json").read_text())
    assert config["training_summary"]["dev_results"] == {
        "metal (dev-panel, seeds 0,1)": 0.5, "metal (dev-panel, seeds 2,3)": 0.375, "metal (bigbench-panel, seeds 0)": 0.125,
        "metal (dev-panel, seeds 0,1, 4 shots)": 0.625,
    }

    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"results": []}))
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", str(bad)]) == 2
    assert "has no 'summary'" in capsys.readouterr().err
    references = tmp_path / "references.json"
    references.write_text(json.dumps({"summary": {"icl": {"mean": 0.75}}, "settings": {"seeds": [0, 1]}}))
    assert main(["card", "--pgm", str(tmp_path / "pgm"), "--dev-results", str(references)]) == 2
    assert "hold no results of the PGM's methods" in capsys.readouterr().err


def test_text_stage_then_task_episodes_and_resume_exactly(tmp_path):
    """`text_stage_steps`: the first optimizer steps train on generic text (first part compressed, the rest predicted
    and distilled), then task episodes; a run killed inside the text stage resumes to the same weights."""
    from peft_metal.data.text import TextEpisode

    settings = dict(scope="padding", distillation_weight=1.0, text_stage_steps=3)
    uninterrupted = make_trainer(tmp_path / "a", "prefix", **settings)
    drawn = []
    original = uninterrupted.next_episode

    def record():
        episode = original()
        drawn.append(type(episode))
        return episode

    uninterrupted.next_episode = record
    uninterrupted.train()
    assert drawn == [TextEpisode] * 6 + [type(uninterrupted.sampler.episode(0))] * 2  # 2 episodes per step
    killed = make_trainer(tmp_path / "b", "prefix", **settings)
    killed.train(stop_after=2)
    resumed = make_trainer(tmp_path / "b", "prefix", **settings)
    resumed.train(resume=True)
    expected, actual = pgm_state(uninterrupted), pgm_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


@pytest.mark.parametrize("rate", [-0.1, 1.0])
def test_text_mix_rate_outside_its_range_is_refused(tmp_path, rate):
    with pytest.raises(ValueError, match=r"text_mix_rate must be in \[0, 1\)"):
        TrainingArguments(output_dir=str(tmp_path), text_mix_rate=rate)


def test_texts_interleaved_with_task_episodes_and_resume_exactly(tmp_path):
    """`text_mix_rate`: after the text stage, texts keep coming among the task episodes at that rate (their losses
    logged apart); a run killed in the middle resumes to the same episodes and weights."""
    from peft_metal.data.text import TextEpisode

    settings = dict(scope="padding", text_stage_steps=1, text_mix_rate=0.5, max_steps=6)
    uninterrupted = make_trainer(tmp_path / "a", "prefix", **settings)
    drawn = []
    original = uninterrupted.next_episode

    def record():
        episode = original()
        drawn.append(isinstance(episode, TextEpisode))
        return episode

    uninterrupted.next_episode = record
    uninterrupted.train()
    assert drawn[:2] == [True, True]  # the text stage: 2 episodes per step
    assert 0 < sum(drawn[2:]) < len(drawn[2:])  # then both kinds
    records = [json.loads(line) for line in (tmp_path / "a" / "log.jsonl").read_text().splitlines()]
    assert any("text_lm_loss" in record and "lm_loss" in record for record in records)
    killed = make_trainer(tmp_path / "b", "prefix", **settings)
    killed.train(stop_after=3)
    resumed = make_trainer(tmp_path / "b", "prefix", **settings)
    kinds = []
    resumed_original = resumed.next_episode
    resumed.next_episode = lambda: kinds.append(isinstance(episode := resumed_original(), TextEpisode)) or episode
    resumed.train(resume=True)
    assert kinds == drawn[2 * 2 :]  # resumed from checkpoint-2 (checkpoints every 2 steps)
    expected, actual = pgm_state(uninterrupted), pgm_state(resumed)
    for name in expected:
        torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=name)


def test_texts_without_spaces_are_cut_inside_the_text():
    """Japanese or Chinese inputs have no spaces: cut at a word boundary, their continuation was one "word" of as
    little as one token (an empty loss, NaN, in a run's log); now they are cut inside the text."""
    from itertools import permutations

    from peft_metal.data.text import TEXT_SEPARATOR, TextSampler

    sentences = ["結果を聞きに来てくれた彼女は、先生に悪いと言われました。", "可惜的是，石头没有出来!", "滞在が成功していると考えています。"]
    # a space or two, as in the run's NaN texts ("...勧められました! !"): the word cut left " !" to predict
    task = Task("multiemo_like", [Example(sentence + " !" * (i % 2), "x") for i, sentence in enumerate(sentences * 3)])
    sampler = TextSampler([task], inputs_per_text=4)
    for step in range(20):
        episode = sampler.episode(step)
        assert len(episode.continuation.strip()) >= 5  # not " !"
        assert episode.prefix + episode.continuation in {  # the text, cut in two
            TEXT_SEPARATOR.join(picked) for picked in permutations([e.input for e in task.examples], 4)
        }


def test_a_text_with_nothing_to_predict_is_skipped_and_counted(tmp_path):
    """A continuation under 2 tokens is never trained on (its loss would be an empty mean): the trainer skips it and
    counts it, and the loss refuses it with the reason."""
    from peft_metal.data.text import TextEpisode

    trainer = make_trainer(tmp_path, "prefix", scope="padding", text_stage_steps=2)
    short = TextEpisode("upper", prefix="ab cd ef gh", continuation="i")
    assert len(trainer.tokenizer(short.continuation, add_special_tokens=False)["input_ids"]) == 1
    real = trainer.text_sampler

    class TwoShortTextsFirst:
        queue = [short, short]

        def __next__(self):
            return self.queue.pop() if self.queue else next(real)

    trainer.text_sampler = TwoShortTextsFirst()
    episode = trainer.next_episode()
    assert episode is not short and trainer.skipped_short_texts == 2
    with pytest.raises(ValueError, match="continuation of 1 token"):
        trainer.loss_module(short)


def test_text_episode_loss_trains_the_pgm(tmp_path):
    from peft_metal.data.text import TextSampler

    trainer = make_trainer(tmp_path, "prefix", scope="padding", distillation_weight=1.0)
    episode = TextSampler(tasks(), inputs_per_text=4).episode(0)
    assert episode.prefix and episode.continuation  # texts of inputs without spaces: cut inside the text
    trainer.model.train()
    losses = trainer.loss_module(episode)
    assert losses["distillation"] >= 0 and torch.isfinite(losses["lm_loss"])
    losses["loss"].backward()
    padding = trainer.model.base_model.metal_padding["default"]
    assert padding.embedding.grad is not None and padding.embedding.grad.abs().sum() > 0


def test_training_time_adds_up_over_a_resume(tmp_path):
    """The log's `train_seconds` counts the training time of every session of a run, so runs can be compared at equal
    wall-clock even when they were stopped and resumed."""
    killed = make_trainer(tmp_path, "prefix", scope="padding")
    killed.train(stop_after=2)
    first = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "train_seconds" in line]
    resumed = make_trainer(tmp_path, "prefix", scope="padding")
    resumed.train(resume=True)
    records = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines() if "train_seconds" in line]
    seconds = [record["train_seconds"] for record in records]
    assert seconds == sorted(seconds) and seconds[len(first)] >= first[-1]["train_seconds"]


def test_a_resume_drops_the_log_records_the_kill_lost(tmp_path, monkeypatch):
    """Killed at step 3 with its newest checkpoint at step 2, a run logs step 3 twice unless the resume drops the
    record of the lost step: its log and its exports must read like those of an uninterrupted run."""
    from peft_metal.training.trainer import export_checkpoint

    uninterrupted = make_trainer(tmp_path / "a", "prefix", scope="padding")
    uninterrupted.train()
    killed = make_trainer(tmp_path / "b", "prefix", scope="padding")
    killed.train(stop_after=3)
    assert latest_checkpoint(tmp_path / "b").name == "checkpoint-2"
    make_trainer(tmp_path / "b", "prefix", scope="padding").train(resume=True)

    def logged(run):
        return [(r["step"], r.get("loss")) for r in json.loads((run / "pgm" / "training_log.json").read_text())]

    steps = [json.loads(line)["step"] for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    assert steps == [0, 1, 2, 3, 4]
    assert logged(tmp_path / "b") == logged(tmp_path / "a")

    monkeypatch.setattr("peft_metal.training.trainer.load_base_model", lambda name: (make_lm("llama"), build_tokenizer()))
    exported = export_checkpoint(tmp_path / "b", tmp_path / "at-2", step=2)
    summary = json.loads((exported / "adapter_config.json").read_text())["training_summary"]
    losses = dict(logged(tmp_path / "a"))
    assert [r["step"] for r in json.loads((exported / "training_log.json").read_text())] == [0, 1, 2]
    assert summary["final_train_loss"] == round(losses[2], 4) != round(losses[4], 4)


def test_a_log_with_a_broken_line_names_it(tmp_path):
    from peft_metal.training.run_log import read_log

    (tmp_path / "log.jsonl").write_text('{"step": 1}\n{"step": 2\n{"step": 3}\n')
    with pytest.raises(ValueError, match=r"log.jsonl, line 2: not a JSON record"):
        read_log(tmp_path / "log.jsonl")


def test_a_kill_mid_write_leaves_no_record_and_the_resume_mends_the_log(tmp_path):
    """A last line without its newline is a record the kill cut short: not read, and removed before the resumed run
    appends, so its first record does not run on from the cut one."""
    from peft_metal.training.run_log import read_log, truncate_log

    log = tmp_path / "log.jsonl"
    log.write_text('{"step": 1}\n{"step": 2}\n{"step": 3, "lo')
    assert read_log(log) == [{"step": 1}, {"step": 2}]
    assert truncate_log(log, step=1) == 1
    assert log.read_text() == '{"step": 1}\n'
    log.write_text('{"step": 1}\n{"ste')
    assert truncate_log(log, step=1) == 0 and log.read_text() == '{"step": 1}\n'
    assert truncate_log(tmp_path / "none.jsonl", step=1) == 0


@pytest.mark.parametrize("weight", ["distillation_weight", "option_distillation_weight"])
def test_gradient_from_answers_only_refuses_distillation(weight):
    """Distillation needs the student's logits at every query token (or option), which the cut no longer computes."""
    with pytest.raises(ValueError, match="gradient_from_answers_only keeps the student's logits at the answers only"):
        TrainingArguments(gradient_from_answers_only=True, **{weight: 1.0})


def test_sampling_settings_reach_the_training_episodes_not_the_dev_ones(tmp_path):
    plain = make_trainer(tmp_path / "plain", "prefix")
    trainer = make_trainer(tmp_path / "family", "prefix", task_sampling="family", symbol_label_rate=0.5)
    assert (trainer.sampler.task_sampling, trainer.sampler.symbol_label_rate) == ("family", 0.5)
    assert trainer.dev_episodes == plain.dev_episodes  # dev loss stays comparable across recipes
    trainer.train(stop_after=1)
    saved = json.loads((tmp_path / "family" / "training_args.json").read_text())
    assert (saved["task_sampling"], saved["symbol_label_rate"]) == ("family", 0.5)


def test_a_run_whose_dev_episodes_cannot_fit_is_refused_before_training(tmp_path):
    with pytest.raises(ValueError, match=r"none of the 16 dev episodes fits max_pgm_tokens=5.*raise max_pgm_tokens"):
        make_trainer(tmp_path, "prefix", max_pgm_tokens=5)


def test_dev_loss_is_over_the_dev_episodes_that_fit(tmp_path):
    trainer = make_trainer(tmp_path, "prefix", max_pgm_tokens=25)
    assert 0 < len(trainer.dev_episodes) < trainer.args.eval_episodes  # some shots are longer than 25 tokens
    assert all(not trainer._too_long(episode) for episode in trainer.dev_episodes)
    assert trainer.evaluate() > 0


def test_no_dev_episodes_means_no_dev_loss(tmp_path):
    trainer = make_trainer(tmp_path, "prefix", max_steps=2, eval_episodes=0)
    assert trainer.dev_episodes == []
    trainer.train()
    log = [json.loads(line) for line in (tmp_path / "log.jsonl").read_text().splitlines()]
    assert log and not any("dev_loss" in record for record in log)
    with pytest.raises(ValueError, match="eval_episodes must be >= 0"):
        dataclasses.replace(trainer.args, eval_episodes=-1)


def write_task(folder, examples) -> None:
    folder.mkdir(parents=True)
    (folder / "task.json").write_text(json.dumps({"examples": [{"input": i, "target": o} for i, o in examples]}))


def test_a_run_on_ones_own_tasks_needs_no_bigbench(tmp_path, monkeypatch, capsys):
    """`task_dir` draws the episodes from a folder of one's own tasks (BIG-bench's format, every task or those `tasks`
    names) and `dev_task_dir` gives the dev loss; BIG-bench's splits are not read."""
    import peft_metal.training.trainer as trainer_module
    from peft_metal.cli import main
    from peft_metal.metal_prompt.model_card import card_metadata

    monkeypatch.setattr(trainer_module, "load_split_tasks", lambda *args: pytest.fail("read BIG-bench's split"))
    words = [example.input for example in tasks()[0].examples]
    write_task(tmp_path / "mine" / "upper", [(w, w.upper()) for w in words])
    write_task(tmp_path / "mine" / "reverse", [(w, w[::-1]) for w in words])
    write_task(tmp_path / "dev" / "double", [(w, w + w) for w in words])
    settings = dict(prompt_design="prefix", max_steps=2, learning_rate=1e-2, warmup_steps=1, gradient_accumulation_steps=1,
                    xp_range=(1, 3), xl_range=(0, 1), num_queries=2, eval_every=2, eval_episodes=2, log_every=1)

    def run(name: str, **extra) -> MetaTrainer:
        args = TrainingArguments(output_dir=str(tmp_path / name), task_dir=str(tmp_path / "mine"), **settings, **extra)
        trainer = MetaTrainer(args, model=make_pgm("llama", "prefix"), tokenizer=build_tokenizer())
        trainer.train()
        return trainer

    with_dev = run("with-dev", dev_task_dir=str(tmp_path / "dev"))
    assert sorted(task.name for task in with_dev.sampler.tasks) == ["reverse", "upper"]
    logged = [json.loads(line) for line in (tmp_path / "with-dev" / "log.jsonl").read_text().splitlines()]
    assert any("dev_loss" in record for record in logged)
    assert "datasets" not in card_metadata((tmp_path / "with-dev" / "pgm" / "README.md").read_text())  # not BIG-bench
    one_task = run("one-task", tasks=["upper"])
    assert [task.name for task in one_task.sampler.tasks] == ["upper"] and not one_task.dev_episodes

    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="holds no task folders"):
        run("empty", dev_task_dir=str(tmp_path / "empty"))
    config = tmp_path / "missing.json"
    config.write_text(json.dumps({"output_dir": str(tmp_path / "r"), "task_dir": str(tmp_path / "nowhere")}))
    assert main(["train", "--config", str(config)]) == 2
    assert "task_dir=" in capsys.readouterr().err
