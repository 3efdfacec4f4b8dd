"""The shipped judge on fresh clean renders (a seed scripts/train_judge.py never uses): it recognises each demo
concept in its box, tells alice from carol (both stars, class "diamond"), and does not take near misses (a concept's
shape with its colour changed or a pattern added) for a concept."""

from __future__ import annotations

import random

import pytest

from mos.shared.world import scenes as world
from mos.shared.world.judge import OBJECTS, Judge

SEED = 424242  # training uses seeds 0…7


@pytest.fixture(scope="module")
def judge():
    return Judge()


def contrast(a: str, b: str) -> float:
    return sum((x - y) ** 2 for x, y in zip(world.COLOURS[a], world.COLOURS[b])) ** 0.5


def near_misses(name: str) -> list[tuple[str, str, str]]:
    """(pattern, colour, pattern colour) of every look one attribute away from `name`'s, none of them a concept's: a
    plain concept in another colour or with a pattern added; a patterned one with any one attribute changed."""
    v = world.CONCEPTS[name]
    others = [c for c in world.COLOURS if c not in (v.colour, v.colour2)]
    looks = [(v.pattern, c, v.colour2) for c in others]
    if v.pattern:
        looks += [(v.pattern, v.colour, c) for c in others] + [(p, v.colour, v.colour2) for p in world.PATTERNS
                                                               if p != v.pattern]
    else:  # patterns that stand out from the concept's colour (train_judge.MIN_CONTRAST: not orange on red)
        looks += [(p, v.colour, c) for p in world.PATTERNS for c in others if contrast(v.colour, c) >= 100]
    concepts = {world.look_key(k.shape, k.pattern, k.colour, k.colour2) for k in world.CONCEPTS.values()}
    return [lk for lk in looks if world.look_key(v.shape, *lk) not in concepts]


def test_judge_knows_other_and_none():
    assert {"other", "none", *world.CONCEPTS, *world.SHAPES} == set(OBJECTS)


@pytest.mark.parametrize("name", list(world.CONCEPTS))
def test_judge_recognises_each_concept_and_never_swaps_the_stars(judge, name):
    rng = random.Random(SEED + list(world.CONCEPTS).index(name))
    got = []
    for _ in range(30):
        scene, _ = world.concept_scene(name, rng)
        got.append(judge(world.render(scene)[0], [scene.things[0].box()])[0]["object"])
    assert sum(g == name for g in got) >= 27, got
    twins = [k for k, v in world.CONCEPTS.items() if k != name and v.shape == world.CONCEPTS[name].shape]
    assert not [g for g in got if g in twins], got  # alice is never carol, nor carol alice


def test_judge_rejects_near_misses(judge):
    rng = random.Random(SEED + 100)
    called, total = [], 0
    for name, v in world.CONCEPTS.items():
        for pattern, colour, colour2 in near_misses(name) * 2:
            scene, _ = world.concept_scene(name, rng)
            t = scene.things[0]
            scene.things[0] = world.Thing(v.shape, colour, t.size, t.position, pattern, colour2, t.jitter)
            got = judge(world.render(scene)[0], [scene.things[0].box()])[0]["object"]
            total += 1
            if got in world.CONCEPTS:
                called.append((name, pattern, colour, colour2, got))
    assert total >= 60
    assert len(called) <= 0.1 * total, f"{len(called)}/{total} near misses called a concept: {called}"
