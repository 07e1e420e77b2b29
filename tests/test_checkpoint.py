import json

import pytest
import torch
from torch import nn

from course_lib.checkpoint import (CheckpointError, load_checkpoint, load_state, read_manifest,
                                   record_metrics, save_checkpoint, sha256_of)


def net():
    return nn.Sequential(nn.Linear(3, 4), nn.ReLU(), nn.Linear(4, 2))


def test_round_trip_and_manifest(tmp_path):
    model = net()
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, {"model": model.state_dict()}, arch="mlp", config={"h": 4},
                             step=7, metrics={"loss": 0.5}, device="cpu", train_seconds=1.5)
    entry = read_manifest(tmp_path)["m.pt"]
    assert entry["sha256"] == digest == sha256_of(path)
    assert entry["size_bytes"] == path.stat().st_size
    expected = {"arch": "mlp", "config": {"h": 4}, "step": 7, "metrics": {"loss": 0.5},
                "device": "cpu", "train_seconds": 1.5}
    assert {k: entry[k] for k in expected} == expected
    payload = load_checkpoint(path, arch="mlp")
    assert (payload["step"], payload["config"], payload["metrics"]) == (7, {"h": 4}, {"loss": 0.5})
    other = net()
    load_state(other, payload["state"]["model"])
    for a, b in zip(model.parameters(), other.parameters()):
        assert torch.equal(a, b)
    assert not list(tmp_path.glob("*.tmp"))  # atomic write leaves no temporary file


def test_tampered_file_is_refused(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"model": net().state_dict()}, arch="mlp", config={})
    data = bytearray(path.read_bytes())
    data[-20] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="corrupt or was modified"):
        load_checkpoint(path)


def test_unlisted_and_missing_files_are_refused(tmp_path):
    path = tmp_path / "m.pt"
    torch.save({"model": net().state_dict()}, path)
    with pytest.raises(CheckpointError, match="not listed"):
        load_checkpoint(path)
    with pytest.raises(CheckpointError, match="does not exist"):
        load_checkpoint(tmp_path / "absent.pt")


def test_pickled_code_is_never_run(tmp_path):
    """A file that is listed in the manifest but holds a pickled object is refused by
    weights_only=True instead of being executed."""
    path = tmp_path / "evil.pt"
    torch.save({"format": "course_lib/1", "payload": Exploit()}, path)
    manifest = {"evil.pt": {"sha256": sha256_of(path)}}
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(path)


class Exploit:
    def __reduce__(self):
        return (print, ("this must never run",))


def test_wrong_architecture_is_named(tmp_path):
    path = tmp_path / "m.pt"
    save_checkpoint(path, {"model": net().state_dict()}, arch="mlp", config={})
    with pytest.raises(CheckpointError, match="holds a 'mlp' model, but a 'dcgan' was expected"):
        load_checkpoint(path, arch="dcgan")
    wider = nn.Sequential(nn.Linear(3, 8), nn.ReLU(), nn.Linear(8, 2))
    with pytest.raises(CheckpointError, match="does not fit this Sequential"):
        load_state(wider, load_checkpoint(path)["state"]["model"])


def test_recorded_metrics_join_the_manifest_and_leave_the_file_alone(tmp_path):
    path = tmp_path / "m.pt"
    digest = save_checkpoint(path, {"model": net().state_dict()}, arch="mlp", config={},
                             metrics={"loss": 0.5})
    record_metrics(path, {"fid": 3.25})
    entry = read_manifest(tmp_path)["m.pt"]
    assert entry["metrics"] == {"loss": 0.5, "fid": 3.25} and entry["sha256"] == digest
    load_checkpoint(path, arch="mlp")
    with pytest.raises(CheckpointError, match="not listed"):
        record_metrics(tmp_path / "other.pt", {"fid": 1.0})


@pytest.mark.parametrize("manifest, why", [
    ('{"m.pt": {"sha256": "ab', "not valid JSON"),
    ('[{"sha256": "ab"}]', "holds a JSON list"),
    ('{"m.pt": {"size_bytes": 3}}', "entry 'm.pt' has no valid \"sha256\""),
    ('{"m.pt": {"sha256": "' + "0" * 64 + '", "replaces": {"step": 1}}}',
     "entry 'm.pt' has no valid"),
])
def test_a_malformed_manifest_is_a_clear_error_before_anything_is_written(tmp_path, manifest,
                                                                          why):
    path = tmp_path / "m.pt"
    torch.save({"model": net().state_dict()}, path)
    (tmp_path / "manifest.json").write_text(manifest)
    before = {p.name: p.read_bytes() for p in tmp_path.iterdir()}
    with pytest.raises(CheckpointError, match=f"manifest .* is malformed: .*{why}"):
        load_checkpoint(path)
    for target in (path, tmp_path / "other.pt"):
        with pytest.raises(CheckpointError, match="is malformed"):
            save_checkpoint(target, {"model": net().state_dict()}, arch="mlp", config={})
    with pytest.raises(CheckpointError, match="is malformed"):
        record_metrics(path, {"fid": 1.0})
    after = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.name != ".manifest.lock"}
    assert after == before  # nothing written, nothing left behind


# --- the shipped checkpoints ---------------------------------------------------------------------

def _loaders():
    """Each shipped checkpoint and the course_lib loader its notebook calls."""
    from course_lib import classifier, face_attributes
    from course_lib.experiments import (autoencoder, dcgan, ddpm, flow, latent, layout,
                                        text2image, vae)

    loaders = {"fashion_classifier.pt": classifier.load_classifier,
               "face_attributes.pt": face_attributes.load_face_detector,
               "autoencoder.pt": autoencoder.load_autoencoder,
               "autoencoder_16.pt": autoencoder.load_autoencoder,
               "autoencoder_vae_recipe.pt": autoencoder.load_autoencoder,
               "vae_fashion.pt": lambda path: vae.load_vae("fashion", path),
               "vae_faces.pt": lambda path: vae.load_vae("faces", path),
               "dcgan_fashion.pt": dcgan.load_generator,
               "ddpm_fashion.pt": lambda path: ddpm.load_ddpm(path)[0],
               "flow_fashion.pt": flow.load_flow,
               "flow_fashion_reflow.pt": flow.load_flow,
               "latent_autoencoder.pt": lambda path: latent.load_autoencoder(path)[0],
               "latent_flow.pt": lambda path: latent.load_latent_flow(path).velocity,
               "latent_flow_unscaled.pt": lambda path: latent.load_latent_flow(path).velocity,
               "t2i_shapes_role_head.pt": lambda path: layout.load_role_head(path)[0]}
    for key in text2image.STAGES:
        loaders[text2image.checkpoint_path(*key).name] = (
            lambda path: text2image.load_text2image(path)[0])
    return loaders


def test_every_shipped_checkpoint_is_in_the_manifest_and_loads():
    """The notebooks load their checkpoints through these loaders, with the default paths."""
    from course_lib.runtime import CHECKPOINT_DIR

    manifest, loaders = read_manifest(CHECKPOINT_DIR), _loaders()
    shipped = {path.name for path in CHECKPOINT_DIR.glob("*.pt")}
    assert shipped == set(manifest) == set(loaders)
    for name, entry in manifest.items():
        assert {"sha256", "size_bytes", "train_seconds", "device", "command"} <= set(entry)
        assert entry["command"].startswith("python -m course_lib.experiments.") and \
            entry["metrics"], name
        model = loaders[name](CHECKPOINT_DIR / name)
        assert isinstance(model, nn.Module) and not model.training, name
    # a clone stays small: the whole working tree (checkpoints, notebooks, code) under 64 MiB
    assert sum(entry["size_bytes"] for entry in manifest.values()) < 52 * 2**20


def test_make_checkpoints_runs_every_recorded_command():
    """`make checkpoints` retrains everything with the commands the manifest records."""
    from course_lib.runtime import CHECKPOINT_DIR, REPO_ROOT

    makefile = (REPO_ROOT / "Makefile").read_text()
    recipe = makefile.split("\ncheckpoints:", 1)[1].split("\n\n", 1)[0]
    commands = {line.strip().replace("$(PY)", "python") for line in recipe.splitlines()[1:]}
    for name, entry in read_manifest(CHECKPOINT_DIR).items():
        assert entry["command"] in commands, name
    results = REPO_ROOT / "data" / "results"
    for table in (CHECKPOINT_DIR / "t2i_eval.json", results / "normalization_batch_size.json",
                  results / "leaderboard.json", results / "vae_faces.json",
                  results / "mode_collapse.json", results / "t2i_guidance_diversity.json",
                  results / "t2i_sr_effect.json", results / "t2i_layout_guidance.json",
                  results / "t2i_sampler_grid.json"):
        assert json.loads(table.read_text())["command"] in commands, table
    stages = json.loads((results / "t2i_shapes_stages.json").read_text())["shipped"]
    assert stages["command"] in commands


@pytest.mark.parametrize("name, change, message", [
    ("ddpm_fashion.pt", {"num_steps": 1e12}, "num_steps must be an integer"),
    ("ddpm_fashion.pt", {"base": 4096}, "base must be an integer in 1..512"),
    ("t2i_fashion_base_minilm.pt", {"base": 4096}, "base must be an integer in 1..512"),
])
def test_a_stored_config_is_checked_before_the_loader_builds_anything(tmp_path, monkeypatch,
                                                                      name, change, message):
    """A copy of a shipped checkpoint re-saved with an edited config: the loader stops with a
    clear error before it builds a network (or the text encoder)."""
    from course_lib.experiments import ddpm, text2image
    from course_lib.runtime import CHECKPOINT_DIR

    payload = load_checkpoint(CHECKPOINT_DIR / name)
    config = payload["config"] | {"model": payload["config"]["model"] | change}
    copy = tmp_path / name
    save_checkpoint(copy, payload["state"], arch=payload["arch"], config=config)

    def no_modules(*args, **kwargs):
        raise AssertionError("a module was built before the config was checked")

    monkeypatch.setattr(nn.Module, "__init__", no_modules)
    loader = ddpm.load_ddpm if name.startswith("ddpm") else text2image.load_text2image
    with pytest.raises(ValueError, match=message):
        loader(copy)
