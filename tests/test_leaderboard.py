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
    board = leaderboard(n=200, small=50, table=table)
    ddpm = [row for row in board if row["model"].startswith("DDPM")]
    assert len(ddpm) == 1 and ddpm[0]["fid"] == 1.5 and ddpm[0]["fid_50"] == 2.5
    assert board[-1]["model"].startswith("floor")
    assert board[-1]["fid_50"] > board[-1]["fid"]  # the floor at fewer samples is higher
    fids = [row["fid_50"] for row in board[:-1]]
    assert fids == sorted(fids) and len(board) == 6
    with pytest.raises(KeyError, match="ddim_50@100"):
        leaderboard(n=100, small=50, table=table)
    with pytest.raises(ValueError, match="small <= n"):
        leaderboard(n=50, small=200, table=table)


def test_the_shipped_board_is_what_the_command_computes():
    """The notebooks show data/results/leaderboard.json; recomputed here (about 40 s)."""
    from course_lib.experiments.leaderboard import read_leaderboard

    shipped, now = read_leaderboard(), leaderboard()
    assert [row["model"] for row in shipped] == [row["model"] for row in now]
    for old, new in zip(shipped, now):
        for key in ("fid", "fid_1000"):
            assert abs(old[key] - new[key]) < 1e-3, (old["model"], key)
