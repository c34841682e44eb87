"""Generate the bundled demo sample: small synthetic scenes with COCO-style captions and VQA v2 questions.

The files it writes are committed under demo/sample/ (a few hundred KB), so `make demo` needs no
download; this script documents how they were made and regenerates them byte for byte.

    python demo/generate_sample.py demo/sample
"""

from __future__ import annotations

import argparse
import json
import random
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

COLORS = {
    "red": (210, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 210),
    "yellow": (235, 205, 40),
}
SHAPES = ("circle", "square", "triangle")
NUMBER_WORDS = {1: "one", 2: "two", 3: "three"}
N_TRAIN, N_VAL = 192, 48


def _draw_shape(draw: ImageDraw.ImageDraw, shape: str, box: tuple[int, int, int, int], rgb: tuple) -> None:
    """Draw one filled shape inside box (x1, y1, x2, y2)."""
    x1, y1, x2, y2 = box
    if shape == "circle":
        draw.ellipse(box, fill=rgb, outline=(20, 20, 20), width=2)
    elif shape == "square":
        draw.rectangle(box, fill=rgb, outline=(20, 20, 20), width=2)
    else:
        draw.polygon([((x1 + x2) // 2, y1), (x2, y2), (x1, y2)], fill=rgb, outline=(20, 20, 20))


def make_scene(rng: random.Random, size: tuple[int, int]) -> tuple[Image.Image, list[dict]]:
    """Return one synthetic image and its objects [{shape, color, box}] (shapes distinct, colours distinct)."""
    w, h = size
    bg = tuple(rng.randint(190, 245) for _ in range(3))
    img = Image.new("RGB", size, bg)
    draw = ImageDraw.Draw(img)
    # A little texture so the picture is not flat: a few faint stripes.
    for _ in range(6):
        y = rng.randint(0, h)
        shade = tuple(max(0, c - rng.randint(10, 25)) for c in bg)
        draw.line([(0, y), (w, y + rng.randint(-40, 40))], fill=shade, width=rng.randint(2, 6))
    n = rng.choice([1, 1, 2, 2, 3])
    shapes = rng.sample(SHAPES, n)
    colors = rng.sample(sorted(COLORS), n)
    objects: list[dict] = []
    cell_w = w // n
    for i, (shape, color) in enumerate(zip(shapes, colors, strict=True)):
        side = rng.randint(min(cell_w, h) // 3, int(min(cell_w, h) * 0.8))
        x1 = i * cell_w + rng.randint(0, max(0, cell_w - side))
        y1 = rng.randint(0, max(0, h - side))
        box = (x1, y1, x1 + side, y1 + side)
        _draw_shape(draw, shape, box, COLORS[color])
        objects.append({"shape": shape, "color": color, "box": list(box)})
    return img.filter(ImageFilter.SMOOTH), objects


def captions_for(objects: list[dict], rng: random.Random) -> list[str]:
    """Three captions describing the scene in different words."""
    parts = [f"a {o['color']} {o['shape']}" for o in objects]
    listing = parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]
    n = len(objects)
    noun = "shape" if n == 1 else "shapes"
    return [
        f"{listing} on a plain background",
        f"a picture with {NUMBER_WORDS[n]} {noun}: {listing}",
        f"{listing}" + rng.choice([" drawn on paper", " in a simple drawing", " next to each other"]),
    ]


def questions_for(objects: list[dict], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """(question, answer, answer_type, question_type) tuples answerable from the picture.

    Every colour and shape question about every object, a count and two yes/no probes: the wording
    alone never gives the answer away (each shape comes in every colour), so a model has to look.
    """
    qs = []
    for o in objects:
        qs.append((f"what color is the {o['shape']}?", o["color"], "other", "what color is the"))
        qs.append((f"which shape is {o['color']}?", o["shape"], "other", "which shape is"))
    qs.append(("how many shapes are there?", str(len(objects)), "number", "how many"))
    probe = rng.choice(SHAPES)
    present = any(o["shape"] == probe for o in objects)
    qs.append((f"is there a {probe}?", "yes" if present else "no", "yes/no", "is there a"))
    colour = rng.choice(sorted(COLORS))
    present = any(o["color"] == colour for o in objects)
    qs.append((f"is there a {colour} shape?", "yes" if present else "no", "yes/no", "is there a"))
    return qs


def human_answers(answer: str, rng: random.Random) -> list[str]:
    """Ten annotator answers: mostly the true one, sometimes a paraphrase or a mistake, as in VQA."""
    variants = {"2": "two", "3": "three", "1": "one", "yes": "yes", "no": "no"}
    out = []
    for _ in range(10):
        r = rng.random()
        if r < 0.8:
            out.append(answer)
        elif r < 0.9:
            out.append(variants.get(answer, answer.capitalize() + "."))
        else:
            out.append(rng.choice(["red", "blue", "2", "yes", "no", "square"]))
    return out


def generate(out: Path, seed: int = 2019, n_train: int = N_TRAIN, n_val: int = N_VAL) -> dict:
    """Write images/, captions_{train,val}.json and VQA v2 style questions/annotations files into out."""
    rng = random.Random(seed)
    (out / "images").mkdir(parents=True, exist_ok=True)
    splits = {"train": range(1, n_train + 1), "val": range(n_train + 1, n_train + n_val + 1)}
    sizes = [(320, 240), (240, 320), (360, 240), (300, 300), (480, 160)]
    qid = 0
    counts = {}
    for split, ids in splits.items():
        images, caps, questions, annotations = [], [], [], []
        for image_id in ids:
            file_name = f"sample_{image_id:012d}.jpg"
            img, objects = make_scene(rng, sizes[image_id % len(sizes)])
            img.save(out / "images" / file_name, quality=85)
            images.append({"id": image_id, "file_name": file_name, "width": img.width, "height": img.height})
            for c in captions_for(objects, rng):
                caps.append({"id": len(caps) + 1, "image_id": image_id, "caption": c})
            for q, a, atype, qtype in questions_for(objects, rng):
                qid += 1
                questions.append({"image_id": image_id, "question": q, "question_id": qid})
                answers = human_answers(a, rng)
                annotations.append({
                    "question_id": qid, "image_id": image_id, "question_type": qtype, "answer_type": atype,
                    "multiple_choice_answer": a,
                    "answers": [{"answer": x, "answer_confidence": "yes", "answer_id": i + 1}
                                for i, x in enumerate(answers)],
                })
        subtype = f"{split}2014"
        (out / f"captions_{split}.json").write_text(json.dumps(
            {"info": {"description": "vilbert-data demo sample"}, "images": images, "annotations": caps}, indent=1))
        (out / f"questions_{split}.json").write_text(json.dumps(
            {"info": {}, "task_type": "Open-Ended", "data_type": "mscoco", "data_subtype": subtype,
             "license": {}, "questions": questions}, indent=1))
        (out / f"annotations_{split}.json").write_text(json.dumps(
            {"info": {}, "data_type": "mscoco", "data_subtype": subtype, "license": {},
             "annotations": annotations}, indent=1))
        counts[split] = {"images": len(images), "captions": len(caps), "questions": len(questions)}
    return counts


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("out", type=Path, nargs="?", default=Path(__file__).parent / "sample")
    args = parser.parse_args()
    print(json.dumps(generate(args.out), indent=1))


if __name__ == "__main__":
    main()
