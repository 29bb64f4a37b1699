"""A procedural multi-label image-text set: coloured shapes on textured backgrounds, described by noisy tags.

It exists for fast tests and as the fallback when no real data is present. Every label is visible in the image
(a shape, a colour, a background texture) and named in the text (a tag or a synonym), so a model trained on it
must beat a random ranking. The text also carries distractor words and label noise (dropped and wrong tags),
so it is not trivially solved from one modality. Everything is drawn from one numpy Generator: same seed, same set.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .base import CrossModalDataset, DatasetError

SHAPES = ["circle", "square", "triangle", "cross"]
COLOURS = {"red": (220, 40, 40), "green": (40, 180, 60), "blue": (50, 80, 220), "yellow": (230, 210, 40)}
TEXTURES = ["stripes", "dots", "grid"]
LABEL_NAMES = sorted(SHAPES + list(COLOURS) + TEXTURES)

# Words a text may use for a label, so the text side is not a copy of the label names.
SYNONYMS = {
    "circle": ["circle", "round", "disc"],
    "square": ["square", "box", "block"],
    "triangle": ["triangle", "pyramid"],
    "cross": ["cross", "plus"],
    "red": ["red", "crimson"],
    "green": ["green", "emerald"],
    "blue": ["blue", "navy"],
    "yellow": ["yellow", "golden"],
    "stripes": ["stripes", "striped", "lines"],
    "dots": ["dots", "dotted", "spots"],
    "grid": ["grid", "checked", "tiles"],
}
DISTRACTORS = ["photo", "nikon", "canon", "explore", "2008", "flickr", "art", "macro", "bw", "abigfave", "light", "nice"]


def _draw_shape(draw, shape: str, cx: float, cy: float, r: float, fill) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=fill)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=fill)
    else:  # cross
        w = r / 3
        draw.rectangle([cx - r, cy - w, cx + r, cy + w], fill=fill)
        draw.rectangle([cx - w, cy - r, cx + w, cy + r], fill=fill)


def _draw_texture(draw, texture: str, size: int, ink) -> None:
    step = max(4, size // 8)
    if texture == "stripes":
        for x in range(0, size, step):
            draw.rectangle([x, 0, x + step // 3, size], fill=ink)
    elif texture == "dots":
        for y in range(step // 2, size, step):
            for x in range(step // 2, size, step):
                draw.ellipse([x - 1, y - 1, x + 1, y + 1], fill=ink)
    else:  # grid
        for v in range(0, size, step):
            draw.line([(v, 0), (v, size)], fill=ink)
            draw.line([(0, v), (size, v)], fill=ink)


def render_synthetic(n: int = 600, seed: int = 0, image_size: int = 64):
    """Draw n items; returns (images (n, S, S, 3) uint8, labels (n, C) uint8, texts)."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    col = {name: j for j, name in enumerate(LABEL_NAMES)}
    colour_names = list(COLOURS)
    images = np.empty((n, image_size, image_size, 3), dtype=np.uint8)
    labels = np.zeros((n, len(LABEL_NAMES)), dtype=np.uint8)
    texts: list[str] = []
    for i in range(n):
        base = int(rng.integers(90, 170))
        im = Image.new("RGB", (image_size, image_size), (base, base, base))
        draw = ImageDraw.Draw(im)
        present: list[str] = []
        if rng.random() < 0.6:
            texture = TEXTURES[int(rng.integers(len(TEXTURES)))]
            ink = tuple(int(v) for v in rng.integers(20, 70, size=3))
            _draw_texture(draw, texture, image_size, ink)
            present.append(texture)
        for _ in range(int(rng.integers(1, 3))):  # one or two objects
            shape = SHAPES[int(rng.integers(len(SHAPES)))]
            colour = colour_names[int(rng.integers(len(colour_names)))]
            r = image_size * rng.uniform(0.12, 0.24)
            cx, cy = rng.uniform(r, image_size - r, size=2)
            _draw_shape(draw, shape, cx, cy, r, COLOURS[colour])
            present += [shape, colour]
        arr = np.asarray(im, dtype=np.int16) + rng.integers(-12, 13, size=(image_size, image_size, 3))
        images[i] = np.clip(arr, 0, 255).astype(np.uint8)
        for name in set(present):
            labels[i, col[name]] = 1

        # Text: each true label named (by a synonym) with prob 0.85, one wrong label with prob 0.1, 1-3 distractors.
        words = [rng.choice(SYNONYMS[name]) for name in sorted(set(present)) if rng.random() < 0.85]
        if rng.random() < 0.1:
            wrong = [name for name in LABEL_NAMES if name not in present]
            words.append(rng.choice(SYNONYMS[wrong[int(rng.integers(len(wrong)))]]))
        words += list(rng.choice(DISTRACTORS, size=int(rng.integers(1, 4)), replace=False))
        texts.append(" ".join(str(w) for w in rng.permutation(words)))
    return images, labels, texts


def load_synthetic(root=None, n: int = 600, seed: int = 0, image_size: int = 64, **options) -> CrossModalDataset:
    """The synthetic set as a CrossModalDataset (images in memory). `root` is ignored (nothing is read)."""
    if options:
        raise DatasetError(f"synthetic: unknown option(s) {', '.join(sorted(options))}; known: n, seed, image_size")
    n, seed, image_size = int(n), int(seed), int(image_size)
    if n < 1 or image_size < 16:
        raise DatasetError(f"synthetic: need n >= 1 and image_size >= 16, got n={n}, image_size={image_size}")
    images, labels, texts = render_synthetic(n, seed, image_size)
    return CrossModalDataset(
        name="synthetic",
        root=Path(f"synthetic-n{n}-seed{seed}-s{image_size}"),
        layout="procedural",
        # The ids carry seed and size: the fingerprint (which feature caches key on) covers ids, not pixels.
        ids=[f"syn{i}-seed{seed}-{image_size}px" for i in range(n)],
        texts=texts,
        labels=labels,
        label_names=list(LABEL_NAMES),
        image_array=images,
        stats={"n": n, "seed": seed, "image_size": image_size},
    )
