import json

import pytest
import torch

from course_lib.experiments.leaderboard import fast_samples, leaderboard


def test_fast_samples_are_images_in_0_1_and_seeded():
    samples = fast_samples(50, seed=0)
    assert set(samples) == {"autoencoder, 2-D latent box", "autoencoder, 16-D latent box",
                            "VAE, prior N(0, I)", "DCGAN"}
    for images in samples.values():
        assert images.shape == (50, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(fast_samples(50, seed=0)["DCGAN"], samples["DCGAN"])


def test_leaderboard_sorts_and_takes_the_ddpm_row_at_both_counts(tmp_path):
    table = tmp_path / "fid.json"
    row = {"sampler": "DDIM", "steps": 50, "command": "python -m course_lib.experiments.ddpm fid"}
    rows = {"ddim_50@200": {**row, "samples": 200, "fid": 1.5},
            "ddim_50@50": {**row, "samples": 50, "fid": 2.5},
            "ddim_10@200": {**row, "steps": 10, "samples": 200, "fid": 0.1}}
    table.write_text(json.dumps({"rows": rows}))
    board = leaderboard(n=200, small=50, table=table, nfe_table=None, latent_table=None)
    ddpm = [row for row in board if row["model"].startswith("DDPM")]
    assert len(ddpm) == 1 and ddpm[0]["fid"] == 1.5 and ddpm[0]["fid_50"] == 2.5
    assert board[-1]["model"].startswith("floor")
    assert board[-1]["fid_50"] > board[-1]["fid"]  # the floor at fewer samples is higher
    fids = [row["fid_50"] for row in board[:-1]]
    assert fids == sorted(fids) and len(board) == 6
    with pytest.raises(KeyError, match="ddim_50@100"):
        leaderboard(n=100, small=50, table=table, nfe_table=None, latent_table=None)
    with pytest.raises(ValueError, match="small <= n"):
        leaderboard(n=50, small=200, table=table)


def test_the_flow_rows_come_from_their_tables_at_the_small_count(tmp_path):
    from course_lib.experiments.leaderboard import flow_rows

    nfe, latent = tmp_path / "nfe.json", tmp_path / "latent.json"
    nfe.write_text(json.dumps({"rows": {"flow_fashion_euler_50@50": {"fid": 3.0, "command": "a"},
                                        "flow_fashion_euler_10@50": {"fid": 9.0, "command": "b"}}}))
    latent.write_text(json.dumps({"command": "c", "samples": 50, "rows": [
        {"model": "latent_flow.pt", "steps": 10, "fid": 8.0},
        {"model": "latent_flow_unscaled.pt", "steps": 50, "fid": 7.0},
        {"model": "latent_flow.pt", "steps": 50, "fid": 6.0}]}))
    rows = flow_rows(50, nfe, latent)
    assert [(r["fid_50"], r["fid"], r["source"]) for r in rows] == [(3.0, None, "a"),
                                                                     (6.0, None, "c")]
    with pytest.raises(KeyError, match="flow_fashion_euler_50@1000"):
        flow_rows(1000, nfe, None)
    with pytest.raises(KeyError, match="1000 samples"):
        flow_rows(1000, None, latent)


def test_the_shipped_board_is_what_the_command_computes():
    """The notebooks show data/results/leaderboard.json; recomputed here (about 40 s)."""
    from course_lib.experiments.leaderboard import read_leaderboard

    shipped, now = read_leaderboard(), leaderboard()
    assert [row["model"] for row in shipped] == [row["model"] for row in now]
    for old, new in zip(shipped, now):
        for key in ("fid", "fid_1000"):
            assert old[key] == new[key] or abs(old[key] - new[key]) < 1e-3, (old["model"], key)
