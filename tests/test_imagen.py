import json
import shlex
from types import SimpleNamespace

import pytest
import torch

from course_lib.checkpoint import read_manifest
from course_lib.data.shapes import ShapeSpec, render
from course_lib.diffusion import make_schedule, q_sample
from course_lib.experiments.config import ConfigError, from_dict, override, to_dict
from course_lib.experiments.text2image import (MODULE, STAGES, Text2ImageRecipe, captioned_data,
                                               checkpoint_path, evaluate_checkpoints,
                                               load_text2image, parse_args, recipe,
                                               train_text2image)
from course_lib.experiments.text2image_eval import (SHAPES_HELDOUT_COMBOS, SHAPES_PROMPT_KINDS,
                                                    GuidanceDiversity, Text2ImageEvaluation,
                                                    check_shapes, diversity_summary,
                                                    diversity_table, fashion_accuracy,
                                                    flip_relation, layout_commitment,
                                                    mean_pairwise_distance, prompt_diversity,
                                                    relation_role_probe, shapes_accuracy,
                                                    shapes_eval_prompts)
from course_lib.experiments.text2image_eval import parse_args as parse_eval_args
from course_lib.imagen import (Guided, TextUNet, augment_low_res, cascade, conditioning_dropout,
                               from_ho_salimans, generate, guided_eps, guided_prediction)
from course_lib.runtime import CHECKPOINT_DIR
from course_lib.text import FrozenTextEncoder, TextEmbeddings

TINY = {"base": 8, "channel_mults": [1, 2], "depth": 1, "attention_resolutions": [8, 4],
        "dropout": 0.0, "num_steps": 1000}


def text_batch(lengths, dim=6, seed=0):
    gen = torch.Generator().manual_seed(seed)
    tokens = torch.randn(len(lengths), max(lengths), dim, generator=gen)
    mask = torch.arange(max(lengths))[None] < torch.tensor(lengths)[:, None]
    return TextEmbeddings(tokens * mask[..., None], mask, torch.randn(len(lengths), dim,
                                                                      generator=gen))


def randomized(model):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))  # the U-Net starts at eps = 0: make it respond
    return model.eval()


# --- classifier-free guidance -----------------------------------------------------------------

def test_guidance_conventions():
    gen = torch.Generator().manual_seed(0)
    c, u = torch.randn(2, 3, generator=gen), torch.randn(2, 3, generator=gen)
    torch.testing.assert_close(guided_eps(c, u, 1.0), c)  # w = 1: no guidance
    torch.testing.assert_close(guided_eps(c, u, 0.0), u)  # w = 0: unconditional
    torch.testing.assert_close(guided_eps(c, u, 3.0), 3 * c - 2 * u)  # w c + (1 - w) u
    for w_hs in (0.0, 0.5, 2.0):  # Ho & Salimans: (1 + w') c - w' u
        torch.testing.assert_close(guided_eps(c, u, from_ho_salimans(w_hs)),
                                   (1 + w_hs) * c - w_hs * u)


def test_conditioning_dropout_rate():
    keep = conditioning_dropout(100_000, 0.1, torch.Generator().manual_seed(0))
    assert keep.dtype == torch.bool
    assert abs((~keep).float().mean().item() - 0.1) < 0.003  # ~3 standard deviations
    assert conditioning_dropout(1000, 0.0).all()
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        conditioning_dropout(4, 1.0)


def test_dropped_rows_get_the_null_condition_and_padding_is_masked():
    model = randomized(TextUNet(6, channels=1, image_size=16, **TINY))
    x, t = torch.randn(3, 1, 16, 16), torch.tensor([5, 500, 900])
    text = text_batch([2, 4, 3])
    keep = torch.tensor([True, False, True])
    out = model(x, t, text, keep=keep)
    torch.testing.assert_close(out[1], model(x, t, None)[1])  # dropped = unconditional
    torch.testing.assert_close(out[[0, 2]], model(x, t, text)[[0, 2]])
    assert not torch.allclose(out[0], model(x, t, None)[0])  # the text matters
    unpadded = TextEmbeddings(text.tokens[:1, :2], text.mask[:1, :2], text.pooled[:1])
    torch.testing.assert_close(model(x[:1], t[:1], text[0]), model(x[:1], t[:1], unpadded))


def test_text_shape_errors():
    model = TextUNet(6, channels=1, image_size=16, **TINY)
    with pytest.raises(ValueError, match="one prompt per image"):
        model(torch.randn(2, 1, 16, 16), torch.tensor([1, 2]), text_batch([2, 2, 2]))
    with pytest.raises(ValueError, match="no low_res"):
        model(torch.randn(1, 1, 16, 16), torch.tensor([1]), low_res=torch.randn(1, 1, 8, 8))


def test_super_resolution_conditioning():
    model = randomized(TextUNet(6, channels=3, image_size=32, low_res_size=16, **TINY))
    x, t, text = torch.randn(2, 3, 32, 32), torch.tensor([100, 400]), text_batch([3, 2])
    low, aug_t = torch.randn(2, 3, 16, 16), torch.tensor([200, 200])
    out = model(x, t, text, low_res=low, aug_t=aug_t)
    assert out.shape == (2, 3, 32, 32)
    assert not torch.allclose(out, model(x, t, text, low_res=-low, aug_t=aug_t))
    assert not torch.allclose(out, model(x, t, text, low_res=low, aug_t=aug_t // 4))
    with pytest.raises(ValueError, match=r"low_res \[2, 3, 16, 16\]"):
        model(x, t, text, low_res=torch.randn(2, 3, 8, 8), aug_t=aug_t)
    with pytest.raises(ValueError, match="aug_t"):
        model(x, t, text, low_res=low)


def test_noise_augmentation_is_q_sample_at_the_level():
    s = make_schedule("cosine")
    low, noise = torch.rand(3, 1, 4, 4), torch.randn(3, 1, 4, 4)
    noised, steps = augment_low_res(s, low, torch.tensor([0.0, 0.2, 0.45]), noise)
    assert steps.tolist() == [0, 200, 450]
    torch.testing.assert_close(noised, q_sample(s, low, steps, noise))
    _, fixed = augment_low_res(s, low, 0.2, noise)
    assert fixed.tolist() == [200] * 3
    with pytest.raises(ValueError, match=r"\[0, 1\)"):
        augment_low_res(s, low, 1.0)


def test_guided_network_combines_two_evaluations():
    model = randomized(TextUNet(6, channels=1, image_size=16, **TINY))
    x, t, text = torch.randn(2, 1, 16, 16), torch.tensor([300, 300]), text_batch([3, 1])
    torch.testing.assert_close(Guided(model, text, 1.0)(x, t), model(x, t, text))
    torch.testing.assert_close(Guided(model, text, 0.0)(x, t), model(x, t, None))
    expected = 4 * model(x, t, text) - 3 * model(x, t, None)
    torch.testing.assert_close(Guided(model, text, 4.0)(x, t), expected, rtol=1e-5, atol=1e-5)
    assert Guided(model, text, 4.0).num_steps == 1000


def test_trace_conditioning_shows_where_the_text_enters():
    from course_lib.imagen import trace_conditioning

    model = TextUNet(6, channels=1, image_size=16, **TINY)  # levels 16, 8: attention at 8x8
    rows = trace_conditioning(model, torch.randn(2, 1, 16, 16), torch.tensor([3, 3]),
                              text_batch([3, 2]))
    shapes = {(row["part"], row["tensor"]): row["shape"] for row in rows}
    assert shapes["prompt", "token embeddings (frozen encoder)"] == [2, 3, 6]
    assert shapes["CombineEmbs", "pooled text embedding"] == [2, 6]
    combined = [row["shape"] for row in rows if row["part"] == "CombineEmbs"]
    assert combined[1:] == [[2, 32]] * 3  # time_dim = 4 * base
    assert shapes["cross-attention 8x8", "keys and values (each): pixels, then tokens"] == [
        2, 64 + 3, 16]
    assert shapes["cross-attention 8x8", "attention weights (padding tokens masked)"] == [
        2, 64, 67]
    assert [row["part"] for row in rows].count("cross-attention 8x8") == 6  # the middle only
    assert rows[-1] == {"part": "output", "tensor": "predicted noise", "shape": [2, 1, 16, 16]}
    assert not model.text_mlp._forward_hooks  # the hooks are gone


def test_guided_prediction_is_one_conditional_and_one_unconditional_pass():
    calls = []

    def network(x, t, text, **conditions):
        calls.append((text, conditions))
        return x + (1.0 if text is None else 3.0)

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([5, 5])
    out = guided_prediction(network, x, t, "prompt", 2.5, low_res="low")
    torch.testing.assert_close(out, torch.full_like(x, 2.5 * 3 + (1 - 2.5) * 1))
    assert calls == [("prompt", {"low_res": "low"}), (None, {"low_res": "low"})]


def test_a_written_guided_loop_gives_the_package_sampler_images():
    """The notebook's loop (guided prediction, DDIM step with dynamic thresholding, the noise
    from the seeded generator) and :func:`course_lib.imagen.generate` agree exactly."""
    from course_lib.diffusion import ddim_step, ddim_trailing_timesteps, make_schedule

    model = randomized(TextUNet(6, channels=1, image_size=16, **TINY))
    schedule = make_schedule("cosine")
    text = text_batch([3, 2])
    generator = torch.Generator().manual_seed(4)
    x = torch.randn(2, 1, 16, 16, generator=generator)
    timesteps = ddim_trailing_timesteps(schedule.T, 5)
    assert timesteps == [999, 799, 599, 399, 199]  # the first step from pure noise
    with torch.inference_mode():
        for t, t_prev in zip(timesteps, [*timesteps[1:], -1]):
            eps = guided_prediction(model, x, torch.full((2,), t), text, 3.0)
            x, _ = ddim_step(schedule, x, t, t_prev, eps, clip="dynamic")

    def encoder(prompts):
        assert prompts == ["a", "b"]
        return text

    torch.testing.assert_close(generate(model, encoder, schedule, ["a", "b"], w=3.0, steps=5,
                                        seed=4), x.clamp(-1, 1), rtol=0, atol=0)


# --- data and evaluation ------------------------------------------------------------------------

def test_shapes_training_data_holds_out_combinations_and_synonyms():
    images, options = captioned_data("shapes")
    assert images.shape[1:] == (3, 32, 32) and images.min() >= -1 and images.max() <= 1
    captions = {c for o in options for c in o}
    for colour, shape in SHAPES_HELDOUT_COMBOS:
        assert not any(f"{colour} {shape}" in c for c in captions)
    for word in ("disc", "box", "tiny", "big", "plus sign"):
        assert not any(word in c.split() or word in c for c in captions), word


def test_eval_prompts_and_the_checker_on_real_renderings():
    for kind in SHAPES_PROMPT_KINDS:
        items = shapes_eval_prompts(kind, 20)
        assert len(items) == 20 and len({p for p, _, _ in items}) > 5
        images = torch.stack([render(objects) for _, objects, _ in items]) * 2 - 1
        result = shapes_accuracy(images, items)
        assert result["all"] == 1.0, (kind, result)
        held = [any((o.colour, o.shape) in SHAPES_HELDOUT_COMBOS for o in objects)
                for _, objects, _ in items]
        assert all(held) if kind == "heldout combo" else not any(held)


def test_flip_relation_asks_for_the_other_layout():
    item = ("a red circle left of a blue square", ["objects"], "left of")
    assert flip_relation(item) == ("a red circle right of a blue square", ["objects"], "right of")
    assert flip_relation(("a red circle below a red square", [], "below"))[0] == \
        "a red circle above a red square"


class ImageOracle(torch.nn.Module):
    """A base stage that ignores its prompt and predicts the noise of given clean images x_0."""

    low_res_size, prediction, num_steps = None, "epsilon", 1000

    def __init__(self, x_0, schedule):
        super().__init__()
        self.x_0, self.schedule = x_0, schedule

    def forward(self, x_t, t, text=None):
        alpha_bar = self.schedule.alphas_cumprod[t].float()[:, None, None, None]
        return (x_t - alpha_bar.sqrt() * self.x_0) / (1 - alpha_bar).sqrt()


def test_layout_commitment_of_a_model_that_follows_the_image():
    """A model that only reproduces the image places the objects as the image does: right for
    the prompt as written whenever both objects show, never right for the flipped one."""
    schedule = make_schedule("cosine", 1000)
    items = [i for i in shapes_eval_prompts("relation", 40) if i[1][0].colour != i[1][1].colour][:10]
    x_0 = torch.nn.functional.avg_pool2d(torch.stack([render(o) for _, o, _ in items]), 2) * 2 - 1
    rows = layout_commitment((ImageOracle(x_0, schedule), lambda prompts: None, schedule), 10,
                             [999, 10], w=3.0)
    by = {(row["t"], row["prompt"]): row for row in rows}
    assert by[10, "as written"]["binding"] >= 0.5  # the 16x16 image, enlarged, mostly reads back
    for t in (999, 10):
        written, flipped = by[t, "as written"], by[t, "relation flipped"]
        assert written["relation"] == written["binding"] == flipped["binding"]
        assert flipped["relation"] == 0
    with pytest.raises(ValueError, match="base stage"):
        layout_commitment((TextUNet(6, image_size=32, low_res_size=16, **TINY), None, schedule),
                          5, [500])



class RoleEncoder:
    """Tokens that say, at each colour word, whether its object is the upper / left one (read
    here from the prompt's words), plus noise: a probe with right labels reads them back."""

    layers = [0]

    def __init__(self):
        self.tokenizer = FrozenTextEncoder(device="cpu").tokenizer
        self.generator = torch.Generator().manual_seed(0)

    def __call__(self, prompts):
        ids = self.tokenizer(prompts, padding=True)["input_ids"]
        tokens = torch.randn(len(prompts), len(ids[0]), 8, generator=self.generator)
        for i, prompt in enumerate(prompts):
            words = prompt.split()  # a <colour> <shape> <relation ...> a <colour> <shape>
            upper = words[1] if words[3] in ("above", "left") else words[-2]
            place = ids[i].index(self.tokenizer.convert_tokens_to_ids(upper))
            tokens[i, place, 0] += 10.0
        return TextEmbeddings(tokens, torch.ones(tokens.shape[:2], dtype=torch.bool),
                              tokens.mean(1))


def test_relation_role_probe_reads_a_planted_role_and_minilm_layers():
    assert relation_role_probe(RoleEncoder()) == {0: {"train": 1.0, "heldout": 1.0}}
    probe = relation_role_probe(FrozenTextEncoder(device="cpu", layers=[0, 3, 6]))
    assert probe[0]["heldout"] <= 0.6  # word and place alone: chance
    assert probe[3]["heldout"] >= 0.9 and probe[6]["heldout"] <= probe[3]["heldout"] - 0.1


def test_relation_role_probe_needs_colour_words_as_tokens():
    encoder = RoleEncoder()
    encoder.name = "a vocabulary without colours"
    encoder.tokenizer = SimpleNamespace(unk_token_id=0, convert_tokens_to_ids=lambda token: 0)
    with pytest.raises(ValueError, match=r"no single token for \['red', 'orange'"):
        relation_role_probe(encoder)


def test_checker_catches_wrong_binding_relation_and_count():
    a = ShapeSpec("red", "circle", "small", 8, 8)
    b = ShapeSpec("blue", "square", "small", 8, 24)
    image = render([a, b])
    assert check_shapes(image, [a, b], "above")["all"]
    assert not check_shapes(image, [a, b], "below")["relation"]
    swapped = [ShapeSpec("blue", "circle", "small", 8, 8), ShapeSpec("red", "square", "small",
                                                                      8, 24)]
    assert not check_shapes(image, swapped, "above")["binding"]
    single = check_shapes(render([a]), [ShapeSpec("red", "square", "large", 8, 8)], None)
    assert single == {"count": True, "colour": True, "shape": False, "size": False,
                      "all": False}
    assert not check_shapes(image, [a], None)["count"]


def test_mean_pairwise_distance():
    points = torch.tensor([[0.0, 0.0], [3.0, 4.0], [0.0, 0.0]])
    assert mean_pairwise_distance(points) == pytest.approx((5 + 0 + 5) / 3)
    assert mean_pairwise_distance(torch.ones(4, 3)) == 0
    with pytest.raises(ValueError, match="N >= 2"):
        mean_pairwise_distance(torch.ones(1, 3))


def test_prompt_diversity_averages_over_the_classes():
    embedded = torch.tensor([[0.0], [2.0], [5.0], [5.0]])
    labels = torch.tensor([0, 0, 1, 1])
    result = prompt_diversity(embedded, torch.tensor([0, 1, 1, 1]), labels)
    assert result == {"accuracy": 0.75, "diversity": 1.0}  # class 0: 2, class 1: 0


def test_diversity_summary_means_and_spreads_over_seeds():
    rows = [{"w": w, "seed": s, "accuracy": a, "diversity": d}
            for w, s, a, d in ((1.0, 0, 0.5, 4.0), (1.0, 1, 0.7, 6.0), (3.0, 0, 0.9, 2.0),
                               (3.0, 1, 0.9, 2.0))]
    table = {"scales": [1.0, 3.0], "rows": rows, "fid": [{"w": 1.0, "samples": 20, "fid": 9.0},
                                                        {"w": 3.0, "samples": 20, "fid": 7.0}]}
    first, second = diversity_summary(table)
    assert (first["accuracy"], first["diversity"], first["seeds"]) == (0.6, 5.0, 2)
    assert first["accuracy_std"] == pytest.approx(0.1414, abs=1e-4)  # ddof = 1
    assert first["diversity_std"] == pytest.approx(1.4142, abs=1e-4)
    assert (second["diversity_std"], second["fid"], second["fid_samples"]) == (0.0, 7.0, 20)


def test_guidance_diversity_settings_are_checked():
    with pytest.raises(ValueError, match="per_prompt >= 2"):
        GuidanceDiversity(per_prompt=1)
    with pytest.raises(ValueError, match="no repeats"):
        GuidanceDiversity(seeds=(0, 0))
    config, _ = parse_eval_args(["diversity", "--per-prompt", "5", "--seeds", "3", "4"])
    assert config == GuidanceDiversity(per_prompt=5, seeds=(3, 4))


def test_sharpness_is_the_gradient_energy_per_pixel():
    """A flat image has none; a 4x4 image dark on the left half, white on the right has one
    step of 1 among the 12 horizontal neighbour pairs and none vertically. A 3x3 box blur
    spreads each step into three steps of 1/3, which leaves a third of the energy."""
    from course_lib.experiments.text2image_eval import SuperResolutionEffect, sharpness

    flat = torch.full((1, 1, 4, 4), 0.3)
    edge = torch.zeros(1, 1, 4, 4)
    edge[..., 2:] = 1.0
    assert sharpness(flat).item() == 0
    assert sharpness(edge).item() == pytest.approx(1 / 3)
    blurred = torch.nn.functional.avg_pool2d(edge, 3, stride=1, padding=1,
                                             count_include_pad=False)
    assert sharpness(blurred).item() == pytest.approx(1 / 9)
    assert sharpness(torch.cat([flat, edge])).shape == (2,)
    config, _ = parse_eval_args(["sr", "--per-class", "7", "--w", "2"])
    assert config == SuperResolutionEffect(per_class=7, w=2.0)


def test_fashion_accuracy_uses_the_course_classifier():
    from course_lib.data import load_fashion_mnist

    x, y = load_fashion_mnist("test", size=32, value_range=(-1, 1))
    assert fashion_accuracy(x[:500], y[:500]) > 0.9
    assert fashion_accuracy(x[:500], (y[:500] + 1) % 10) < 0.1


# --- the recipes and their command line ----------------------------------------------------------

def test_recipes_reproduce_the_shipped_configs():
    """Every shipped stage's stored config loads, is its stage's recipe, and is the recipe key
    for key, with the same types (a list stays a list). A network setting added after the
    checkpoint was trained is not stored; loading gives it its default (checked first)."""
    manifest = read_manifest(CHECKPOINT_DIR)
    for key in STAGES:
        stored = manifest[checkpoint_path(*key).name]["config"]
        assert from_dict(Text2ImageRecipe, stored) == recipe(*key), key
        current = to_dict(recipe(*key))
        current["model"] = {name: current["model"][name] for name in stored["model"]}
        assert json.dumps(current, sort_keys=True) == json.dumps(stored, sort_keys=True), key


def test_recipe_settings_merge_and_misspellings_are_errors():
    sr = recipe("shapes", "sr", model={"base": 8}, steps=3)
    assert (sr.model.base, sr.model.low_res_size, sr.model.prediction) == (8, 16, "v")
    assert (sr.steps, sr.ema, sr.channels) == (3, 0.999, 3)
    for dataset in ("fashion", "shapes"):
        base, scratch = recipe(dataset, "base"), recipe(dataset, "base", "scratch")
        assert (base.steps, base.ema, base.model.prediction) == (15_000, 0.9995, "v")
        assert (scratch.steps, scratch.model.prediction) == (4_000, "epsilon")  # as shipped
        assert recipe(dataset, "sr").steps == 4_500
    assert override(sr, {"model": {"depth": 2}}).model.channel_mults == [1, 2, 2, 2]
    with pytest.raises(ConfigError, match="did you mean 'batch_size'"):
        recipe("fashion", "base", batchsize=8)
    with pytest.raises(ConfigError, match="no setting 'bse'; did you mean 'base'"):
        recipe("fashion", "base", model={"bse": 8})
    with pytest.raises(ConfigError, match="3 channels"):
        recipe("shapes", "base", channels=1)
    with pytest.raises(ConfigError, match="encoder"):
        recipe("fashion", "base", "t5")
    with pytest.raises(ConfigError, match="scratch encoder has no such choice"):
        recipe("shapes", "base", "scratch", encoder_layers=[3, 6])


def test_the_command_line_rebuilds_the_recipe():
    config, args = parse_args(["train", "shapes", "sr", "--encoder", "minilm", "--steps", "7",
                               "--model.base", "16", "--threads", "1"])
    assert config == recipe("shapes", "sr", steps=7, model={"base": 16}) and args.threads == 1
    with pytest.raises(ConfigError, match="contradict"):
        parse_args(["train", "fashion", "base", "--stage", "sr", "--model.low-res-size", "16"])
    evaluation, _ = parse_args(["evaluate", "--per-class", "50", "--scales", "1", "3"])
    assert evaluation == Text2ImageEvaluation(per_class=50, scales=(1.0, 3.0))


# --- the training command and the evaluation table, end to end on tiny configurations -------------

@pytest.fixture(scope="module")
def tiny_stages(tmp_path_factory):
    """The six shipped stages' recipes, shrunk to 3 steps of a tiny U-Net."""
    folder = tmp_path_factory.mktemp("t2i")
    paths = {}
    for key in STAGES:
        out = folder / f"{'_'.join(key)}.pt"
        config = recipe(*key, steps=3, warmup=1, batch_size=8, model=TINY)
        paths[key] = train_text2image(config, out=out, run=folder / out.stem / "train.pt")
    return paths


def test_train_load_and_sample_the_cascade(tiny_stages):
    base = load_text2image(tiny_stages["shapes", "base", "scratch"])
    sr = load_text2image(tiny_stages["shapes", "sr", "minilm"])
    assert base[0].image_size == 16 and sr[0].low_res_size == 16
    prompts = ["a red circle above a blue square", "two small green crosses"]
    low, high = cascade(base, sr, prompts, w=3.0, steps=3, sr_steps=3, seed=0)
    assert low.shape == (2, 3, 16, 16) and high.shape == (2, 3, 32, 32)
    again = cascade(base, sr, prompts, w=3.0, steps=3, sr_steps=3, seed=0)
    torch.testing.assert_close(again[1], high)  # same seed, same images


def test_the_recorded_command_rebuilds_the_stored_config(tiny_stages):
    path = tiny_stages["fashion", "sr", "minilm"]
    entry = read_manifest(path.parent)[path.name]
    words = shlex.split(entry["command"])
    assert words[:5] == ["python", "-m", MODULE, "train", "fashion"]
    config, args = parse_args(words[3:])
    assert to_dict(config) == entry["config"] and args.out == str(path)


def test_evaluation_table(tiny_stages, tmp_path):
    config = Text2ImageEvaluation(per_class=2, shapes_n=2, scales=(1.0, 3.0), steps=2,
                                  sr_steps=2)
    table = evaluate_checkpoints(config, tmp_path / "table.json", paths=tiny_stages)
    assert [row["w"] for row in table["fashion"]] == [1.0, 3.0]
    assert all(0 <= row["accuracy"] <= 1 and row["fid"] > 0 for row in table["fashion"])
    assert len(table["shapes"]) == 2 * 3 and len(table["heldout"]) == 2 * (2 + 3)
    assert table["fashion_floor_fid"] > 0 and table["fashion_ddpm_fid"] > 0  # at n = 20: bias
    assert json.loads((tmp_path / "table.json").read_text()) == table
    assert parse_args(shlex.split(table["command"])[3:])[0] == config
    path = tiny_stages["fashion", "base", "scratch"]
    metrics = read_manifest(path.parent)[path.name]["metrics"]
    assert {"loss", "accuracy_training_phrases_w3", "accuracy_held_out_paraphrases_w3"} <= set(
        metrics)


def test_diversity_table(tiny_stages, tmp_path):
    config = GuidanceDiversity(scales=(0.0, 3.0), per_prompt=2, seeds=(0, 1), steps=2,
                               sr_steps=2)
    paths = (tiny_stages["fashion", "base", "minilm"], tiny_stages["fashion", "sr", "minilm"])
    with pytest.warns(UserWarning, match="covariance is singular"):  # FID of 40 images
        table = diversity_table(config, tmp_path / "diversity.json", paths)
    assert [(row["w"], row["seed"], row["samples"]) for row in table["rows"]] == [
        (0.0, 0, 20), (0.0, 1, 20), (3.0, 0, 20), (3.0, 1, 20)]
    assert all(0 <= row["accuracy"] <= 1 and row["diversity"] >= 0 for row in table["rows"])
    assert [(row["w"], row["samples"]) for row in table["fid"]] == [(0.0, 40), (3.0, 40)]
    assert table["fid_floor"]["samples"] == 40 and len(table["real"]) == 2
    assert all(row["accuracy"] > 0.5 for row in table["real"])  # real images, their classes
    assert json.loads((tmp_path / "diversity.json").read_text()) == json.loads(json.dumps(table))
    assert parse_eval_args(shlex.split(table["command"])[3:])[0] == config
    assert [row["w"] for row in diversity_summary(table)] == [0.0, 3.0]


def test_sr_effect_enlarges_base_and_real_images_every_way(tiny_stages):
    """Bilinear upsampling and the SR stage at each augmentation level, on the base stage's
    16x16 images and on real ones of the prompts' classes: real images keep their class and are
    closer to the test set than a tiny untrained base stage's."""
    from course_lib.experiments.text2image_eval import (SuperResolutionEffect,
                                                        super_resolution_effect)

    config = SuperResolutionEffect(per_class=2, steps=2, sr_steps=2, aug_levels=[0.0, 0.3])
    table = super_resolution_effect(config, *(load_text2image(tiny_stages["fashion", s, "minilm"])
                                              for s in ("base", "sr")))
    rows = table["rows"]
    assert list(rows) == ["base, bilinear", "base, super-resolution (aug 0)",
                          "base, super-resolution (aug 0.3)", "real 16x16, bilinear",
                          "real 16x16, super-resolution (aug 0.2)"]
    assert rows["real 16x16, bilinear"]["accuracy"] > 0.5 > rows["base, bilinear"]["accuracy"]
    assert rows["real 16x16, bilinear"]["fid"] < rows["base, bilinear"]["fid"]
    assert table["samples"] == 20 and 0 < table["real_sharpness"] < 1
    assert parse_eval_args(["sr", "--aug-levels", "0", "0.1"])[0].aug_levels == [0.0, 0.1]
    with pytest.raises(ValueError, match="aug_levels must be"):
        SuperResolutionEffect(aug_levels=[1.5])


def test_sampler_grid_runs_the_cascade_on_each_grid(tiny_stages):
    """One row per pair of grids, each with the first code step of both stages' grids."""
    from course_lib.experiments.text2image_eval import GRID_ROWS, SamplerGrid, sampler_grid

    config = SamplerGrid(per_class=2, steps=4, sr_steps=2)
    table = sampler_grid(config, *(load_text2image(tiny_stages["fashion", s, "minilm"])
                                   for s in ("base", "sr")))
    assert list(table["rows"]) == list(GRID_ROWS) and table["samples"] == 20
    assert [row["first_t"] for row in table["rows"].values()] == [[750, 500], [750, 999],
                                                                  [999, 999]]
    assert all(row["fid"] > 0 and 0 <= row["accuracy"] <= 1 for row in table["rows"].values())
    assert parse_eval_args(["grid", "--per-class", "2", "--steps", "4", "--sr-steps", "2"]
                           )[0] == config


def test_stages_table_measures_each_stage_and_keeps_other_entries(tiny_stages, tmp_path):
    """Real images pass the checker; a tiny untrained cascade does not; a second label adds an
    entry beside the first, with the checkpoints' hashes and a command that rebuilds it."""
    from course_lib.checkpoint import sha256_of
    from course_lib.experiments.text2image_eval import STAGE_INPUTS, ShapesStages, stages_table

    from course_lib.experiments.text2image_eval import bilinear_x2

    flat = torch.full((1, 3, 16, 16), 0.3)
    assert bilinear_x2(flat).shape == (1, 3, 32, 32)
    torch.testing.assert_close(bilinear_x2(flat), torch.full((1, 3, 32, 32), 0.3))
    config = ShapesStages(n=3, steps=2, sr_steps=2)
    base, sr = tiny_stages["shapes", "base", "minilm"], tiny_stages["shapes", "sr", "minilm"]
    out = tmp_path / "stages.json"
    entry = stages_table(config, base, sr, "tiny", out)
    assert [row["kind"] for row in entry["rows"]] == ["single", "relation", "count"]
    for row in entry["rows"]:
        assert row["samples"] == 3 and row["real"] == 1.0 and row["cascade"] < 1.0
        assert all(0 <= row[name] <= 1 for name in STAGE_INPUTS)
    assert entry["sha256"] == {"base": sha256_of(base), "sr": sha256_of(sr)}
    stages_table(config, base, sr, "again", out)
    table = json.loads(out.read_text())
    assert list(table) == ["tiny", "again"] and table["tiny"]["rows"] == entry["rows"]
    config_back, args = parse_eval_args(shlex.split(entry["command"])[3:])
    assert config_back == config and (args.base, args.sr, args.label) == (str(base), str(sr),
                                                                          "tiny")
