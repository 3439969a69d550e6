"""`EpisodeSampler`: ranges, disjointness, determinism and exact resumption."""

import itertools
import json

import pytest

from peft_metal.data import Episode, EpisodeSampler, Example, Task
from peft_metal.data.episodes import SYMBOL_LABELS, examples_by_label, has_fixed_labels, task_with_symbol_labels


def make_task(name, num_examples):
    return Task(name, [Example(f"{name} q{i}", f"a{i}") for i in range(num_examples)])


@pytest.fixture
def tasks():
    return [make_task("alpha", 30), make_task("beta/one", 24), make_task("gamma", 50)]


def test_episodes_respect_ranges_and_are_disjoint(tasks):
    sampler = EpisodeSampler(tasks, xp_range=(4, 16), xl_range=(0, 4), num_queries=4, seed=0)
    by_name = {task.name: task for task in tasks}
    episodes = list(itertools.islice(sampler, 300))
    for episode in episodes:
        assert isinstance(episode, Episode)
        assert 4 <= len(episode.xp) <= 16 and 0 <= len(episode.xl) <= 4 and len(episode.queries) == 4
        drawn = episode.xp + episode.xl + episode.queries
        assert len(set(drawn)) == len(drawn)
        assert set(drawn) <= set(by_name[episode.task_name].examples)
    # Every task, and both ends of each range, come up.
    assert {episode.task_name for episode in episodes} == set(by_name)
    assert {len(episode.xp) for episode in episodes} >= {4, 16}
    assert {len(episode.xl) for episode in episodes} >= {0, 4}
    assert sampler.step == 300


def test_same_seed_same_episodes_other_seed_differs(tasks):
    first = list(itertools.islice(EpisodeSampler(tasks, seed=1), 20))
    again = list(itertools.islice(EpisodeSampler(tasks, seed=1), 20))
    other = list(itertools.islice(EpisodeSampler(tasks, seed=2), 20))
    assert first == again
    assert first != other


def test_resume_continues_with_the_same_episodes(tasks):
    uninterrupted = list(itertools.islice(EpisodeSampler(tasks, seed=5), 30))

    sampler = EpisodeSampler(tasks, seed=5)
    before = list(itertools.islice(sampler, 12))
    state = json.loads(json.dumps(sampler.state_dict()))  # as it would come back from a checkpoint
    resumed = EpisodeSampler(tasks, seed=5)
    resumed.load_state_dict(state)
    after = list(itertools.islice(resumed, 18))

    assert state["step"] == 12
    assert before + after == uninterrupted
    assert sampler.episode(20) == uninterrupted[20]


def test_load_state_dict_refuses_other_settings(tasks):
    state = EpisodeSampler(tasks, seed=5).state_dict()
    with pytest.raises(ValueError, match="different seed"):
        EpisodeSampler(tasks, seed=6).load_state_dict(state)
    with pytest.raises(ValueError, match="different xp_range, task_names"):
        EpisodeSampler(tasks[:2], xp_range=(2, 8), seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match=r"lacks \['step'\]"):
        EpisodeSampler(tasks, seed=5).load_state_dict({key: value for key, value in state.items() if key != "step"})
    with pytest.raises(ValueError, match="invalid 'step'"):
        EpisodeSampler(tasks, seed=5).load_state_dict({**state, "step": -1})


def test_tasks_too_small_for_the_largest_episode_are_listed(tasks):
    with pytest.raises(ValueError, match=r"at least 24 examples .* these have fewer: small \(10\), tiny \(3\)"):
        EpisodeSampler(tasks + [make_task("small", 10), make_task("tiny", 3)])
    # Lowering the ranges makes them usable.
    sampler = EpisodeSampler([make_task("tiny", 3)], xp_range=(1, 2), xl_range=(0, 0), num_queries=1)
    assert len(next(sampler).queries) == 1


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"tasks": []}, ValueError, "at least one task"),
        ({"tasks": ["alpha"]}, TypeError, "not a Task"),
        ({"xp_range": (0, 4)}, ValueError, "xp_range must satisfy 1 <= low <= high"),
        ({"xp_range": (8, 4)}, ValueError, "xp_range must satisfy"),
        ({"xl_range": (-1, 2)}, ValueError, "xl_range must satisfy 0 <= low"),
        ({"xl_range": 4}, TypeError, "xl_range must be a \\(low, high\\) pair"),
        ({"xp_range": (1.0, 4)}, TypeError, "xp_range must be a \\(low, high\\) pair"),
        ({"num_queries": 0}, ValueError, "num_queries must be a positive int"),
        ({"seed": "0"}, TypeError, "seed must be an int"),
    ],
)
def test_rejects_bad_settings(tasks, kwargs, error, message):
    with pytest.raises(error, match=message):
        EpisodeSampler(**{"tasks": tasks, **kwargs})


def test_rejects_repeated_task_names():
    with pytest.raises(ValueError, match=r"more than once: \['alpha'\]"):
        EpisodeSampler([make_task("alpha", 30), make_task("alpha", 30)])


def labelled_task(name, labels=("yes", "no"), num_examples=30, inputs=None):
    inputs = inputs or [f"{name} sentence {i}" for i in range(num_examples)]
    return Task(name, [Example(text, labels[i % len(labels)], options=labels) for i, text in enumerate(inputs)])


def test_family_sampling_draws_every_family_equally():
    tasks = [make_task(f"big/{i}", 30) for i in range(9)] + [make_task("small", 30)]
    by_task = [e.task_name for e in itertools.islice(EpisodeSampler(tasks, seed=0), 600)]
    by_family = [e.task_name for e in itertools.islice(EpisodeSampler(tasks, seed=0, task_sampling="family"), 600)]
    assert 0.05 < by_task.count("small") / 600 < 0.15  # one task in ten
    assert 0.42 < by_family.count("small") / 600 < 0.58  # one family in two
    assert {name for name in by_family if name != "small"} == {task.name for task in tasks[:9]}


def test_symbol_labels_rename_every_label_the_same_way_in_shots_and_queries():
    sentiment = labelled_task("sentiment", labels=("positive", "negative", "neutral"))
    questions = Task("quiz", [Example(f"q{i}", "a", options=("a", f"b{i}")) for i in range(30)])  # options per question
    sampler = EpisodeSampler([sentiment, questions], xp_range=(6, 8), xl_range=(1, 2), seed=3, symbol_label_rate=1.0)
    plain = EpisodeSampler([sentiment, questions], xp_range=(6, 8), xl_range=(1, 2), seed=3)
    renamed_any = False
    for step in range(40):
        episode, original = sampler.episode(step), plain.episode(step)
        pairs = list(zip(original.xp + original.xl + original.queries, episode.xp + episode.xl + episode.queries))
        if episode.task_name == "quiz":
            assert episode == original
            continue
        renamed_any = True
        mapping = {}
        for before, after in pairs:
            assert after.input == before.input and after.output in SYMBOL_LABELS
            for old, new in zip(before.options, after.options):
                assert mapping.setdefault(old, new) == new  # one renaming for the whole episode
            assert mapping[before.output] == after.output
        assert len(set(mapping.values())) == len(mapping) == 3
    assert renamed_any


def test_a_task_with_symbol_labels_renames_every_example_the_same_way():
    import random

    sentiment = labelled_task("sentiment", labels=("positive", "negative", "neutral"))
    renamed = task_with_symbol_labels(sentiment, random.Random("sentiment"))
    mapping = {}
    for before, after in zip(sentiment.examples, renamed.examples, strict=True):
        assert after.input == before.input and after.output in SYMBOL_LABELS
        for old, new in zip(before.options, after.options):
            assert mapping.setdefault(old, new) == new
        assert mapping[before.output] == after.output
    assert len(set(mapping.values())) == 3 and renamed.name == "sentiment"
    assert task_with_symbol_labels(sentiment, random.Random("sentiment")) == renamed  # seeded: the same renaming
    quiz = Task("quiz", [Example(f"q{i}", "a", options=("a", f"b{i}")) for i in range(30)])
    with pytest.raises(ValueError, match="quiz is not a classification task"):
        task_with_symbol_labels(quiz, random.Random(0))


def test_symbol_label_rate_renames_that_share_and_zero_keeps_the_old_stream():
    sentiment = labelled_task("sentiment")
    half = EpisodeSampler([sentiment], seed=1, symbol_label_rate=0.5)
    renamed = sum(half.episode(step).queries[0].output in SYMBOL_LABELS for step in range(400))
    assert 150 < renamed < 250
    old = EpisodeSampler([sentiment], seed=1)
    off = EpisodeSampler([sentiment], seed=1, task_sampling="task", symbol_label_rate=0.0)
    assert [off.episode(step) for step in range(20)] == [old.episode(step) for step in range(20)]


def test_tasks_that_list_their_labels_or_have_many_are_not_renamed():
    listed = labelled_task("listed", inputs=[f"Is it yes or no? case {i}" for i in range(30)])
    many = labelled_task("many", labels=tuple(f"label{i}" for i in range(12)))
    assert has_fixed_labels(labelled_task("plain")) and not has_fixed_labels(listed) and not has_fixed_labels(many)
    assert not has_fixed_labels(make_task("generative", 30))


def test_state_saved_before_the_sampling_settings_existed_still_resumes(tasks):
    sampler = EpisodeSampler(tasks, seed=5)
    state = sampler.state_dict()
    del state["task_sampling"], state["symbol_label_rate"], state["foreign_shots"]
    resumed = EpisodeSampler(tasks, seed=5)
    resumed.load_state_dict(state)
    with pytest.raises(ValueError, match="task_sampling"):
        EpisodeSampler(tasks, seed=5, task_sampling="family").load_state_dict(state)
    with pytest.raises(ValueError, match="foreign_shots"):
        EpisodeSampler(tasks, seed=5, foreign_shots=True).load_state_dict(state)


def test_foreign_shots_are_as_many_as_xp_from_another_family_and_leave_the_episode_as_it_was(tasks):
    siblings = [make_task("beta/two", 24), make_task("beta/three", 24)]
    plain = EpisodeSampler(tasks + siblings, seed=3)
    foreign = EpisodeSampler(tasks + siblings, seed=3, foreign_shots=True)
    drawn = set()
    for step in range(200):
        episode = foreign.episode(step)
        family = episode.task_name.split("/")[0]
        assert episode.foreign_task.split("/")[0] != family
        examples = {task.name: set(task.examples) for task in tasks + siblings}[episode.foreign_task]
        assert len(episode.foreign_xp) == len(episode.xp) and set(episode.foreign_xp) <= examples
        assert len(set(episode.foreign_xp)) == len(episode.foreign_xp)
        unchanged = plain.episode(step)
        assert (episode.task_name, episode.xp, episode.xl, episode.queries) == (
            unchanged.task_name, unchanged.xp, unchanged.xl, unchanged.queries
        )
        assert unchanged.foreign_task is None and unchanged.foreign_xp == []
        drawn.add(episode.foreign_task)
    assert drawn == {task.name for task in tasks + siblings}
    assert foreign.episode(7) == EpisodeSampler(tasks + siblings, seed=3, foreign_shots=True).episode(7)


def test_foreign_shots_need_a_second_family():
    with pytest.raises(ValueError, match="all of family 'beta'.*set foreign_shots to False"):
        EpisodeSampler([make_task("beta/one", 30), make_task("beta/two", 30)], foreign_shots=True)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"task_sampling": "families"}, "task_sampling must be one of"),
        ({"symbol_label_rate": 1.5}, "probability"),
        ({"query_sampling": "stratified"}, "query_sampling must be one of"),
    ],
)
def test_rejects_bad_sampling_settings(tasks, kwargs, message):
    with pytest.raises(ValueError, match=message):
        EpisodeSampler(tasks, **kwargs)


def skewed_task(name="skewed"):
    """Nine in ten examples say "common": a random draw of four queries is mostly "common"."""
    labels = ("common", "rare", "rarer")
    outputs = ["common"] * 90 + ["rare"] * 7 + ["rarer"] * 3
    return Task(name, [Example(f"{name} {i}", output, options=labels) for i, output in enumerate(outputs)])


def test_balanced_queries_take_the_labels_in_turn_and_stay_outside_the_shots():
    quiz = Task("quiz", [Example(f"q{i}", "a", options=("a", f"b{i}")) for i in range(30)])  # options per question
    balanced = EpisodeSampler([skewed_task(), quiz], xp_range=(4, 8), num_queries=3, seed=2, query_sampling="balanced")
    plain = EpisodeSampler([skewed_task(), quiz], xp_range=(4, 8), num_queries=3, seed=2)
    rare_random = rare_balanced = 0
    for step in range(200):
        episode, unbalanced = balanced.episode(step), plain.episode(step)
        assert (episode.task_name, episode.xp, episode.xl) == (unbalanced.task_name, unbalanced.xp, unbalanced.xl)
        if episode.task_name == "quiz":
            assert episode.queries == unbalanced.queries  # no shared label set: drawn as before
            continue
        outputs = [query.output for query in episode.queries]
        rare_balanced += outputs.count("rarer")
        rare_random += [query.output for query in unbalanced.queries].count("rarer")
        assert len(set(map(id, episode.queries))) == 3 and not {id(q) for q in episode.queries} & {id(s) for s in episode.xp + episode.xl}
        shots_rarer = sum(shot.output == "rarer" for shot in episode.xp + episode.xl)
        if shots_rarer < 3:  # some "rarer" example is left: each of the three labels once
            assert sorted(outputs) == ["common", "rare", "rarer"]
    assert rare_balanced > 5 * max(rare_random, 1)
    assert balanced.episode(11) == EpisodeSampler([skewed_task(), quiz], xp_range=(4, 8), num_queries=3, seed=2, query_sampling="balanced").episode(11)


def test_balanced_queries_skip_a_label_with_nothing_left():
    task = skewed_task()
    sampler = EpisodeSampler(
        [task], xp_range=(16, 16), xl_range=(0, 0), num_queries=8, seed=0, query_sampling="balanced"
    )
    exhausted = 0
    for step in range(100):
        episode = sampler.episode(step)
        drawn = {label: [q.output for q in episode.queries].count(label) for label in ("common", "rare", "rarer")}
        left = {
            label: sum(e.output == label for e in task.examples) - sum(s.output == label for s in episode.xp) - drawn[label]
            for label in drawn
        }
        assert sum(drawn.values()) == 8
        for label, count in drawn.items():  # a label drawn fewer times than another's turns has nothing left
            if count < max(drawn.values()) - 1:
                assert left[label] == 0
                exhausted += 1
    assert exhausted  # the three "rarer" examples are often all in the shots or drawn


def test_examples_by_label_needs_one_shared_label_set():
    grouped = examples_by_label(skewed_task())
    assert list(grouped) == ["common", "rare", "rarer"] and [len(g) for g in grouped.values()] == [90, 7, 3]
    reordered = Task("mixed", [Example("x", "yes", options=("yes", "no")), Example("y", "no", options=("no", "yes"))])
    assert list(examples_by_label(reordered)) == ["yes", "no"]  # the same set in another order is one label set
    assert examples_by_label(make_task("generative", 30)) is None
    assert examples_by_label(Task("quiz", [Example(f"q{i}", "a", options=("a", f"b{i}")) for i in range(3)])) is None


def test_a_state_saved_before_query_sampling_existed_resumes_random_only():
    sampler = EpisodeSampler([skewed_task()], seed=5)
    state = sampler.state_dict()
    del state["query_sampling"]
    EpisodeSampler([skewed_task()], seed=5).load_state_dict(state)
    with pytest.raises(ValueError, match="query_sampling"):
        EpisodeSampler([skewed_task()], seed=5, query_sampling="balanced").load_state_dict(state)
