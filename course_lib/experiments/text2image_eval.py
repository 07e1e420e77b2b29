"""Does the image show what the prompt asked for? The held-out split, the prompt sets, the
checkers and the evaluation table of the text-to-image cascades (notebook 07).

- Fashion-MNIST: the course classifier reads the generated garment (:func:`fashion_accuracy`),
  and FID on its features measures closeness to the data.
- Shapes: :func:`course_lib.data.shapes.detect_objects` reads back colour, shape, size and
  position of every object, so a prompt's binding, relation and count can be checked
  (:func:`check_shapes`).
- Held out from training: the "synonyms" captions of the shapes and three colour-shape
  combinations (:data:`SHAPES_HELDOUT_COMBOS`), and the Fashion-MNIST paraphrases of
  :data:`course_lib.text.FASHION_HELDOUT`.

:func:`evaluate` measures given stages; ``python -m course_lib.experiments.text2image evaluate``
runs it on the shipped checkpoints and writes :data:`EVAL_TABLE`.

:func:`guidance_diversity` measures what guidance costs: the diversity of the images one prompt
gives, against prompt accuracy, per guidance scale and seed (the Fashion-MNIST cascade)::

    python -m course_lib.experiments.text2image_eval diversity   # writes DIVERSITY_TABLE

:func:`super_resolution_effect` asks whether the super-resolution stage helps: the same 16x16
base images brought to 32x32 by bilinear upsampling and by the SR stage at each sampling
augmentation level, and real 16x16 images both ways, compared on FID, prompt accuracy and
:func:`sharpness` against real images::

    python -m course_lib.experiments.text2image_eval sr          # writes SR_TABLE

:func:`sampler_grid` asks which DDIM grid the cascade should sample on: each stage on the
leading grid of Song et al.'s code or on the trailing grid of Lin et al. (2024)::

    python -m course_lib.experiments.text2image_eval grid        # writes GRID_TABLE

:func:`shapes_stage_accuracy` asks which stage of the shapes cascade loses the prompt: each
stage alone, fed real images, against the cascade::

    python -m course_lib.experiments.text2image_eval stages      # adds to STAGES_TABLE
"""
from __future__ import annotations

import argparse
import itertools
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from course_lib import diffusion
from course_lib.checkpoint import record_metrics, sha256_of, update_json
from course_lib.classifier import load_classifier, to_classifier_input
from course_lib.data import load_fashion_mnist
from course_lib.data.shapes import (COLOURS, INVERSE, RELATIONS, SHAPES, ShapeSpec, describe,
                                    detect_objects, make_shapes, render)
from course_lib.experiments.command_line import parse_command
from course_lib.experiments.config import add_arguments, command, relative_path, to_dict
from course_lib.experiments.ddpm import load_ddpm
from course_lib.imagen import AUG_LEVEL, Stage, cascade, generate, guided_prediction
from course_lib.metrics import ClassifierFeatures, fid_floor, fid_from_features
from course_lib.runtime import CHECKPOINT_DIR, DATA_DIR
from course_lib.text import FASHION_PHRASES, FrozenTextEncoder, fashion_captions

SHAPES_HELDOUT_TEMPLATE = "synonyms"  # "a tiny red disc over a big blue box": never in training
SHAPES_HELDOUT_COMBOS = (("red", "triangle"), ("blue", "circle"), ("green", "cross"))
SHAPES_PROMPT_KINDS = ("single", "paraphrase", "heldout combo", "relation", "count")
GUIDANCE_SCALES = (1.0, 2.0, 3.0, 5.0, 8.0)
# the course's bar for the shipped shapes cascade: share everything right at the best w
SHAPES_TARGETS = {"single": 0.85, "relation": 0.50, "count": 0.60}
FASHION_TARGET_ACCURACY = 0.88  # the course classifier reads 92.8 % of real test images
EVAL_TABLE = CHECKPOINT_DIR / "t2i_eval.json"
DIVERSITY_TABLE = DATA_DIR / "results" / "t2i_guidance_diversity.json"
DIVERSITY_SCALES = (0.0, 1.0, 3.0, 8.0)  # w = 0: unconditional, 1: unguided
SR_TABLE = DATA_DIR / "results" / "t2i_sr_effect.json"
STAGES_TABLE = DATA_DIR / "results" / "t2i_shapes_stages.json"
GRID_TABLE = DATA_DIR / "results" / "t2i_sampler_grid.json"
MODULE = "course_lib.experiments.text2image_eval"


def shapes_heldout(colour: str, shape: str) -> bool:
    return (colour, shape) in SHAPES_HELDOUT_COMBOS


# --- the prompts and their checkers ------------------------------------------------------------

def shapes_eval_prompts(kind: str, n: int, seed: int = 1) -> list[tuple[str, list, str | None]]:
    """``n`` (prompt, objects, relation) triples drawn from fresh shapes images (``seed`` 1 is
    not the training seed): "single" asks for one object ("a large red circle"), "paraphrase"
    the same in the held-out synonyms ("a big red disc"), "heldout combo" one object in a
    colour-shape combination never seen in training, "relation" two different objects ("a red
    circle above a blue square"), "count" two equal ones ("two red circles")."""
    if kind not in SHAPES_PROMPT_KINDS:
        raise ValueError(f"kind must be one of {SHAPES_PROMPT_KINDS}, got {kind!r}")
    rng = np.random.default_rng(seed)
    items = []
    data = make_shapes(max(20 * n, 100), seed=seed, twin_prob=0.5)
    for i in range(len(data)):
        objects, relation = data.objects(i), data.relation(i)
        if kind == "heldout combo":
            colour, shape = SHAPES_HELDOUT_COMBOS[rng.integers(len(SHAPES_HELDOUT_COMBOS))]
            o = objects[0]
            objects = [ShapeSpec(colour, shape, o.size, o.x, o.y)] if relation is None else []
        held = any(shapes_heldout(o.colour, o.shape) for o in objects)
        if not objects or (held != (kind == "heldout combo")):
            continue
        captions = describe(objects, relation)
        twins = len(objects) == 2 and "count" in captions
        if kind in ("single", "paraphrase", "heldout combo") and len(objects) == 1:
            template = SHAPES_HELDOUT_TEMPLATE if kind == "paraphrase" else "plain"
            items.append((captions[template], objects, None))
        elif kind == "relation" and len(objects) == 2 and not twins:
            items.append((captions["short"], objects, relation))
        elif kind == "count" and twins:
            items.append((captions["count"], objects, None))
        if len(items) == n:
            return items
    raise RuntimeError(f"only {len(items)} {kind!r} prompts in {len(data)} images; ask for fewer")


def _relation_holds(a, b, relation: str) -> bool:
    return {"above": a.y < b.y, "below": a.y > b.y, "left of": a.x < b.x,
            "right of": a.x > b.x}[relation]


def check_shapes(image: torch.Tensor, objects: list, relation: str | None) -> dict[str, bool]:
    """What a generated image [3, 32, 32] in [0, 1] gets right of its prompt, read back with
    :func:`course_lib.data.shapes.detect_objects`: "count" (as many objects as asked),
    "colour"/"shape"/"size" (one-object prompts), "binding" (two objects: each asked
    colour-shape pair present), "relation" (and placed as asked), and "all"."""
    found = detect_objects(image)
    result = {"count": len(found) == len(objects)}
    if len(objects) == 1:
        o, f = objects[0], found[0] if len(found) == 1 else None
        for attribute in ("colour", "shape", "size"):
            result[attribute] = f is not None and getattr(f, attribute) == getattr(o, attribute)
        result["all"] = all(result.values())
        return result
    pairs = [(o.colour, o.shape) for o in objects]
    result["binding"] = result["count"] and sorted(pairs) == sorted(
        (f.colour, f.shape) for f in found)
    if relation is not None:
        result["relation"] = result["binding"] and _relation_holds(
            *(next(f for f in found if (f.colour, f.shape) == p) for p in pairs), relation)
    result["all"] = all(result.values())
    return result


def shapes_accuracy(images: torch.Tensor, items: list[tuple[str, list, str | None]]
                    ) -> dict[str, float]:
    """Mean of each :func:`check_shapes` answer over generated images [N, 3, 32, 32] in
    [-1, 1] and their (prompt, objects, relation) items."""
    checks = [check_shapes((image + 1) / 2, objects, relation)
              for image, (_, objects, relation) in zip(images.clamp(-1, 1), items)]
    return {key: float(np.mean([c[key] for c in checks])) for key in checks[0]}


def flip_relation(item: tuple[str, list, str]) -> tuple[str, list, str]:
    """A relation prompt with its relation word replaced by the inverse one: the same objects,
    named in the same order, asked in the other layout ("a red circle below a blue square")."""
    prompt, objects, relation = item
    return prompt.replace(f" {relation} ", f" {INVERSE[relation]} "), objects, INVERSE[relation]


@torch.inference_mode()
def layout_commitment(stage: Stage, n: int, steps: Sequence[int], w: float = 2.0,
                      seed: int = 0) -> list[dict]:
    """When does the base stage fix where the objects go? ``n`` relation prompts (two objects of
    different colours) with their real images, averaged to 16x16 and noised to each step t of
    ``steps``: the guided x_0 estimate at t, enlarged bilinearly, is checked once against the
    prompt as written and once against the prompt with its relation word flipped
    (:func:`flip_relation`). Rows ``{"t", "prompt", "binding", "relation"}`` (shares of the
    ``n``). Where the flipped prompt's objects come out bound but placed as in the image, the
    noisy image, not the prompt, decides the layout from that t on."""
    model, encoder, schedule = stage
    if model.low_res_size:
        raise ValueError("layout_commitment needs a base stage, got a super-resolution stage")
    items = [item for item in shapes_eval_prompts("relation", 4 * n)
             if item[1][0].colour != item[1][1].colour][:n]
    if len(items) < n:
        raise ValueError(f"only {len(items)} relation prompts with two colours; ask for fewer "
                         f"than n = {n}")
    x_0 = F.avg_pool2d(torch.stack([render(objects) for _, objects, _ in items]), 2) * 2 - 1
    noise = torch.randn(x_0.shape, generator=torch.Generator().manual_seed(seed))
    rows = []
    for t in steps:
        x_t = diffusion.q_sample(schedule, x_0, t, noise)
        for name, asked in (("as written", items), ("relation flipped",
                                                    [flip_relation(item) for item in items])):
            out = guided_prediction(model, x_t, torch.full((n,), t),
                                    encoder([p for p, _, _ in asked]), w)
            x0_hat, _ = diffusion.predict_x0_and_eps(schedule, x_t, t, out, model.prediction)
            accuracy = shapes_accuracy(bilinear_x2(x0_hat.clamp(-1, 1)), asked)
            rows.append({"t": t, "prompt": name, "binding": accuracy["binding"],
                         "relation": accuracy["relation"]})
    return rows


def relation_role_probe(encoder: FrozenTextEncoder, heldout_every: int = 4, steps: int = 200
                        ) -> dict[int, dict[str, float]]:
    """Do the text tokens say which object goes above (or left)? The U-Net's attention reads a
    token through a linear map (its keys), so the question is linear: for each hidden state in
    ``encoder.layers``, a logistic regression on the colour words' tokens of every prompt
    "a <colour> <shape> <relation> a <colour> <shape>" (the training captions' "short" template,
    two colours, each relation) predicts
    whether that object is the upper / left one. Fitted on the colour-shape combinations but
    every ``heldout_every``-th, read on those. Returns {layer: {"train", "heldout"}} accuracies;
    0.5 is chance. Which word comes first is no answer by itself: "a red circle below a blue
    square" puts the first one under."""
    combos = [(a, s, b, z) for a, s, b, z in itertools.product(COLOURS, SHAPES, COLOURS, SHAPES)
              if a != b]
    prompts = [describe([ShapeSpec(a, s, "small", 8, 8), ShapeSpec(b, z, "small", 8, 8)],
                        relation)["short"] for a, s, b, z in combos for relation in RELATIONS]
    colour_ids = {c: encoder.tokenizer.convert_tokens_to_ids(c) for c in COLOURS}
    missing = [c for c, i in colour_ids.items() if i == encoder.tokenizer.unk_token_id]
    if missing:
        raise ValueError(f"relation_role_probe reads the token of each colour word, but "
                         f"{encoder.name}'s vocabulary has no single token for {missing}; use an "
                         f"encoder with a word-piece vocabulary such as the default MiniLM")
    tokens = encoder(prompts).tokens  # [N, L, D * len(layers)]
    features, upper, held = [], [], []
    for i, ids in enumerate(encoder.tokenizer(prompts)["input_ids"]):
        colours = combos[i // len(RELATIONS)][::2]
        first_upper = RELATIONS[i % len(RELATIONS)] in ("above", "left of")
        for colour in colours:
            place = ids.index(colour_ids[colour])
            features.append(tokens[i, place])
            upper.append(float((colour == colours[0]) == first_upper))
            held.append(i // len(RELATIONS) % heldout_every == 0)
    y, held = torch.tensor(upper), torch.tensor(held)
    per_layer = torch.stack(features).chunk(len(encoder.layers), dim=1)  # [n, D] each
    return {layer: _linear_probe(x, y, held, steps) for layer, x in zip(encoder.layers, per_layer)}


def _linear_probe(x: torch.Tensor, y: torch.Tensor, held: torch.Tensor, steps: int
                  ) -> dict[str, float]:
    """Logistic regression (L2 penalty 1e-3, L-BFGS for ``steps`` iterations) fitted on
    x[~held] -> y[~held]; its accuracy on both parts."""
    weight = torch.zeros(x.shape[1], requires_grad=True)
    bias = torch.zeros(1, requires_grad=True)
    optimizer = torch.optim.LBFGS([weight, bias], max_iter=steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.binary_cross_entropy_with_logits(x[~held] @ weight + bias, y[~held])
                + 1e-3 * weight.square().sum())
        loss.backward()
        return loss

    with torch.enable_grad():
        optimizer.step(closure)
    right = ((x @ weight + bias > 0).float() == y).detach()
    return {"train": right[~held].float().mean().item(),
            "heldout": right[held].float().mean().item()}


def fashion_eval_prompts(per_class: int, heldout: bool = False, seed: int = 1
                         ) -> tuple[list[str], torch.Tensor]:
    """``per_class`` prompts for each Fashion-MNIST class (training phrases, or the held-out
    paraphrases with ``heldout``) and their labels."""
    labels = torch.arange(10).repeat_interleave(per_class)
    return fashion_captions(labels, seed, heldout=heldout), labels


def fashion_predictions(images: torch.Tensor) -> torch.Tensor:
    """The course classifier's class [N] for each image [N, 1, 32, 32] in [-1, 1]: the checker
    of a Fashion-MNIST prompt."""
    classifier = load_classifier()
    with torch.inference_mode():
        return classifier(to_classifier_input(images, (-1, 1))).argmax(1)


def fashion_accuracy(images: torch.Tensor, labels: torch.Tensor) -> float:
    """Share of generated images [N, 1, 32, 32] in [-1, 1] that the course classifier puts in
    the class their prompt asked for."""
    return (fashion_predictions(images) == labels).float().mean().item()


# --- the evaluation table of notebook 07 -------------------------------------------------------

@dataclass
class Text2ImageEvaluation:
    """What the table measures: ``per_class`` Fashion-MNIST prompts per class and ``shapes_n``
    shapes prompts per kind, at each guidance scale of ``scales``; the held-out comparison of
    the text encoders at ``w_heldout``; ``steps`` / ``sr_steps`` DDIM steps per stage."""

    per_class: int = 100
    shapes_n: int = 200
    scales: tuple[float, ...] = GUIDANCE_SCALES
    w_heldout: float = 3.0
    steps: int = 25
    sr_steps: int = 25

    def __post_init__(self):
        if self.w_heldout not in self.scales or self.per_class < 2 or self.shapes_n < 1:
            raise ValueError(f"w_heldout must be one of the scales {self.scales} (the manifest "
                             f"records the cascade's figures there), per_class >= 2 and "
                             f"shapes_n >= 1; got w_heldout={self.w_heldout}, per_class="
                             f"{self.per_class}, shapes_n={self.shapes_n}")


def _timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, round(time.perf_counter() - start, 1)


def evaluate_fashion(base: Stage, sr: Stage, per_class: int, scales: Sequence[float], steps: int,
                     sr_steps: int) -> tuple[dict[str, float], list[dict]]:
    """The Fashion-MNIST cascade per guidance scale: prompt accuracy (course classifier) and FID
    (course classifier features, against the 10,000 test images) of ``per_class`` prompts per
    class in the training phrasing. At the same number of images, the FID of real training
    images (the floor) and of the shipped unconditional DDPM (DDIM-50, x_0 clipped, seed 0, as
    its own table samples), which the cascade should not fall behind."""
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test", size=32)
    x_train, _ = load_fashion_mnist("train", size=32)
    test_features = features(x_test)
    n = 10 * per_class
    ddpm_images = diffusion.generate(*load_ddpm(), n, "ddim", 50, seed=0)
    references = {"floor": round(fid_floor(features, x_train, test_features, n), 3),
                  "ddpm_ddim50": round(fid_from_features(features((ddpm_images + 1) / 2),
                                                         test_features), 3)}
    prompts, labels = fashion_eval_prompts(per_class)
    rows = []
    for w in scales:
        (_, images), seconds = _timed(cascade, base, sr, prompts, w=w, steps=steps,
                                      sr_steps=sr_steps)
        rows.append({"w": w, "samples": n, "accuracy": round(fashion_accuracy(images, labels), 4),
                     "fid": round(fid_from_features(features((images + 1) / 2), test_features),
                                  3), "seconds": seconds})
    return references, rows


def evaluate_shapes(base: Stage, sr: Stage, items: dict, scales: Sequence[float], steps: int,
                    sr_steps: int) -> list[dict]:
    """The shapes cascade per guidance scale and prompt kind (one object, two in a relation,
    counting): the share of images with each attribute right, and with everything right."""
    rows = []
    for w in scales:
        for kind in ("single", "relation", "count"):
            (_, images), seconds = _timed(cascade, base, sr, [p for p, _, _ in items[kind]], w=w,
                                          steps=steps, sr_steps=sr_steps)
            accuracy = shapes_accuracy(images, items[kind])
            rows.append({"w": w, "kind": kind, "samples": len(items[kind]), "seconds": seconds,
                         **{k: round(v, 4) for k, v in accuracy.items()}})
    return rows


def evaluate_heldout(stages: dict, items: dict, per_class: int, w: float, steps: int,
                     sr_steps: int) -> list[dict]:
    """Per text encoder of the Fashion-MNIST base stages in ``stages`` (pretrained MiniLM, from
    scratch) at guidance ``w``: Fashion-MNIST accuracy on the training phrasing against held-out
    paraphrases, and the shapes share all right for training words, held-out synonyms and
    held-out colour-shape combinations (left out for an encoder without a shapes base stage)."""
    prompts, labels = fashion_eval_prompts(per_class)
    held_prompts, held_labels = fashion_eval_prompts(per_class // 2, heldout=True)
    rows = []
    for encoder in [e for d, s, e in stages if (d, s) == ("fashion", "base")]:
        base = stages["fashion", "base", encoder]
        for phrasing, (p, y) in (("training phrases", (prompts[::2], labels[::2])),
                                 ("held-out paraphrases", (held_prompts, held_labels))):
            _, images = cascade(base, stages["fashion", "sr", "minilm"], p, w=w, steps=steps,
                                sr_steps=sr_steps)
            rows.append({"dataset": "fashion", "encoder": encoder, "prompts": phrasing,
                         "samples": len(p), "accuracy": round(fashion_accuracy(images, y), 4)})
        if ("shapes", "base", encoder) not in stages:
            continue
        for kind in ("single", "paraphrase", "heldout combo"):
            _, images = cascade(stages["shapes", "base", encoder], stages["shapes", "sr", "minilm"],
                                [p for p, _, _ in items[kind]], w=w, steps=steps,
                                sr_steps=sr_steps)
            rows.append({"dataset": "shapes", "encoder": encoder, "prompts": kind,
                         "samples": len(items[kind]),
                         "accuracy": round(shapes_accuracy(images, items[kind])["all"], 4)})
    return rows


def evaluate(config: Text2ImageEvaluation, stages: dict[tuple[str, str, str], Stage]) -> dict:
    """The table of the cascades ``stages`` ((dataset, stage, encoder) -> (network, encoder,
    schedule); the MiniLM stages of both datasets are needed): :func:`evaluate_fashion`,
    :func:`evaluate_shapes` and :func:`evaluate_heldout`."""
    items = {kind: shapes_eval_prompts(kind, config.shapes_n) for kind in SHAPES_PROMPT_KINDS}
    table = {"steps": config.steps, "sr_steps": config.sr_steps, "w_heldout": config.w_heldout}
    references, table["fashion"] = evaluate_fashion(
        stages["fashion", "base", "minilm"], stages["fashion", "sr", "minilm"], config.per_class,
        config.scales, config.steps, config.sr_steps)
    table["fashion_floor_fid"], table["fashion_ddpm_fid"] = references["floor"], references[
        "ddpm_ddim50"]
    table["shapes"] = evaluate_shapes(stages["shapes", "base", "minilm"],
                                      stages["shapes", "sr", "minilm"], items, config.scales,
                                      config.steps, config.sr_steps)
    table["heldout"] = evaluate_heldout(stages, items, config.per_class, config.w_heldout,
                                        config.steps, config.sr_steps)
    return table


def record_quality(table: dict, paths: dict[tuple[str, str, str], Path]) -> None:
    """Copy the table's figures at ``w_heldout`` into the manifest entries of the checkpoints
    ``paths`` ((dataset, stage, encoder) -> file): prompt accuracy per text encoder and phrasing
    (base stages), and the cascades' accuracy and FID (Fashion-MNIST) or share all right
    (shapes). The checkpoint files stay as they are."""
    w = table["w_heldout"]
    metrics: dict[tuple, dict[str, float]] = {}
    for row in table["heldout"]:
        name = row["prompts"].replace("-", " ").replace(" ", "_")
        metrics.setdefault((row["dataset"], "base", row["encoder"]), {})[
            f"accuracy_{name}_w{w:g}"] = row["accuracy"]
    fashion = next(row for row in table["fashion"] if row["w"] == w)
    for stage in ("base", "sr"):
        metrics.setdefault(("fashion", stage, "minilm"), {}).update({
            f"cascade_accuracy_w{w:g}": fashion["accuracy"],
            f"cascade_fid_{fashion['samples']}_w{w:g}": fashion["fid"]})
    shapes = {row["kind"]: row["all"] for row in table["shapes"] if row["w"] == w}
    metrics.setdefault(("shapes", "sr", "minilm"), {}).update(
        {f"cascade_all_right_{kind}_w{w:g}": share for kind, share in shapes.items()})
    for key, values in metrics.items():
        if key in paths:
            record_metrics(paths[key], values)


# --- what guidance costs: diversity against prompt accuracy -------------------------------------

@dataclass
class GuidanceDiversity:
    """The diversity measurement: ``per_prompt`` images of each class's prompt ("a photo of a
    sneaker") from the Fashion-MNIST cascade (the base stage guided at each scale of ``scales``,
    super-resolution unguided, ``steps`` / ``sr_steps`` DDIM steps), once per seed of
    ``seeds``. FID is taken on the images of all seeds of a scale together: 10 x per_prompt x
    len(seeds) of them. The defaults (500 images per scale, FID at n = 500 like
    :data:`EVAL_TABLE`'s) keep the measurement near 10 CPU minutes; ``--per-prompt 20`` gives
    the course's FID at n = 1,000, at twice the cost."""

    scales: tuple[float, ...] = DIVERSITY_SCALES
    per_prompt: int = 10
    seeds: tuple[int, ...] = (0, 1, 2, 3, 4)
    steps: int = 25
    sr_steps: int = 25

    def __post_init__(self):
        if self.per_prompt < 2 or not self.seeds or not self.scales or min(
                self.steps, self.sr_steps) < 1 or len(set(self.seeds)) != len(self.seeds):
            raise ValueError(f"the diversity of one prompt needs per_prompt >= 2 images, at "
                             f"least one seed (no repeats) and one scale, and steps >= 1; got "
                             f"per_prompt={self.per_prompt}, seeds={self.seeds}, scales="
                             f"{self.scales}, steps={self.steps}, sr_steps={self.sr_steps}")


def class_prompts() -> list[str]:
    """One prompt per Fashion-MNIST class, the first training phrase: "a photo of a t-shirt"."""
    return [f"a photo of {FASHION_PHRASES[c][0]}" for c in range(10)]


def mean_pairwise_distance(features: torch.Tensor) -> float:
    """Mean Euclidean distance over the N (N - 1) / 2 pairs of rows of ``features`` [N, D]:
    0 when every image of a prompt is the same, larger the more they differ."""
    if features.ndim != 2 or len(features) < 2:
        raise ValueError(f"features must be [N, D] with N >= 2, got {tuple(features.shape)}")
    return torch.pdist(features.double()).mean().item()


def prompt_diversity(embedded: torch.Tensor, predicted: torch.Tensor, labels: torch.Tensor
                     ) -> dict[str, float]:
    """Prompt accuracy (share of ``predicted`` classes equal to the prompts' ``labels``) and
    diversity: :func:`mean_pairwise_distance` of the features ``embedded`` [N, D] among the
    images of each prompt's class, averaged over the classes."""
    distances = [mean_pairwise_distance(embedded[labels == c]) for c in labels.unique()]
    return {"accuracy": round((predicted == labels).float().mean().item(), 4),
            "diversity": round(float(np.mean(distances)), 4)}


def _features_and_classes(features: ClassifierFeatures, images: torch.Tensor
                          ) -> tuple[torch.Tensor, torch.Tensor]:
    """The course classifier's features and predicted classes of images [N, 1, 32, 32] in
    [-1, 1]."""
    return features((images + 1) / 2), fashion_predictions(images)


def guidance_diversity(config: GuidanceDiversity, base: Stage, sr: Stage) -> dict:
    """Per guidance scale and seed ("rows"): prompt accuracy and diversity
    (:func:`prompt_diversity`) of ``config.per_prompt`` cascade images of each class prompt.
    Per scale ("fid"): FID of the images of all seeds together against the 10,000 test images
    (course classifier features). The same for real training images ("real": accuracy and
    diversity of as many per class, one row per seed; "fid_floor": the floor at the FID's
    n)."""
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test", size=32)
    test_features = features(x_test)
    prompts = [p for p in class_prompts() for _ in range(config.per_prompt)]
    labels = torch.arange(10).repeat_interleave(config.per_prompt)
    rows, fids = [], []
    for w in config.scales:
        pooled = []
        for seed in config.seeds:
            (_, images), seconds = _timed(cascade, base, sr, prompts, w=w, steps=config.steps,
                                          sr_steps=config.sr_steps, seed=seed)
            embedded, predicted = _features_and_classes(features, images)
            pooled.append(embedded)
            rows.append({"w": w, "seed": seed, "samples": len(prompts), "seconds": seconds,
                         **prompt_diversity(embedded, predicted, labels)})
        pooled = torch.cat(pooled)
        fids.append({"w": w, "samples": len(pooled),
                     "fid": round(fid_from_features(pooled, test_features), 3)})
    x_train, y_train = load_fashion_mnist("train", size=32, value_range=(-1, 1))
    real = []
    for seed in config.seeds:
        order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(seed))
        picks = torch.cat([order[y_train[order] == c][:config.per_prompt] for c in range(10)])
        real.append({"seed": seed, "samples": len(picks),
                     **prompt_diversity(*_features_and_classes(features, x_train[picks]),
                                        labels)})
    n = fids[0]["samples"]
    floor = round(fid_floor(features, (x_train + 1) / 2, test_features, n), 3)
    return {**to_dict(config), "rows": rows, "fid": fids, "real": real,
            "fid_floor": {"samples": n, "fid": floor}}


def diversity_summary(table: dict) -> list[dict]:
    """Per guidance scale of a :func:`guidance_diversity` table: the number of seeds, mean and
    standard deviation (over the seeds, ddof = 1) of prompt accuracy and diversity, and the
    scale's FID with its n."""
    fids = {row["w"]: row for row in table["fid"]}
    summary = []
    for w in table["scales"]:
        rows = [row for row in table["rows"] if row["w"] == w]
        entry = {"w": w, "seeds": len(rows)}
        for key in ("accuracy", "diversity"):
            values = np.array([row[key] for row in rows])
            entry[key] = round(float(values.mean()), 4)
            entry[f"{key}_std"] = round(float(values.std(ddof=1)) if len(values) > 1 else 0.0, 4)
        entry["fid"], entry["fid_samples"] = fids[w]["fid"], fids[w]["samples"]
        summary.append(entry)
    return summary


# --- does super-resolution help? ---------------------------------------------------------------

@dataclass
class SuperResolutionEffect:
    """``per_class`` prompts per Fashion-MNIST class through the base stage at guidance ``w``
    (``steps`` DDIM steps, seed ``seed``); each 16x16 image then goes to 32x32 by bilinear
    upsampling and by the super-resolution stage (unguided, ``sr_steps``) at each sampling
    noise-augmentation level of ``aug_levels`` (Imagen chose its level by such a sweep)."""

    per_class: int = 50
    w: float = 3.0
    steps: int = 25
    sr_steps: int = 25
    seed: int = 0
    aug_levels: list[float] = field(default_factory=lambda: [AUG_LEVEL])

    def __post_init__(self):
        if not self.aug_levels or not all(0 <= level < 1 for level in self.aug_levels):
            raise ValueError(f"aug_levels must be one or more levels in [0, 1), got "
                             f"{self.aug_levels}")


def sharpness(images: torch.Tensor) -> torch.Tensor:
    """Per image [N, C, H, W] in [0, 1]: the mean squared difference between horizontal
    neighbours plus that between vertical neighbours (the gradient energy, a focus measure).
    Blur lowers it, sharp edges and speckle raise it; real images give the level to compare
    with."""
    dx = (images[..., :, 1:] - images[..., :, :-1]).square().flatten(1).mean(1)
    dy = (images[..., 1:, :] - images[..., :-1, :]).square().flatten(1).mean(1)
    return dx + dy


def bilinear_x2(low: torch.Tensor) -> torch.Tensor:
    """16x16 images [N, C, 16, 16] in [-1, 1] enlarged to 32x32 bilinearly: the cascade without
    its super-resolution stage."""
    return F.interpolate(low, scale_factor=2, mode="bilinear", align_corners=False).clamp(-1, 1)


def super_resolution_effect(config: SuperResolutionEffect, base: Stage, sr: Stage) -> dict:
    """FID (course features, against the 10,000 test images), prompt accuracy and mean
    :func:`sharpness` of the base stage's images upsampled bilinearly and super-resolved at each
    augmentation level; the same for real training images of the prompts' classes averaged to
    16x16 (what each way of enlarging can do with a perfect base stage); and the sharpness of
    as many real test images."""
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test", size=32)
    x_train, y_train = load_fashion_mnist("train", size=32, value_range=(-1, 1))
    test_features = features(x_test)
    prompts, labels = fashion_eval_prompts(config.per_class)
    order = torch.randperm(len(x_train), generator=torch.Generator().manual_seed(config.seed))
    real = torch.cat([x_train[order[y_train[order] == c][:config.per_class]] for c in range(10)])
    real_low = F.avg_pool2d(real, 2)  # in the order of ``labels``

    def super_resolve(low_res: torch.Tensor, level: float) -> torch.Tensor:
        return generate(*sr, prompts, w=1.0, steps=config.sr_steps, seed=config.seed + 1,
                        low_res=low_res, aug_level=level)

    low = generate(*base, prompts, w=config.w, steps=config.steps, seed=config.seed)
    images = {"base, bilinear": bilinear_x2(low)}
    for level in config.aug_levels:
        images[f"base, super-resolution (aug {level:g})"] = super_resolve(low, level)
    images["real 16x16, bilinear"] = bilinear_x2(real_low)
    images[f"real 16x16, super-resolution (aug {AUG_LEVEL:g})"] = super_resolve(real_low,
                                                                                AUG_LEVEL)
    rows = {name: {"fid": round(fid_from_features(features((x + 1) / 2), test_features), 3),
                   "accuracy": round(fashion_accuracy(x, labels), 4),
                   "sharpness": round(sharpness((x + 1) / 2).mean().item(), 4)}
            for name, x in images.items()}
    real_test = x_test[torch.randperm(len(x_test), generator=torch.Generator().manual_seed(
        config.seed))[:len(prompts)]]
    return {"samples": len(prompts), "rows": rows,
            "real_sharpness": round(sharpness(real_test).mean().item(), 4)}


# --- which DDIM grid? --------------------------------------------------------------------------

@dataclass
class SamplerGrid:
    """``per_class`` Fashion-MNIST prompts per class through the cascade, the base stage guided
    at ``w``, ``steps`` / ``sr_steps`` DDIM steps, noise from ``seed``; each stage on the
    leading grid or the trailing one (:data:`GRID_ROWS`)."""

    per_class: int = 50
    w: float = 3.0
    steps: int = 25
    sr_steps: int = 25
    seed: int = 0


# (base stage's sampler, super-resolution stage's sampler); "ddim" takes the leading grid of
# Song et al.'s code (25 steps: 960, 920, ..., 0), "ddim_trailing" Lin et al.'s (999, 959, ..., 39)
GRID_ROWS = {"both leading": ("ddim", "ddim"),
             "base leading, super-resolution trailing": ("ddim", "ddim_trailing"),
             "both trailing": ("ddim_trailing", "ddim_trailing")}


def sampler_grid(config: SamplerGrid, base: Stage, sr: Stage) -> dict:
    """FID (course features, against the 10,000 test images) and prompt accuracy of the
    Fashion-MNIST cascade for each pair of samplers of :data:`GRID_ROWS`, with the first code
    step of each stage's grid."""
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test", size=32)
    test_features = features(x_test)
    prompts, labels = fashion_eval_prompts(config.per_class)
    rows = {}
    for name, (sampler, sr_sampler) in GRID_ROWS.items():
        (_, images), seconds = _timed(cascade, base, sr, prompts, w=config.w, steps=config.steps,
                                      sr_steps=config.sr_steps, seed=config.seed,
                                      sampler=sampler, sr_sampler=sr_sampler)
        rows[name] = {
            "first_t": [diffusion.SAMPLERS[s].timesteps(stage[2].T, n)[0]
                        for s, stage, n in ((sampler, base, config.steps),
                                            (sr_sampler, sr, config.sr_steps))],
            "fid": round(fid_from_features(features((images + 1) / 2), test_features), 3),
            "accuracy": round(fashion_accuracy(images, labels), 4), "seconds": seconds}
    return {"samples": len(prompts), "rows": rows}


# --- which stage of the shapes cascade loses the prompt? ---------------------------------------

@dataclass
class ShapesStages:
    """``n`` shapes prompts per kind; the base stage guided at ``w`` (``steps`` DDIM steps), the
    super-resolution stage unguided (``sr_steps``), noise from ``seed``."""

    n: int = 200
    w: float = 3.0
    steps: int = 25
    sr_steps: int = 25
    seed: int = 0


STAGE_INPUTS = ("real", "real 16x16, bilinear", "real 16x16, super-resolution",
                "base, bilinear", "cascade")


def shapes_stage_accuracy(config: ShapesStages, base: Stage, sr: Stage) -> list[dict]:
    """Per prompt kind, the share of images with everything right (:func:`check_shapes`) for
    each of :data:`STAGE_INPUTS`: the real image of the prompt (the checker's ceiling); the real
    image averaged to 16x16 and upsampled bilinearly (what the base resolution keeps); that
    16x16 image super-resolved (the SR stage alone); the base stage's 16x16 sample upsampled
    bilinearly (the base stage alone); the cascade."""
    rows = []
    for kind in ("single", "relation", "count"):
        items = shapes_eval_prompts(kind, config.n)
        prompts = [p for p, _, _ in items]
        real = torch.stack([render(objects) for _, objects, _ in items]) * 2 - 1
        real_low = F.avg_pool2d(real, 2)  # the base stage's 16x16 training images
        low, high = cascade(base, sr, prompts, w=config.w, steps=config.steps,
                            sr_steps=config.sr_steps, seed=config.seed)
        real_sr = generate(*sr, prompts, w=1.0, steps=config.sr_steps, seed=config.seed + 1,
                           low_res=real_low)
        images = dict(zip(STAGE_INPUTS, (real, bilinear_x2(real_low), real_sr, bilinear_x2(low),
                                         high)))
        rows.append({"kind": kind, "samples": len(items),
                     **{name: round(shapes_accuracy(x, items)["all"], 4)
                        for name, x in images.items()}})
    return rows


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="measurements of the text-to-image cascades")
    commands = parser.add_subparsers(dest="command", required=True)
    diversity = commands.add_parser("diversity", help="prompt accuracy and diversity per "
                                                      "guidance scale, into "
                                                      + DIVERSITY_TABLE.name)
    add_arguments(diversity, GuidanceDiversity)
    diversity.add_argument("--out", default=str(DIVERSITY_TABLE))
    diversity.add_argument("--threads", type=int, default=None)
    sr = commands.add_parser("sr", help="bilinear upsampling against the super-resolution "
                                        "stage, into " + SR_TABLE.name)
    add_arguments(sr, SuperResolutionEffect)
    sr.add_argument("--out", default=str(SR_TABLE))
    sr.add_argument("--threads", type=int, default=None)
    grid = commands.add_parser("grid", help="the cascade on the leading and the trailing DDIM "
                                            "grid, into " + GRID_TABLE.name)
    add_arguments(grid, SamplerGrid)
    grid.add_argument("--out", default=str(GRID_TABLE))
    grid.add_argument("--threads", type=int, default=None)
    stages = commands.add_parser("stages", help="each stage of the shapes cascade alone, as an "
                                                "entry of " + STAGES_TABLE.name)
    add_arguments(stages, ShapesStages)
    stages.add_argument("--base", default=None, help="base checkpoint (default: the shipped one)")
    stages.add_argument("--sr", default=None, help="SR checkpoint (default: the shipped one)")
    stages.add_argument("--label", default="shipped", help="the entry's name in the table")
    stages.add_argument("--out", default=str(STAGES_TABLE))
    stages.add_argument("--threads", type=int, default=None)
    return parser


RECIPES = {"diversity": GuidanceDiversity, "sr": SuperResolutionEffect, "stages": ShapesStages,
           "grid": SamplerGrid}


def parse_args(argv: list[str] | None = None
               ) -> tuple[GuidanceDiversity | SuperResolutionEffect | ShapesStages | SamplerGrid,
                          argparse.Namespace]:
    return parse_command(_parser(), RECIPES, argv)


def diversity_table(config: GuidanceDiversity, out: str | Path = DIVERSITY_TABLE,
                    paths: tuple[Path, Path] | None = None) -> dict:
    """:func:`guidance_diversity` of the Fashion-MNIST cascade ``paths`` (base and
    super-resolution checkpoints; default: the shipped ones), with the command that remakes it,
    written to ``out``."""
    from course_lib.experiments.text2image import checkpoint_path, load_text2image

    paths = paths or (checkpoint_path("fashion", "base"), checkpoint_path("fashion", "sr"))
    table = {"command": command(MODULE, config, "diversity", out=relative_path(out)),
             **guidance_diversity(config, *(load_text2image(path) for path in paths))}
    update_json(out, lambda old: (old.clear(), old.update(table)))
    return table


def _fashion_table(name: str, config, measure, out: str | Path) -> dict:
    """``measure(config, base, sr)`` on the shipped Fashion-MNIST cascade, with the command
    ``name`` that remakes it and its settings, written to ``out``."""
    from course_lib.experiments.text2image import checkpoint_path, load_text2image

    stages = (load_text2image(checkpoint_path("fashion", stage)) for stage in ("base", "sr"))
    table = {"command": command(MODULE, config, name, out=relative_path(out)),
             "config": to_dict(config), **measure(config, *stages)}
    update_json(out, lambda old: (old.clear(), old.update(table)))
    return table


def stages_table(config: ShapesStages, base: str | Path | None = None,
                 sr: str | Path | None = None, label: str = "shipped",
                 out: str | Path = STAGES_TABLE) -> dict:
    """:func:`shapes_stage_accuracy` of the shapes checkpoints ``base`` and ``sr`` (default: the
    shipped ones), stored in ``out`` under ``label`` with the command and the checkpoints'
    sha256 (other labels stay: a table can hold a cascade before and after a change)."""
    from course_lib.experiments.text2image import checkpoint_path, load_text2image

    paths = {"base": Path(base or checkpoint_path("shapes", "base")),
             "sr": Path(sr or checkpoint_path("shapes", "sr"))}
    entry = {"command": command(MODULE, config, "stages", base=base, sr=sr, label=label,
                                out=relative_path(out)),
             "config": to_dict(config),
             "sha256": {stage: sha256_of(path) for stage, path in paths.items()},
             "rows": shapes_stage_accuracy(config, *(load_text2image(p) for p in
                                                     paths.values()))}
    update_json(out, lambda table: table.update({label: entry}))
    return entry


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "stages":
        entry = stages_table(config, args.base, args.sr, args.label, args.out)
        print(f"{'kind':<10}" + "".join(f"{name:>32}" for name in STAGE_INPUTS))
        for row in entry["rows"]:
            print(f"{row['kind']:<10}" + "".join(f"{row[name]:>32.2f}" for name in STAGE_INPUTS))
        print(f"written {args.out} [{args.label!r}]")
        return
    if args.command == "sr":
        table = _fashion_table("sr", config, super_resolution_effect, args.out)
        for name, row in table["rows"].items():
            print(f"{name}: FID {row['fid']}, accuracy {row['accuracy']}, sharpness "
                  f"{row['sharpness']} (real images {table['real_sharpness']})")
        print(f"written {args.out}")
        return
    if args.command == "grid":
        table = _fashion_table("grid", config, sampler_grid, args.out)
        for name, row in table["rows"].items():
            print(f"{name}: FID {row['fid']}, accuracy {row['accuracy']}")
        print(f"written {args.out}")
        return
    table = diversity_table(config, args.out)
    for row in diversity_summary(table):
        print(f"w = {row['w']:g}: accuracy {row['accuracy']:.3f} +- {row['accuracy_std']:.3f}, "
              f"diversity {row['diversity']:.2f} +- {row['diversity_std']:.2f}, "
              f"FID ({row['fid_samples']}) {row['fid']:.2f}")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
