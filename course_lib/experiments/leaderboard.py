"""The course leaderboard (notebooks 06 and 08): FID of every shipped generator against the
10,000 Fashion-MNIST test images, with the course classifier's features, beside the
train-vs-test floor at the same sample count. The course's FID policy: 1,000 samples
(:data:`COURSE_SAMPLES`) with the floor at 1,000; the FID of 10,000 samples is an extra column
(FID depends on the sample count: compare only at equal counts).

The autoencoders, the VAE and the DCGAN decode 10,000 samples in seconds, so :func:`leaderboard`
computes their FIDs (about half a minute on a 2-core CPU, most of it the classifier). The DDPM
needs minutes to an hour per row; its rows come from the table
``python -m course_lib.experiments.ddpm fid`` wrote (``data/checkpoints/ddpm_fashion_fid.json``).
The flow-matching models of notebooks 10 and 11 (Euler, 50 steps) come from their tables, at
1,000 samples only (``fid`` at 10,000 is None: not measured).
``python -m course_lib.experiments.leaderboard`` writes the board to
``data/results/leaderboard.json``, which the notebooks show; ``tests/test_leaderboard.py``
recomputes it.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from course_lib.autoencoder import sample_latent_box
from course_lib.checkpoint import update_json
from course_lib.data import load_fashion_mnist
from course_lib.experiments.autoencoder import CHECKPOINT as AE
from course_lib.experiments.autoencoder import load_autoencoder
from course_lib.experiments.dcgan import load_generator
from course_lib.experiments.ddpm import FID_TABLE
from course_lib.experiments.flow import NFE_TABLE
from course_lib.experiments.latent import TABLE as LATENT_TABLE
from course_lib.experiments.vae import load_vae
from course_lib.metrics import ClassifierFeatures, fid_floor, fid_from_features
from course_lib.runtime import DATA_DIR

BOARD = DATA_DIR / "results" / "leaderboard.json"
COURSE_SAMPLES = 1_000  # the course's FID policy: 1,000 samples against the 10,000 test images
DDPM_ROW = "ddim_50"  # the DDPM row of ddpm_fashion_fid.json: DDIM, 50 steps, clipped x0
FLOW_STEPS = 50  # the flow models' rows: Euler with 50 steps (notebooks 10 and 11)
COMMAND = "python -m course_lib.experiments.leaderboard"


@torch.inference_mode()
def fast_samples(n: int = 10_000, seed: int = 0) -> dict[str, torch.Tensor]:
    """n images in [0, 1] from each quickly sampled checkpoint, one seed each: the 2-D and 16-D
    autoencoders (uniform in the box of the test encodings, notebook 03), the VAE (prior
    N(0, I), notebook 04) and the DCGAN (notebook 02)."""
    x_test, _ = load_fashion_mnist("test", size=32)
    samples = {}
    for name, path in (("autoencoder, 2-D latent box", AE),
                       ("autoencoder, 16-D latent box", AE.with_name("autoencoder_16.pt"))):
        ae = load_autoencoder(path)
        z = sample_latent_box(ae.encode(x_test), n, torch.Generator().manual_seed(seed))
        samples[name] = ae.decode(z)
    samples["VAE, prior N(0, I)"] = load_vae("fashion").sample(n, torch.Generator()
                                                                .manual_seed(seed))
    generator = load_generator()
    z = torch.randn(n, generator.latent_dim, generator=torch.Generator().manual_seed(seed))
    samples["DCGAN"] = (torch.cat([generator(chunk) for chunk in z.split(1000)]) + 1) / 2
    return samples


def flow_rows(small: int, nfe_table: str | Path | None, latent_table: str | Path | None
              ) -> list[dict]:
    """The flow-matching rows at ``small`` samples: the pixel-space model's Euler row of the NFE
    table (notebook 10) and the scaled latent model's of the latent table (notebook 11), each at
    :data:`FLOW_STEPS` steps; ``fid`` (at 10,000 samples) is None, not measured."""
    rows = []
    if nfe_table is not None:
        key = f"flow_fashion_euler_{FLOW_STEPS}@{small}"
        found = json.loads(Path(nfe_table).read_text())["rows"].get(key)
        if found is None:
            raise KeyError(f"{nfe_table} has no row {key}: run `python -m "
                           f"course_lib.experiments.flow nfe` for it")
        rows.append({"model": f"flow matching, Euler {FLOW_STEPS} steps", "samples": small,
                     "source": found["command"], "fid": None, f"fid_{small}": found["fid"]})
    if latent_table is not None:
        table = json.loads(Path(latent_table).read_text())
        found = [row for row in table["rows"] if row["model"] == "latent_flow.pt" and
                 row["steps"] == FLOW_STEPS and table["samples"] == small]
        if not found:
            raise KeyError(f"{latent_table} has no latent_flow.pt row at {FLOW_STEPS} steps and "
                           f"{small} samples: run `python -m course_lib.experiments.latent "
                           f"evaluate`")
        rows.append({"model": f"latent flow matching, Euler {FLOW_STEPS} steps",
                     "samples": small, "source": table["command"], "fid": None,
                     f"fid_{small}": found[0]["fid"]})
    return rows


def leaderboard(n: int = 10_000, small: int = COURSE_SAMPLES, seed: int = 0,
                table: str | Path = FID_TABLE, nfe_table: str | Path | None = NFE_TABLE,
                latent_table: str | Path | None = LATENT_TABLE) -> list[dict]:
    """Rows {model, samples, fid, fid_<small>, source}, best first by ``fid_<small>``, ending
    with the floor (training images against the test set, :func:`~course_lib.metrics.fid_floor`).
    ``fid`` is the FID of ``n`` samples, ``fid_<small>`` that of the first ``small`` of them: the
    course reports the second (its FID policy) and shows the first as an extra column. The DDPM
    row is :data:`DDPM_ROW` of ``table`` at both counts; the flow rows (:func:`flow_rows`, from
    ``nfe_table`` and ``latent_table``; None leaves them out) have ``small`` only."""
    if not 2 <= small <= n:
        raise ValueError(f"need 2 <= small <= n, got small={small}, n={n}")
    features = ClassifierFeatures()
    x_test, _ = load_fashion_mnist("test")
    x_train, _ = load_fashion_mnist("train")
    test_features = features(x_test)
    key = f"fid_{small}"
    rows = []
    for name, images in fast_samples(n, seed).items():
        sample_features = features(images)
        rows.append({"model": name, "samples": n, "source": "computed now",
                     "fid": fid_from_features(sample_features, test_features),
                     key: fid_from_features(sample_features[:small], test_features)})
    ddpm = json.loads(Path(table).read_text())["rows"]
    missing = [f"{DDPM_ROW}@{count}" for count in (n, small) if f"{DDPM_ROW}@{count}" not in ddpm]
    if missing:
        raise KeyError(f"{table} has no row {', '.join(missing)}: run `python -m "
                       f"course_lib.experiments.ddpm fid` for it")
    large, few = ddpm[f"{DDPM_ROW}@{n}"], ddpm[f"{DDPM_ROW}@{small}"]
    rows.append({"model": f"DDPM, {large['sampler']} {large['steps']} steps", "samples": n,
                 "source": large["command"], "fid": large["fid"], key: few["fid"]})
    rows += flow_rows(small, nfe_table, latent_table)
    floor = {"model": "floor: real training images", "samples": n, "source": "computed now",
             "fid": fid_floor(features, x_train, test_features, n, seed),
             key: fid_floor(features, x_train, test_features, small, seed)}
    return sorted(rows, key=lambda row: row[key]) + [floor]


def read_leaderboard(path: str | Path = BOARD) -> list[dict]:
    """The shipped board: the rows :func:`leaderboard` returned when ``COMMAND`` wrote it."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing; `{COMMAND}` computes it (about a minute)")
    return json.loads(path.read_text())["rows"]


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="compute the course leaderboard")
    parser.add_argument("--out", default=str(BOARD))
    args = parser.parse_args(argv)
    rows = leaderboard()
    out = Path(args.out)
    update_json(out, lambda board: board.update({"command": COMMAND, "rows": rows}))
    for row in rows:
        large = f"{row['fid']:7.3f} at {row['samples']:,}" if row["fid"] is not None else \
            "not measured at 10,000"
        print(f"{row['model']:<38} FID {row[f'fid_{COURSE_SAMPLES}']:7.3f} at "
              f"{COURSE_SAMPLES:,} samples, {large}")
    print(f"written to {out}")


if __name__ == "__main__":
    main()
