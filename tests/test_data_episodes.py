"""`EpisodeSampler`: ranges, disjointness, determinism and exact resumption."""

import itertools
import json

import pytest

from peft_metal.data import Episode, EpisodeSampler, Example, Task


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
