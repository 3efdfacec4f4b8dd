"""A small world to pretrain a toy base on: captioned scenes of simple objects, deterministic by seed.

A scene is one or two objects (shape, colour, size, position) on a background, drawn at 64×64 and captioned
from the same facts ("a big red circle on the left and a small blue square on the right, on a dark background").
Captions leave facts out at random (then they are drawn at random), so the model learns each word on its own.

The demo concepts (data/alice, bob, carol) are objects this world has no words for: shapes outside the vocabulary
below (`CONCEPTS`), each in one colour, drawn by the same renderer so that they live in the same picture space
(`draw_concepts` writes their folders, deterministically).
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = 64
SUPERSAMPLE = 4  # drawn 4× larger, then reduced: smooth edges at little cost (3 ms a scene)

COLOURS = {"red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 210, 40),
           "purple": (140, 50, 180), "orange": (240, 130, 30), "white": (240, 240, 240)}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.15, "big": 0.25}  # radius as a fraction of the image side
POSITIONS = {"left": (0.27, 0.5), "right": (0.73, 0.5), "top": (0.5, 0.27), "bottom": (0.5, 0.73),
             "center": (0.5, 0.5)}
PLACE = {"left": "on the left", "right": "on the right", "top": "at the top", "bottom": "at the bottom",
         "center": "in the center"}
BACKGROUNDS = {"gray": (128, 128, 128), "dark": (30, 30, 40), "light": (215, 215, 205)}
PAIRS = (("left", "right"), ("top", "bottom"))

# Made-up objects for the demo concepts: shapes the world's words never name, in one plain colour each. (Patterned
# concepts were tried until the tenth session: stripes a few pixels wide are finer than the 16×16 latents this base's
# UNet draws, and no adapter drew them; docs/world.md. World objects may be patterned, with
# `random_scene(patterned=…)`, the pattern said in the caption, and the judge's near misses use patterns too.)
PATTERN_SHAPES = ("star", "ring", "heart")
PATTERNS = ("stripes", "checks", "dots")


@dataclass(frozen=True)
class Look:
    """How a demo concept looks, and the world words its tuning starts from: its class word and, for the two stars,
    an init word that tells them apart (concept.toml's init_word)."""
    shape: str
    pattern: str
    colour: str
    colour2: str
    class_word: str
    init_word: str = ""


# The stars' first tokens start at their colours: started random, the two tokens hardly differ, and fusion gave
# one star's colour to the other (docs/world.md, "Trials of the twenty-second session"). Bob shares his class with
# no one; started at "blue" he came out a plain blue disc beside the others.
CONCEPTS = {"alice": Look("star", "", "red", "", "diamond", "red"),
            "bob": Look("ring", "", "blue", "", "circle"),
            # a second star: two concepts of one class, so that fusing them can show concept conflict
            "carol": Look("star", "", "green", "", "diamond", "green")}


def look_key(shape: str, pattern: str, colour: str, colour2: str) -> tuple[str, str, str, str]:
    """What makes two things look the same: a plain thing's second colour is never drawn, so it does not count."""
    return (shape, pattern, colour, colour2 if pattern else "")


@dataclass
class Thing:
    shape: str
    colour: str
    size: str
    position: str
    pattern: str = ""          # concept objects only
    colour2: str = "white"     # the pattern's second colour
    jitter: tuple[float, float] = (0.0, 0.0)

    def box(self) -> tuple[float, float, float, float]:
        """(x0, y0, x1, y1) in [0, 1]: where the object is, for layouts and the judge."""
        cx, cy = self.centre()
        r = SIZES[self.size]
        return (cx - r, cy - r, cx + r, cy + r)

    def centre(self) -> tuple[float, float]:
        x, y = POSITIONS[self.position]
        return (x + self.jitter[0], y + self.jitter[1])


@dataclass
class Scene:
    things: list[Thing]
    background: str
    caption: str = ""
    said: dict = field(default_factory=dict)  # which facts the caption states; "only": the one thing it names


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "square":
        r *= 0.85
        return [(cx - r, cy - r), (cx + r, cy - r), (cx + r, cy + r), (cx - r, cy + r)]
    if shape == "triangle":
        return [(cx + r * math.cos(a), cy + r * math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.75 * r, cy), (cx, cy + r), (cx - 0.75 * r, cy)]
    if shape == "star":
        return [(cx + (r if k % 2 == 0 else 0.45 * r) * math.cos(-math.pi / 2 + k * math.pi / 5),
                 cy + (r if k % 2 == 0 else 0.45 * r) * math.sin(-math.pi / 2 + k * math.pi / 5)) for k in range(10)]
    if shape == "heart":
        pts = []
        for k in range(48):
            t = 2 * math.pi * k / 48
            x = 16 * math.sin(t) ** 3
            y = 13 * math.cos(t) - 5 * math.cos(2 * t) - 2 * math.cos(3 * t) - math.cos(4 * t)
            pts.append((cx + r * x / 17, cy - r * (y + 2) / 17))
        return pts
    raise ValueError(f"unknown shape {shape!r}")


def _silhouette(thing: Thing, scale: int) -> Image.Image:
    """The object's mask ('L', 255 inside) at SIZE·scale."""
    n = SIZE * scale
    m = Image.new("L", (n, n), 0)
    d = ImageDraw.Draw(m)
    cx, cy = (v * n for v in thing.centre())
    r = SIZES[thing.size] * n
    if thing.shape == "circle":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    elif thing.shape == "ring":
        d.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
        d.ellipse((cx - 0.5 * r, cy - 0.5 * r, cx + 0.5 * r, cy + 0.5 * r), fill=0)
    else:
        d.polygon(_polygon(thing.shape, cx, cy, r), fill=255)
    return m


def _fill(thing: Thing, scale: int) -> Image.Image:
    """The object's colours over the whole canvas (its pattern, if any)."""
    n = SIZE * scale
    img = Image.new("RGB", (n, n), COLOURS[thing.colour])
    if not thing.pattern:
        return img
    d = ImageDraw.Draw(img)
    step = max(2, int(SIZES[thing.size] * n / 2.5))
    c2 = COLOURS[thing.colour2]
    if thing.pattern == "stripes":
        for x in range(-n, n, 2 * step):
            d.polygon([(x, 0), (x + step, 0), (x + step + n, n), (x + n, n)], fill=c2)
    elif thing.pattern == "checks":
        for i in range(0, n, step):
            for j in range(0, n, step):
                if (i // step + j // step) % 2:
                    d.rectangle((i, j, i + step - 1, j + step - 1), fill=c2)
    elif thing.pattern == "dots":
        for i in range(0, n, step):
            for j in range(0, n, step):
                d.ellipse((i + step * 0.25, j + step * 0.25, i + step * 0.75, j + step * 0.75), fill=c2)
    return img


def render(scene: Scene) -> tuple[Image.Image, list[Image.Image]]:
    """(image, one mask per thing), both SIZE×SIZE."""
    n = SIZE * SUPERSAMPLE
    img = Image.new("RGB", (n, n), BACKGROUNDS[scene.background])
    masks = []
    for t in scene.things:
        m = _silhouette(t, SUPERSAMPLE)
        img.paste(_fill(t, SUPERSAMPLE), (0, 0), m)
        masks.append(m.resize((SIZE, SIZE), Image.BILINEAR))
    return img.resize((SIZE, SIZE), Image.LANCZOS), masks


def _words(t: Thing, said: dict, object_word: str | None = None) -> str:
    concept = object_word is not None or t.shape in PATTERN_SHAPES  # its colours are part of what its handle means
    parts = []
    if said.get("size"):
        parts.append(t.size)
    if said.get("colour") and not concept:
        parts.append(t.colour)
    parts.append(object_word or t.shape)
    if t.pattern and not concept:  # a patterned world shape: "a red circle with white stripes"
        parts += ["with", *([t.colour2] if said.get("colour") else []), t.pattern]
    return ("an " if parts[0][0] in "aeiou" else "a ") + " ".join(parts)


def caption(scene: Scene, object_words: list[str | None] | None = None) -> str:
    said = scene.said
    words = object_words or [None] * len(scene.things)
    named = [(t, w) for i, (t, w) in enumerate(zip(scene.things, words)) if said.get("only", i) == i]
    phrases = [_words(t, said, w) for t, w in named]
    if said.get("position"):
        phrases = [f"{p} {PLACE[t.position]}" for p, (t, _) in zip(phrases, named)]
    text = " and ".join(phrases)
    if said.get("background"):
        text += f", on a {scene.background} background"
    return text


def random_scene(rng: random.Random, n_things: int | None = None, patterned: float = 0.0, partial: float = 0.0,
                 unplaced: float = 0.0) -> Scene:
    """One captioned scene of the world's own objects; each is patterned (stripes, checks or dots in a second
    colour, said in the caption) with probability `patterned`. With probability `partial` the caption of a
    two-object scene names only one of them, as real captions leave things out: a base trained only on complete
    captions reads "a red square" as "a red square and nothing else", and regional sampling, whose region prompts
    each name one object, then draws one object in all. With probability `unplaced` such a caption also leaves out
    where the named object is ("a red square"), which is how a region prompt reads. The concepts' shapes never
    appear."""
    n = n_things or (1 if rng.random() < 0.6 else 2)
    positions = [rng.choice(list(POSITIONS))] if n == 1 else list(rng.choice(PAIRS))
    if n == 2 and rng.random() < 0.5:
        positions.reverse()
    things = [Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)), p,
                    jitter=(rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))) for p in positions]
    if n == 2:
        for t in things:
            t.size = "small" if t.position in ("left", "right", "top", "bottom") and rng.random() < 0.5 else t.size
    for t in things if patterned else ():  # no draws at 0: the unpatterned world's scenes stay what they were
        if rng.random() < patterned:
            t.pattern = rng.choice(PATTERNS)
            t.colour2 = rng.choice([c for c in COLOURS if c != t.colour])
    said = {"colour": rng.random() < 0.9, "size": rng.random() < 0.5,
            "position": rng.random() < (0.6 if n == 1 else 1.0), "background": rng.random() < 0.5}
    scene = Scene(things, rng.choice(list(BACKGROUNDS)), said=said)
    if n == 2 and partial and rng.random() < partial:  # no draws at 0, as above
        said["only"] = rng.randrange(2)
        if unplaced and rng.random() < unplaced:
            said["position"] = False
    scene.caption = caption(scene)
    return scene


def scenes(seed: int, count: int):
    """`count` scenes, the same for the same seed on every machine."""
    rng = random.Random(seed)
    for _ in range(count):
        yield random_scene(rng)


def concept_thing(name: str, size: str, position: str, jitter=(0.0, 0.0)) -> Thing:
    look = CONCEPTS[name]
    return Thing(look.shape, look.colour, size, position, look.pattern, look.colour2, jitter)


def concept_scene(name: str, rng: random.Random, alone: bool | None = None, size: str | None = None,
                  place: str | None = None) -> tuple[Scene, str]:
    """(scene, caption with <TOK>): the concept alone or beside one of the world's objects; mask = the concept's.
    `alone`, and the lone concept's `size` and `place`, are drawn at random where not given."""
    jitter = (rng.uniform(-0.04, 0.04), rng.uniform(-0.04, 0.04))
    if alone is None:
        alone = rng.random() < 0.6
    if alone:
        things = [concept_thing(name, size or rng.choice(list(SIZES)), place or rng.choice(list(POSITIONS)), jitter)]
    else:
        here, there = rng.choice(PAIRS)[:: rng.choice((1, -1))]
        things = [concept_thing(name, "big", here, jitter),
                  Thing(rng.choice(SHAPES), rng.choice(list(COLOURS)), "small", there)]
    said = {"colour": True, "size": False, "position": True, "background": rng.random() < 0.5}
    scene = Scene(things, rng.choice(list(BACKGROUNDS)), said=said)
    scene.caption = caption(scene, ["<TOK>"] + [None] * (len(things) - 1))
    return scene, scene.caption


def draw_concepts(out: str | Path, n: int = 10, names: tuple[str, ...] = tuple(CONCEPTS)) -> list[Path]:
    """Write each demo concept's folder under `out`: n images, a caption with <TOK> and the concept's mask beside
    each, and concept.toml. The same folders every time (seeded per concept).

    The concept is big in every picture and alone at each of the world's places in turn; every third picture puts
    it beside a small world object instead. A user's photos show their concept large and in varied places, and
    this base draws what it saw: from folders where half the pictures held a small concept at random places, the
    tuned carol came out small and blobby (recognised 8 in 16) and bob, never shown in the center, was lost there
    (docs/world.md, "Trials of the twelfth session")."""
    folders = []
    places = list(POSITIONS)
    for name in names:
        rng = random.Random(1000 + list(CONCEPTS).index(name))
        folder = Path(out) / name
        (folder / "masks").mkdir(parents=True, exist_ok=True)
        look = CONCEPTS[name]
        init = f'init_word = "{look.init_word}"\n' if look.init_word else ""
        (folder / "concept.toml").write_text(f'name = "{name}"\nclass_word = "{look.class_word}"\n{init}')
        for i in range(n):
            alone = i % 3 != 2
            place = places[(i - i // 3) % len(places)]  # the k-th lone picture takes the k-th place
            scene, text = concept_scene(name, rng, alone=alone, size="big", place=place)
            img, masks = render(scene)
            img.save(folder / f"{i:02d}.png", optimize=True)
            masks[0].point(lambda v: 255 if v >= 128 else 0).save(folder / "masks" / f"{i:02d}.png", optimize=True)
            (folder / f"{i:02d}.txt").write_text(text + "\n")
        folders.append(folder)
    return folders
