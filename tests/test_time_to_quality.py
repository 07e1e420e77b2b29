"""Time to quality (issue 16, part 4): our network retraces the shipped DDPM's training, the
diffusers network runs in the same loop and samplers, and the steps to a target FID are read
from the evaluations as documented."""
from __future__ import annotations

import dataclasses
import json
import math
import shlex

import pytest
import torch

from course_lib.checkpoint import load_checkpoint
from course_lib.diffusion import generate, make_schedule
from course_lib.experiments import time_to_quality as ttq
from course_lib.experiments.ddpm import DDPMRecipe, UNetConfig, train_ddpm
from course_lib.runtime import DATA_DIR
from course_lib.train import debiased_ema

TINY = DDPMRecipe(steps=4, warmup=2, model=UNetConfig(base=8))


def test_steps_to_takes_the_first_evaluation_at_the_target_and_interpolates_in_log_fid():
    fids = {"1000": 40.0, "2000": 10.0, "3000": 4.0, "4000": 3.0}
    first, crossing = ttq.steps_to(fids, 5.0)
    assert first == 3000
    share = (math.log(10.0) - math.log(5.0)) / (math.log(10.0) - math.log(4.0))
    assert crossing == pytest.approx(2000 + 1000 * share)
    assert ttq.steps_to(fids, 50.0) == (1000, 1000.0)
    assert ttq.steps_to(fids, 2.0) == (None, None)


def test_ours_retraces_the_shipped_training_loop(tmp_path):
    """The same recipe gives the same EMA network through ``train_ddpm`` and through the
    time-to-quality trainer, which snapshots it along the way (here after steps 2 and 4)."""
    train_ddpm(TINY, out=tmp_path / "ddpm.pt", run=tmp_path / "ddpm_state.pt")
    shipped_way = load_checkpoint(tmp_path / "ddpm.pt")["state"]["ema"]
    ttq.train("ours", ttq.TimeToQuality(recipe=TINY, every=2), tmp_path / "ttq")
    assert sorted(p.name for p in (tmp_path / "ttq" / "ours").glob("ema_*.pt")) == [
        "ema_00002.pt", "ema_00004.pt"]
    retraced = load_checkpoint(ttq.snapshot_path("ours", 4, tmp_path / "ttq"))["state"]["ema"]
    assert shipped_way.keys() == retraced.keys()
    for name, value in shipped_way.items():
        torch.testing.assert_close(retraced[name], value, rtol=0, atol=0, msg=name)


def test_debiasing_a_snapshot_needs_the_initial_weights_the_training_started_from(tmp_path):
    """After one update the EMA is d theta_0 + (1 - d) theta_1: debiased with the initial
    weights that ``initial_weights`` rebuilds, it must be exactly the trained theta_1."""
    recipe = DDPMRecipe(steps=1, warmup=1, ema=0.9, model=UNetConfig(base=8))
    config = ttq.TimeToQuality(recipe=recipe, every=1)
    for net in ttq.NETS:
        ttq.train(net, config, tmp_path)
        snapshot = load_checkpoint(ttq.snapshot_path(net, 1, tmp_path))["state"]["ema"]
        trained = load_checkpoint(tmp_path / net / "train.pt")["state"]["model"]
        debiased = debiased_ema(snapshot, ttq.initial_weights(net, config), recipe.ema, 1)
        for name, value in trained.items():
            torch.testing.assert_close(debiased[name], value, msg=f"{net} {name}")


def test_the_diffusers_network_trains_and_samples_in_our_loops(tmp_path):
    config = ttq.TimeToQuality(recipe=TINY, every=4)
    ttq.train("diffusers", config, tmp_path)
    model = ttq.build("diffusers", config)
    payload = load_checkpoint(ttq.snapshot_path("diffusers", 4, tmp_path))
    model.load_state_dict(payload["state"]["ema"])
    assert abs(sum(p.numel() for p in model.parameters()) - 509_857) / 509_857 < 0.01
    images = generate(model.eval(), make_schedule("cosine", 1000), 3, "ddim", 2, seed=0)
    assert images.shape == (3, 1, 28, 28) and torch.isfinite(images).all()
    with pytest.raises(ValueError, match="net must be one of"):
        ttq.build("theirs", config)
    with pytest.raises(ValueError, match="positive multiple of 8"):
        ttq.TimeToQuality(peer_widths=[32, 44, 56])


CANDIDATES = {"time_to_quality_adagn.json": {"adaptive_norm": True},
              "time_to_quality_adagn_123.json": {"adaptive_norm": True,
                                                 "channel_mults": [1, 2, 3]}}


def recorded_config(name: str) -> ttq.TimeToQuality:
    """A table's recorded config; a setting added after the table was made takes its default."""
    from course_lib.experiments.config import from_dict

    return from_dict(ttq.TimeToQuality,
                     json.loads((DATA_DIR / "results" / name).read_text())["config"])


def parameters(net: str, config: ttq.TimeToQuality) -> int:
    return sum(p.numel() for p in ttq.build(net, config).parameters())


@pytest.mark.parametrize("name", ["time_to_quality.json", "time_to_quality_adagn_123.json"])
def test_the_peer_is_the_closest_sized_unet2dmodel(name):
    """The shipped network and AdaGN 32/64/96 each race the UNet2DModel closest to them in size
    among those that start at our width 32 and widen with depth (widths 32 <= b <= c, multiples
    of 8), within 1 %."""
    config = recorded_config(name)
    ours = parameters("ours", config)
    widths = [[32, b, c] for b in range(32, 129, 8) for c in range(b, 129, 8)]
    closest = min(widths, key=lambda w: abs(
        parameters("diffusers", dataclasses.replace(config, peer_widths=w)) - ours))
    assert config.peer_widths == closest
    assert abs(parameters("diffusers", config) - ours) / ours < 0.01


def test_adagn_at_the_shipped_widths_raced_the_shipped_networks_peer():
    """AdaGN 32/64/64 (551,137 parameters) raced the shipped network's peer run, 7 % smaller
    (README)."""
    config, shipped = (recorded_config(name) for name in ("time_to_quality_adagn.json",
                                                           "time_to_quality.json"))
    assert config.peer_widths == shipped.peer_widths
    ours, theirs = parameters("ours", config), parameters("diffusers", config)
    assert ours == 551_137 and round(100 * (ours - theirs) / ours) == 7


@pytest.mark.parametrize("name", ["time_to_quality.json", *CANDIDATES])
def test_the_comparisons_report_what_their_evaluations_say(name):
    """The recorded minutes and ratios follow from the recorded FIDs and timings (no number
    typed in), at every level and at the shipped model's FID: for the shipped network and for
    the candidate networks, each of which also has its own last FIDs (as trained and debiased)
    as levels, the targets it would set if it were shipped."""
    table = json.loads((DATA_DIR / "results" / name).read_text())
    shipped = json.loads((DATA_DIR / "checkpoints" / "ddpm_fashion_fid.json").read_text())
    assert table["target_fid"] == shipped["rows"][ttq.SHIPPED_ROW]["fid"]
    model = table["config"]["recipe"]["model"]
    assert {key: model[key] for key in CANDIDATES.get(name, {})} == CANDIDATES.get(name, {})
    levels = [("fid", "levels"), ("fid_debiased", "levels_debiased")]
    levels = [(key, level) for key, level in levels if key in table or name not in CANDIDATES]
    if name in CANDIDATES:
        for key, _ in levels:
            ours = table[key]["ours"]
            assert ours[max(ours, key=int)] in table["config"]["levels"]
    for key, level in levels:
        assert [row["fid"] for row in table[level] if row["shipped"]] == [table["target_fid"]]
    seconds = table["seconds_per_step"]
    assert table["speedup_per_step"] == pytest.approx(seconds["diffusers"] / seconds["ours"],
                                                      abs=2e-3)
    rows = [(row, key) for key, level in levels for row in table[level]]
    for row, key in rows:
        for net in ttq.NETS:
            first, crossing = ttq.steps_to(table[key][net], row["fid"])
            assert row[net]["first_step"] == first
            if crossing is not None:
                assert row[net]["minutes"] == pytest.approx(crossing * seconds[net] / 60,
                                                            abs=0.06)
        if row["speedup"] is not None:
            assert row["speedup"] == pytest.approx(
                row["diffusers"]["minutes"] / row["ours"]["minutes"], abs=2e-3)


@pytest.mark.parametrize("name", CANDIDATES)
def test_make_reproduces_each_candidate_table(name):
    """`make time-to-quality-candidates` reports each table with the config it records."""
    from course_lib.experiments.config import to_dict
    from course_lib.runtime import REPO_ROOT

    lines = (REPO_ROOT / "Makefile").read_text().splitlines()
    report = [line for line in lines if "$(TTQ) report" in line and name in line]
    assert len(report) == 1, name
    config, args = ttq.parse_args(shlex.split(report[0].split("$(TTQ)", 1)[1]))
    assert to_dict(config) == to_dict(recorded_config(name)) and args.out.endswith(name)


def test_the_candidate_ddpm_was_trained_with_the_raced_recipe():
    """`ddpm train` on AdaGN 32/64/96 (data/checkpoints/candidates/ddpm_fashion.pt) ran the
    recipe that time_to_quality_adagn_123.json raced, all its steps; the file matches its hash."""
    from course_lib.checkpoint import read_manifest
    from course_lib.experiments.config import from_dict
    from course_lib.experiments.ddpm import load_ddpm
    from course_lib.runtime import CHECKPOINT_DIR

    folder = CHECKPOINT_DIR / "candidates"
    entry = read_manifest(folder)["ddpm_fashion.pt"]
    raced = recorded_config("time_to_quality_adagn_123.json").recipe
    assert from_dict(DDPMRecipe, entry["config"]) == raced and entry["step"] == raced.steps
    model, _ = load_ddpm(folder / "ddpm_fashion.pt")
    assert sum(p.numel() for p in model.parameters()) == parameters("ours", recorded_config(
        "time_to_quality_adagn_123.json"))
