import json

import torch

from course_lib.experiments.leaderboard import fast_samples, leaderboard


def test_fast_samples_are_images_in_0_1_and_seeded():
    samples = fast_samples(50, seed=0)
    assert set(samples) == {"autoencoder, 2-D latent box", "autoencoder, 16-D latent box",
                            "VAE, prior N(0, I)", "DCGAN"}
    for images in samples.values():
        assert images.shape == (50, 1, 32, 32) and 0 <= images.min() and images.max() <= 1
    torch.testing.assert_close(fast_samples(50, seed=0)["DCGAN"], samples["DCGAN"])


def test_leaderboard_sorts_and_takes_ddpm_rows_of_the_same_count(tmp_path):
    table = tmp_path / "fid.json"
    rows = {"ddim_10@200": {"sampler": "DDIM", "steps": 10, "samples": 200, "fid": 1.5,
                            "command": "python -m course_lib.experiments.ddpm fid"},
            "ddim_10@9": {"sampler": "DDIM", "steps": 10, "samples": 9, "fid": 0.1,
                          "command": "python -m course_lib.experiments.ddpm fid"}}
    table.write_text(json.dumps({"rows": rows}))
    board = leaderboard(n=200, table=table)
    assert [row["model"] for row in board].count("DDPM, DDIM 10 steps") == 1
    assert board[-1]["model"].startswith("floor")
    fids = [row["fid"] for row in board[:-1]]
    assert fids == sorted(fids) and len(board) == 6


def test_the_shipped_board_is_what_the_command_computes():
    """The notebooks show data/results/leaderboard.json; recomputed here (about 40 s)."""
    from course_lib.experiments.leaderboard import read_leaderboard

    shipped, now = read_leaderboard(), leaderboard()
    assert [row["model"] for row in shipped] == [row["model"] for row in now]
    for old, new in zip(shipped, now):
        assert abs(old["fid"] - new["fid"]) < 1e-3, old["model"]
