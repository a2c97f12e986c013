"""BalancedSceneSampler: per-scene balance, determinism per (seed, epoch), rank splitting, resuming."""

from __future__ import annotations

from collections import Counter

import numpy as np
import pytest

from leftrefill.data.sampler import BalancedSceneSampler

# scene sizes 5, 8, 3, 12 (interleaved, so indices are not grouped by scene)
SIZES = {"b": 5, "a": 8, "c": 3, "d": 12}
SCENES = [scene for i in range(max(SIZES.values())) for scene in sorted(SIZES) if i < SIZES[scene]]


def _scene_counts(indices: list[int]) -> Counter:
    return Counter(SCENES[i] for i in indices)


def test_each_epoch_has_n_per_scene_without_replacement() -> None:
    sampler = BalancedSceneSampler(SCENES, 3, seed=1)
    assert len(sampler) == 4 * 3
    for epoch in range(4):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert all(type(i) is int for i in indices)
        assert _scene_counts(indices) == Counter({scene: 3 for scene in SIZES})
        assert len(set(indices)) == len(indices)  # no item twice within a scene (or at all)


def test_epochs_differ_and_same_epoch_is_deterministic() -> None:
    first, second = BalancedSceneSampler(SCENES, 3, seed=5), BalancedSceneSampler(SCENES, 3, seed=5)
    first.set_epoch(2)
    second.set_epoch(2)
    assert list(first) == list(second)
    assert list(first) == list(first)
    second.set_epoch(3)
    assert list(first) != list(second)
    other_seed = BalancedSceneSampler(SCENES, 3, seed=6)
    other_seed.set_epoch(2)
    assert list(first) != list(other_seed)


def test_independent_of_global_rng() -> None:
    sampler = BalancedSceneSampler(SCENES, 3)
    np.random.seed(0)
    a = list(sampler)
    np.random.seed(1)
    assert list(sampler) == a


@pytest.mark.parametrize("num_replicas", [2, 5])
def test_ranks_split_the_epoch(num_replicas: int) -> None:
    samplers = [BalancedSceneSampler(SCENES, 3, num_replicas=num_replicas, rank=r, seed=3)
                for r in range(num_replicas)]
    for epoch in (0, 1):
        for sampler in samplers:
            sampler.set_epoch(epoch)
        global_list = samplers[0].global_indices().tolist()
        lists = [list(s) for s in samplers]
        expected_len = -(-len(global_list) // num_replicas)
        assert all(len(l) == len(s) == expected_len for l, s in zip(lists, samplers))
        # interleave the ranks back: the global list followed by padding taken from its start
        merged = [lists[r][k] for k in range(expected_len) for r in range(num_replicas)]
        n_pad = expected_len * num_replicas - len(global_list)
        assert merged == global_list + global_list[:n_pad]
        assert _scene_counts(merged[:len(global_list)]) == Counter({scene: 3 for scene in SIZES})
        for r in range(num_replicas):  # disjoint apart from padding
            for q in range(r + 1, num_replicas):
                shared = set(lists[r]) & set(lists[q])
                assert shared <= set(global_list[:n_pad])


def test_two_ranks_disjoint_without_padding() -> None:
    ranks = [BalancedSceneSampler(SCENES, 2, num_replicas=2, rank=r) for r in range(2)]
    a, b = (list(s) for s in ranks)
    assert not set(a) & set(b)
    assert sorted(a + b) == sorted(ranks[0].global_indices().tolist())


def test_short_scene_error_names_scene_and_count() -> None:
    with pytest.raises(ValueError, match=r"'b' \(5\), 'c' \(3\); sample them with replacement"):
        BalancedSceneSampler(SCENES, 6)


def test_replacement_for_short_scenes_only() -> None:
    sampler = BalancedSceneSampler(SCENES, 6, replacement=True)
    for epoch in range(3):
        sampler.set_epoch(epoch)
        indices = list(sampler)
        assert _scene_counts(indices) == Counter({scene: 6 for scene in SIZES})
        for scene in ("a", "d"):  # enough items: still without replacement
            drawn = [i for i in indices if SCENES[i] == scene]
            assert len(set(drawn)) == 6
        short = [i for i in indices if SCENES[i] == "c"]
        assert len(short) == 6 and set(short) <= {i for i, s in enumerate(SCENES) if s == "c"}


def test_state_dict_restores_epoch() -> None:
    sampler = BalancedSceneSampler(SCENES, 3, seed=9)
    sampler.set_epoch(4)
    expected = list(sampler)
    state = sampler.state_dict()
    assert state == {"epoch": 4, "seed": 9}
    resumed = BalancedSceneSampler(SCENES, 3, seed=9)
    resumed.load_state_dict(state)
    assert resumed.epoch == 4 and list(resumed) == expected


def test_argument_validation() -> None:
    with pytest.raises(ValueError, match="rank 2 is outside"):
        BalancedSceneSampler(SCENES, 1, num_replicas=2, rank=2)
    with pytest.raises(ValueError, match="rank -1"):
        BalancedSceneSampler(SCENES, 1, num_replicas=2, rank=-1)
    with pytest.raises(ValueError, match="n_sample_per_scene"):
        BalancedSceneSampler(SCENES, 0)
    sampler = BalancedSceneSampler(SCENES, 1)
    assert (sampler.num_replicas, sampler.rank) == (1, 0)  # no process group in the tests
