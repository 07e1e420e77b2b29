"""Layout guidance on the shipped shapes cascade (:mod:`course_lib.layout`, notebook 07).

    python -m course_lib.experiments.layout fit        # the role head -> data/checkpoints/
    python -m course_lib.experiments.layout evaluate   # what the guidance buys -> data/results/

``fit`` labels every token of the shapes training captions with the role of its object
(:func:`token_roles`), encodes the captions with MiniLM's hidden states ``layers`` and fits the
softmax regression of :class:`~course_lib.layout.RoleHead` (L-BFGS). It is scored on the
captions of fresh images, the "synonyms" template (held out from the fit, as from the U-Net's
training) reported apart. ``evaluate`` runs the cascade on the evaluation prompts of every kind
(:func:`~course_lib.experiments.text2image_eval.shapes_eval_prompts`) with and without the
guidance, per guidance scale and noise seed, and scores them with the same checker.
"""
from __future__ import annotations

import argparse
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from course_lib.checkpoint import (load_checkpoint, load_state, record_metrics, save_checkpoint,
                                   update_json)
from course_lib.data.shapes import INVERSE, RELATION_SYNONYMS, describe, make_shapes
from course_lib.experiments.command_line import parse_command
from course_lib.experiments.config import add_arguments, command, relative_path, to_dict
from course_lib.experiments.text2image_eval import (SHAPES_HELDOUT_TEMPLATE, shapes_accuracy,
                                                    shapes_eval_prompts, shapes_heldout)
from course_lib.imagen import Stage, generate
from course_lib.layout import ROLE_OF_RELATION, ROLES, RoleHead, generate_with_layout, read_layout
from course_lib.runtime import CHECKPOINT_DIR, DATA_DIR
from course_lib.text import FrozenTextEncoder

MODULE = "course_lib.experiments.layout"
ARCH = "role_head"
HEAD_CHECKPOINT = CHECKPOINT_DIR / "t2i_shapes_role_head.pt"
LAYOUT_TABLE = DATA_DIR / "results" / "t2i_layout_guidance.json"
KINDS = ("single", "relation", "count")
OPPOSITE = {"upper": "lower", "lower": "upper", "left": "right", "right": "left"}


# --- the layout stage: token roles and the head ------------------------------------------------

def token_roles(tokenizer, caption: str, relation: str | None = None,
                first_role: str | None = None) -> list[int]:
    """The role (index into :data:`ROLES`) of each token of ``caption`` as the tokenizer splits
    it, special tokens included. A caption "<A> <relation> <B>" gives A's words (articles left
    out) ``first_role`` and B's the opposite one; without a relation every token is "none"."""
    encoded = tokenizer(caption, return_offsets_mapping=True)
    roles = [0] * len(encoded["input_ids"])
    if relation is None:
        return roles
    before, found, _ = caption.partition(f" {relation} ")
    if not found or first_role not in ROLES[1:]:
        raise ValueError(f"{caption!r} does not read '<object> {relation} <object>' with a role "
                         f"in {ROLES[1:]} (got {first_role!r})")
    second_role = OPPOSITE[first_role]
    start_of_second = len(before) + len(found)
    for i, (token, (start, end)) in enumerate(zip(
            tokenizer.convert_ids_to_tokens(encoded["input_ids"]), encoded["offset_mapping"])):
        if end == start or token in ("a", "an"):
            continue  # special tokens and articles
        if end <= len(before):
            roles[i] = ROLES.index(first_role)
        elif start >= start_of_second:
            roles[i] = ROLES.index(second_role)
    return roles


def labelled_captions(images: int, seed: int
                      ) -> list[tuple[str, str, str | None, str | None]]:
    """(template, caption, relation phrase, first-named object's role) for every caption of
    ``images`` shapes images (held-out colour-shape combinations left out, as in the U-Net's
    training); phrase and role are None where no relation places the objects."""
    data = make_shapes(images, seed=seed)
    out = []
    for i in range(len(data)):
        objects, relation = data.objects(i), data.relation(i)
        if any(shapes_heldout(o.colour, o.shape) for o in objects):
            continue
        for template, caption in describe(objects, relation).items():
            phrase = {"plain": relation, "short": relation, "inverse": INVERSE.get(relation),
                      "synonyms": RELATION_SYNONYMS.get(relation)}.get(template)
            if relation is None or phrase is None:
                out.append((template, caption, None, None))
                continue
            first = ROLE_OF_RELATION[INVERSE[relation] if template == "inverse" else relation]
            out.append((template, caption, phrase, first))
    return out


@dataclass
class RoleHeadRecipe:
    """The role head: MiniLM's hidden states ``layers``, fitted on the captions of ``images``
    training images (seed ``seed``) by L-BFGS (``steps`` iterations, L2 penalty ``l2``) and
    scored on ``test_images`` fresh ones (seed ``seed + 1``)."""

    layers: list[int] = field(default_factory=lambda: [2, 3, 4])
    images: int = 3000
    test_images: int = 1000
    steps: int = 300
    l2: float = 1e-3
    seed: int = 0


def _tokens_and_roles(encoder: FrozenTextEncoder, captions: list[tuple]
                      ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """Token states [n, D], their roles [n] and each token's caption template [n]."""
    text = encoder([c for _, c, _, _ in captions])
    states, roles, templates = [], [], []
    for i, (template, caption, phrase, first) in enumerate(captions):
        labels = token_roles(encoder.tokenizer, caption, phrase, first)
        states.append(text.tokens[i, :len(labels)])
        roles += labels
        templates += [template] * len(labels)
    return torch.cat(states), torch.tensor(roles), templates


def _accuracy(head: RoleHead, states: torch.Tensor, roles: torch.Tensor) -> dict[str, float]:
    """Token accuracy, on all tokens and on the object words that a relation places."""
    with torch.no_grad():
        right = head.linear(states).argmax(-1) == roles
    placed = roles > 0
    return {"all": round(right.float().mean().item(), 4),
            "placed": round(right[placed].float().mean().item(), 4)}


def fit_role_head(config: RoleHeadRecipe) -> tuple[RoleHead, dict[str, float]]:
    """The fitted head and its token accuracies: on the training captions, on fresh images'
    captions of the training templates, and on the held-out "synonyms" template."""
    encoder = FrozenTextEncoder(layers=config.layers)
    train = [c for c in labelled_captions(config.images, config.seed)
             if c[0] != SHAPES_HELDOUT_TEMPLATE]
    x, y, _ = _tokens_and_roles(encoder, train)
    head = RoleHead(encoder.dim, config.layers)
    parameters = list(head.linear.parameters())
    for p in parameters:
        torch.nn.init.zeros_(p)
    optimizer = torch.optim.LBFGS(parameters, max_iter=config.steps, line_search_fn="strong_wolfe")

    def closure():
        optimizer.zero_grad()
        loss = (F.cross_entropy(head.linear(x), y)
                + config.l2 * head.linear.weight.square().sum())
        loss.backward()
        return loss

    optimizer.step(closure)
    test_x, test_y, templates = _tokens_and_roles(
        encoder, labelled_captions(config.test_images, config.seed + 1))
    held = torch.tensor([t == SHAPES_HELDOUT_TEMPLATE for t in templates])
    metrics = {f"train_{k}": v for k, v in _accuracy(head, x, y).items()}
    metrics |= {f"test_{k}": v for k, v in _accuracy(head, test_x[~held], test_y[~held]).items()}
    metrics |= {f"synonyms_{k}": v for k, v in _accuracy(head, test_x[held], test_y[held]).items()}
    return head.eval(), metrics


def load_role_head(path: str | Path = HEAD_CHECKPOINT) -> tuple[RoleHead, FrozenTextEncoder]:
    """The fitted head from a verified checkpoint and the encoder whose layers it reads."""
    payload = load_checkpoint(path, arch=ARCH)
    layers = payload["config"]["layers"]
    encoder = FrozenTextEncoder(layers=layers)
    head = RoleHead(encoder.dim, layers)
    load_state(head, payload["state"]["model"])
    return head.eval(), encoder


# --- what the guidance buys ---------------------------------------------------------------------

@dataclass
class LayoutEvaluation:
    """``n`` prompts per kind, the base stage at each guidance scale of ``scales`` (``steps``
    DDIM steps) with the layout guidance at each strength of ``etas`` (0: none) for the first
    ``guided_steps`` steps, the super-resolution stage unguided (``sr_steps``), per noise seed
    of ``seeds``."""

    n: int = 200
    scales: list[float] = field(default_factory=lambda: [2.0, 3.0])
    etas: list[float] = field(default_factory=lambda: [0.0, 10.0, 40.0])
    guided_steps: int = 10
    steps: int = 25
    sr_steps: int = 25
    seeds: list[int] = field(default_factory=lambda: [0, 1, 2])


def layout_cascade(base: Stage, sr: Stage, head: RoleHead, head_encoder: FrozenTextEncoder,
                   prompts: list[str], w: float, eta: float, guided_steps: int, steps: int,
                   sr_steps: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """As :func:`course_lib.imagen.cascade`, the base stage with layout guidance."""
    roles = read_layout(head, head_encoder, prompts)
    low = generate_with_layout(*base, prompts, roles, w=w, steps=steps, seed=seed, eta=eta,
                               guided_steps=guided_steps)
    high = generate(*sr, prompts, w=1.0, steps=sr_steps, seed=seed + 1, low_res=low)
    return low, high


def evaluate_layout(config: LayoutEvaluation, base: Stage, sr: Stage, head: RoleHead,
                    head_encoder: FrozenTextEncoder) -> list[dict]:
    """One row per (w, eta, kind, seed): the checker's shares (:func:`shapes_accuracy`)."""
    rows = []
    for kind in KINDS:
        items = shapes_eval_prompts(kind, config.n)
        prompts = [p for p, _, _ in items]
        for w in config.scales:
            for eta in config.etas:
                for seed in config.seeds:
                    start = time.perf_counter()
                    _, high = layout_cascade(base, sr, head, head_encoder, prompts, w, eta,
                                             config.guided_steps, config.steps, config.sr_steps,
                                             seed)
                    rows.append({"w": w, "eta": eta, "kind": kind, "seed": seed,
                                 "samples": len(items),
                                 "seconds": round(time.perf_counter() - start, 1),
                                 **{k: round(v, 4) for k, v in
                                    shapes_accuracy(high, items).items()}})
    return rows


def summarize(rows: list[dict]) -> list[dict]:
    """Per (kind, w, eta): the mean and the range over seeds of "everything right"."""
    groups: dict[tuple, list[float]] = {}
    for row in rows:
        groups.setdefault((row["kind"], row["w"], row["eta"]), []).append(row["all"])
    return [{"kind": kind, "w": w, "eta": eta, "seeds": len(values),
             "mean": round(float(np.mean(values)), 4), "min": min(values), "max": max(values)}
            for (kind, w, eta), values in groups.items()]


# --- command line ------------------------------------------------------------------------------

def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"python -m {MODULE}",
                                     description="layout guidance on the shapes cascade")
    commands = parser.add_subparsers(dest="command", required=True)
    fit = commands.add_parser("fit", help="fit the role head, into " + HEAD_CHECKPOINT.name)
    add_arguments(fit, RoleHeadRecipe)
    fit.add_argument("--out", default=str(HEAD_CHECKPOINT))
    evaluate = commands.add_parser("evaluate", help="the cascade with and without the "
                                                    "guidance, into " + LAYOUT_TABLE.name)
    add_arguments(evaluate, LayoutEvaluation)
    evaluate.add_argument("--head", default=str(HEAD_CHECKPOINT))
    evaluate.add_argument("--out", default=str(LAYOUT_TABLE))
    for sub in (fit, evaluate):
        sub.add_argument("--threads", type=int, default=None)
    return parser


RECIPES = {"fit": RoleHeadRecipe, "evaluate": LayoutEvaluation}


def parse_args(argv: list[str] | None = None
               ) -> tuple[RoleHeadRecipe | LayoutEvaluation, argparse.Namespace]:
    return parse_command(_parser(), RECIPES, argv)


def fit_command(config: RoleHeadRecipe, out: str | Path = HEAD_CHECKPOINT) -> dict[str, float]:
    """Fit the head and save it with its accuracies and the command that remakes it."""
    start = time.perf_counter()
    head, metrics = fit_role_head(config)
    save_checkpoint(out, {"model": head.state_dict()}, arch=ARCH, config=to_dict(config),
                    step=config.steps, metrics=metrics,
                    train_seconds=round(time.perf_counter() - start, 1), device="cpu",
                    command=command(MODULE, config, "fit", out=relative_path(out)))
    return metrics


def guided_quality(summary: list[dict]) -> dict[str, float]:
    """The manifest's record of what the head buys: the mean share with everything right per
    kind, guidance scale and guidance strength eta > 0 ("relation_w2_eta10")."""
    return {f"{row['kind']}_w{row['w']:g}_eta{row['eta']:g}": row["mean"]
            for row in summary if row["eta"] > 0}


def layout_table(config: LayoutEvaluation, head: str | Path = HEAD_CHECKPOINT,
                 out: str | Path = LAYOUT_TABLE) -> dict:
    """:func:`evaluate_layout` of the shipped shapes cascade, with its command, into ``out``;
    the guided shares also go to the head's manifest entry (:func:`guided_quality`)."""
    from course_lib.experiments.text2image import checkpoint_path, load_text2image

    stages = [load_text2image(checkpoint_path("shapes", stage)) for stage in ("base", "sr")]
    rows = evaluate_layout(config, *stages, *load_role_head(head))
    table = {"command": command(MODULE, config, "evaluate", head=relative_path(head),
                                out=relative_path(out)),
             "config": to_dict(config), "rows": rows, "summary": summarize(rows)}
    update_json(out, lambda old: (old.clear(), old.update(table)))
    record_metrics(head, guided_quality(table["summary"]))
    return table


def main(argv: list[str] | None = None) -> None:
    config, args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.command == "fit":
        print(fit_command(config, args.out))
        print(f"written {args.out}")
        return
    table = layout_table(config, args.head, args.out)
    for row in table["summary"]:
        print(f"{row['kind']:<9} w = {row['w']:g}, eta = {row['eta']:g}: everything right "
              f"{row['mean']:.3f} (seeds {row['min']:.3f}-{row['max']:.3f})")
    print(f"written {args.out}")


if __name__ == "__main__":
    main()
