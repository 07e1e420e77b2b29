import json
import shlex

import pytest
import torch
import torch.nn.functional as F

from course_lib.checkpoint import read_manifest
from course_lib.data.shapes import INVERSE
from course_lib.diffusion import make_schedule
from course_lib.experiments.layout import (HEAD_CHECKPOINT, LAYOUT_TABLE, OPPOSITE,
                                           LayoutEvaluation, evaluate_layout, guided_quality,
                                           labelled_captions, load_role_head, parse_args,
                                           summarize, token_roles)
from course_lib.experiments.text2image_eval import SHAPES_TARGETS
from course_lib.imagen import TextUNet, generate
from course_lib.layout import (ROLES, RoleHead, attention_inputs, generate_with_layout,
                               layout_energy, layout_step, read_layout, role_regions,
                               token_attention)
from course_lib.text import FrozenTextEncoder, TextEmbeddings
from course_lib.unet import Attention
from test_imagen import TINY, text_batch


def one_hot_roles(rows):
    """[B, L, len(ROLES)] from role names per token."""
    return F.one_hot(torch.tensor([[ROLES.index(r) for r in row] for row in rows]),
                     len(ROLES)).float()


def test_role_regions_are_the_four_halves():
    regions = role_regions(4).reshape(4, 4, 4)  # [role, row, column]
    rows, columns = torch.meshgrid(torch.arange(4), torch.arange(4), indexing="ij")
    for region, expected in zip(regions, (rows < 2, rows >= 2, columns < 2, columns >= 2)):
        torch.testing.assert_close(region, expected.float())


def test_token_attention_is_the_layers_own_softmax():
    """Values set to one-hot vectors make the layer's attention return its weights: the token
    columns must be token_attention's, padding tokens get none, each row sums to one."""
    torch.manual_seed(0)
    layer = Attention(8, context_dim=6)
    x, text = torch.randn(2, 8, 4, 4), text_batch([3, 5])
    weights = token_attention(layer, x, text.tokens, text.mask)  # [2, 16, 5]
    q, k, _ = layer.qkv(layer.norm(x)).flatten(2).transpose(1, 2).chunk(3, dim=2)
    k_ctx, _ = layer.context_kv(text.tokens).chunk(2, dim=2)
    keys = torch.cat([k, k_ctx], dim=1)
    values = torch.eye(16 + 5).expand(2, -1, -1)  # one-hot per key
    mask = torch.cat([torch.ones(2, 16, dtype=torch.bool), text.mask], dim=1)[:, None]
    # SDPA scales by 1/sqrt(of the last query dim); the layer's q is 8 wide as its channels
    full = F.scaled_dot_product_attention(q, keys, values, attn_mask=mask)  # [2, 16, 21]
    torch.testing.assert_close(weights, full[:, :, 16:])
    assert weights[0, :, 3:].abs().max() == 0
    torch.testing.assert_close(full.sum(-1), torch.ones(2, 16))


def test_layout_energy_is_zero_inside_the_half_and_one_outside():
    """Chen et al. eq. 3 on hand-made maps [1, 16, 3] at 4x4: token 1 "upper", token 2 "lower",
    token 0 "none"."""
    regions = role_regions(4)
    roles = one_hot_roles([["none", "upper", "lower"]])

    def maps(token_1, token_2):
        a = torch.zeros(1, 16, 3)
        a[0, :, 0] = 0.5  # a "none" token attended everywhere costs nothing
        a[0, :, 1], a[0, :, 2] = token_1 / token_1.sum(), token_2 / token_2.sum()
        return a

    upper, lower = regions[0], regions[1]
    assert layout_energy([maps(upper, lower)], roles).item() == 0
    assert layout_energy([maps(lower, upper)], roles).item() == pytest.approx(2.0)
    both = maps(upper + lower, upper + lower)  # spread evenly: (1 - 1/2)^2 per role
    assert layout_energy([both, both], roles).item() == pytest.approx(0.5)
    assert layout_energy([maps(lower, upper)], one_hot_roles([["none"] * 3])).item() == 0


def test_role_head_gives_padding_none_and_refuses_other_widths():
    head = RoleHead(6, layers=[3])
    text = text_batch([2, 4])
    p = head(text)
    assert p.shape == (2, 4, len(ROLES))
    torch.testing.assert_close(p.sum(-1), torch.ones(2, 4))
    torch.testing.assert_close(p[0, 2:], one_hot_roles([["none", "none"]])[0])
    with pytest.raises(ValueError, match=r"FrozenTextEncoder\(layers=\[3\]\)"):
        head(text_batch([2], dim=5))


@pytest.fixture(scope="module")
def tiny_base():
    torch.manual_seed(0)
    return TextUNet(6, channels=3, image_size=16, **TINY).eval(), make_schedule("cosine")


def test_without_strength_layout_guidance_is_plain_generation(tiny_base):
    model, schedule = tiny_base
    prompts = ["a", "b", "c"]
    texts = {p: text_batch([2 + i], seed=i) for i, p in enumerate(prompts)}

    def encoder(chunk):
        return TextEmbeddings.cat([texts[p] for p in chunk])

    roles = one_hot_roles([["upper", "lower", "none", "none"]] * 3)
    expected = generate(model, encoder, schedule, prompts, w=2.0, steps=4, seed=3)
    for eta, guided_steps in ((0.0, 4), (5.0, 0)):
        torch.testing.assert_close(generate_with_layout(
            model, encoder, schedule, prompts, roles, w=2.0, steps=4, seed=3, eta=eta,
            guided_steps=guided_steps, batch_size=2), expected)
    guided = generate_with_layout(model, encoder, schedule, prompts, roles, w=2.0, steps=4,
                                  seed=3, eta=5.0, guided_steps=2)
    assert not torch.allclose(guided, expected)
    with pytest.raises(ValueError, match="guided_steps in"):
        generate_with_layout(model, encoder, schedule, prompts, roles, steps=4, guided_steps=5)
    with pytest.raises(ValueError, match="read them with read_layout"):
        generate_with_layout(model, encoder, schedule, prompts, roles[:, :2], steps=4,
                             guided_steps=2)


def test_a_layout_step_lowers_the_energy(tiny_base):
    """A small step against the gradient of E lowers E (the step is eq. 4, not its sign
    flipped), and the energy reads the maps of every attention layer of the network."""
    model, schedule = tiny_base
    text = text_batch([4, 4])
    roles = one_hot_roles([["upper", "lower", "none", "none"], ["left", "right", "none", "none"]])
    x, t = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)), 800

    def energy(x):
        with torch.no_grad(), attention_inputs(model) as calls:
            model(x, torch.full((2,), t), text)
            assert len(calls) == sum(isinstance(m, Attention) for m in model.modules()) > 0
            return layout_energy([token_attention(*call) for call in calls], roles)

    before = energy(x)
    after = energy(layout_step(model, schedule, x, t, text, roles, eta=0.5))
    assert (after < before).all()


def test_token_roles_follow_the_caption():
    tokenizer = FrozenTextEncoder().tokenizer

    def named(caption, relation=None, first=None):
        tokens = tokenizer.convert_ids_to_tokens(tokenizer(caption)["input_ids"])
        return {t: ROLES[r] for t, r in zip(tokens, token_roles(tokenizer, caption, relation,
                                                                   first)) if r}

    assert named("a red circle above a blue square", "above", "upper") == {
        "red": "upper", "circle": "upper", "blue": "lower", "square": "lower"}
    assert named("a big red disc to the left of a tiny blue box", "to the left of", "left") == {
        "big": "left", "red": "left", "disc": "left", "tiny": "right", "blue": "right",
        "box": "right"}
    assert named("two red circles") == {}
    with pytest.raises(ValueError, match="does not read"):
        token_roles(tokenizer, "two red circles", "above", "upper")
    captions = labelled_captions(40, 0)
    short = {c[1]: c for c in captions if c[0] == "short"}
    inverse = [c for c in captions if c[0] == "inverse"]
    assert inverse
    for _, caption, phrase, first in inverse:  # "B <inverse> A" places B opposite to A
        b, _, a = caption.partition(f" {phrase} ")
        assert short[f"{a} {INVERSE[phrase]} {b}"][3] == OPPOSITE[first]


def test_the_shipped_role_head_reads_the_layout():
    head, encoder = load_role_head()
    entry = read_manifest(HEAD_CHECKPOINT.parent)[HEAD_CHECKPOINT.name]
    assert entry["metrics"]["test_placed"] >= 0.9
    prompts = ["a red circle above a blue square", "an orange cross right of a green triangle",
               "two purple squares", "a large yellow circle"]
    roles = read_layout(head, encoder, prompts).argmax(-1)
    words = [encoder.tokenizer.convert_ids_to_tokens(ids)
             for ids in encoder.tokenizer(prompts)["input_ids"]]
    placed = [{w: ROLES[r] for w, r in zip(row, roles[i]) if r} for i, row in enumerate(words)]
    assert placed[0] == {"red": "upper", "circle": "upper", "blue": "lower", "square": "lower"}
    assert placed[1] == {"orange": "right", "cross": "right", "green": "left",
                         "triangle": "left"}
    assert placed[2] == placed[3] == {}
    with pytest.raises(ValueError, match="fitted on encoder layers"):
        read_layout(head, FrozenTextEncoder(), prompts)


def test_the_layout_table_meets_the_relation_target_and_rebuilds_its_command():
    table = json.loads(LAYOUT_TABLE.read_text())
    config, args = parse_args(shlex.split(table["command"])[3:])
    assert config == LayoutEvaluation(**table["config"]) and args.head.endswith(
        HEAD_CHECKPOINT.name)
    assert summarize(table["rows"]) == table["summary"]
    recorded = read_manifest(HEAD_CHECKPOINT.parent)[HEAD_CHECKPOINT.name]["metrics"]
    assert guided_quality(table["summary"]).items() <= recorded.items()
    best = {}
    for row in table["summary"]:
        assert row["seeds"] == len(config.seeds)
        if row["eta"] > 0:
            best[row["kind"]] = max(best.get(row["kind"], 0), row["mean"])
    assert all(best[kind] >= target for kind, target in SHAPES_TARGETS.items())


def test_on_the_shipped_cascade_the_guidance_puts_pairs_in_order():
    """20 relation prompts, one seed: the guided cascade gets far more of them right, and the
    head places nothing in one-object prompts, so their images are unchanged."""
    from course_lib.experiments.text2image import checkpoint_path, load_text2image

    stages = [load_text2image(checkpoint_path("shapes", stage)) for stage in ("base", "sr")]
    config = LayoutEvaluation(n=20, scales=[2.0], etas=[0.0, 10.0], seeds=[0])
    rows = {(row["kind"], row["eta"]): row for row in
            evaluate_layout(config, *stages, *load_role_head())}
    assert rows["relation", 10.0]["relation"] >= rows["relation", 0.0]["relation"] + 0.2
    assert rows["single", 10.0]["all"] >= rows["single", 0.0]["all"] - 0.05
