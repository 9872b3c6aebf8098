"""One answer to "what is this path?": each kind of source resolved to its type, the
precedence inside a run folder, the stage a run records and reads back, and one line for
a path that is none of them. Run folders and checkpoints are written here in the layout
the stages write (the last test checks that layout against real runs)."""

from __future__ import annotations

import dataclasses
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

from mae.config import ConfigError, load_config, save_config
from mae.encoder import create_vit
from mae.finetune import FinetuneConfig
from mae.linprobe import LinprobeConfig
from mae.models import create_model
from mae.models.mae_vit import encoder_only
from mae.pretrain import PretrainConfig, save_encoder
from mae.sources import ENCODER_FILE, SourceError, load_source, resolve_source
from pipelines.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]
PT = PretrainConfig(model_overrides={"depth": 2})


def autoencoder(seed: int):
    torch.manual_seed(seed)
    return create_model(PT.model, depth=2).eval()


def write_checkpoint(folder: Path, weights: dict[str, torch.Tensor], config: dict, stage: str | None) -> Path:
    """A checkpoint as ``Trainer._save`` writes one (weights and the state the resolver reads)."""
    folder.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in weights.items()}, str(folder / "model.safetensors"))
    state = {"step": 10, "epoch": 1, "step_in_epoch": 0, "config": config}
    torch.save(state if stage is None else dict(state, stage=stage), folder / "state.pt")
    return folder


@pytest.fixture
def pretraining_run(tmp_path) -> Path:
    """A finished pretraining run whose exported encoder (seed 0) differs from its latest
    checkpoint (seed 1), as after a run was extended: which one a path means is visible."""
    run = tmp_path / "pt"
    run.mkdir()
    save_config(PT, run / "config.yaml")
    save_encoder(autoencoder(0), run / ENCODER_FILE)
    config = dataclasses.asdict(PT)
    write_checkpoint(run / "checkpoints" / "ckpt-00000005", autoencoder(2).state_dict(), config, "pretrain")
    write_checkpoint(run / "checkpoints" / "ckpt-00000010", autoencoder(1).state_dict(), config, "pretrain")
    return run


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_run_folder_means_its_latest_checkpoint_for_every_tool(pretraining_run):
    latest = autoencoder(1).encoder_state_dict()
    src = resolve_source(pretraining_run)
    assert (src.kind, src.stage) == ("run", "pretrain")
    assert src.weights_file == pretraining_run / "checkpoints" / "ckpt-00000010" / "model.safetensors"
    assert src.mae is not None and src.mae.depth == 2  # the checkpoint has the decoder
    assert same_weights(src.encoder_state_dict(), latest)
    # the probe / fine-tune door and the analysis door give the same weights
    vit = create_vit("auto", str(pretraining_run), num_classes=0)
    assert same_weights({k: v for k, v in vit.state_dict().items() if k in latest}, latest)
    tool = load_source(str(pretraining_run))
    assert tool.mae is not None and same_weights({k: tool.encoder.state_dict()[k] for k in latest}, latest)


def test_run_folder_without_checkpoints_means_its_export(pretraining_run):
    for ckpt in (pretraining_run / "checkpoints").iterdir():
        for f in ckpt.iterdir():
            f.unlink()
        ckpt.rmdir()
    src = resolve_source(pretraining_run)
    assert (src.kind, src.stage, src.weights_file.name, src.mae) == ("run", "pretrain", ENCODER_FILE, None)
    assert same_weights(src.encoder_state_dict(), load_file(str(pretraining_run / ENCODER_FILE)))
    (pretraining_run / ENCODER_FILE).unlink()
    with pytest.raises(SourceError, match="a pretraining run with no checkpoint and no encoder.safetensors yet"):
        resolve_source(pretraining_run)


def test_each_kind_resolves_to_its_type(pretraining_run, tmp_path):
    ckpt = pretraining_run / "checkpoints" / "ckpt-00000010"
    mae = autoencoder(1)
    released = tmp_path / "mae_pretrain.pth"
    torch.save({"model": mae.state_dict()}, released)
    released_encoder = tmp_path / "mae_pretrain_encoder.pth"
    torch.save({"model": encoder_only(mae.state_dict())}, released_encoder)
    ft = tmp_path / "ft"
    ft.mkdir()
    save_config(FinetuneConfig(pretrained=str(pretraining_run)), ft / "config.yaml")
    vit = create_vit("auto", str(pretraining_run), num_classes=10)
    save_file(vit.state_dict(), str(ft / "model.safetensors"))
    tiny = ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4, "depth": 2})
    expected = {  # source, weights -> kind, stage, timm name, has the MAE config (a decoder)
        (str(ckpt), None): ("checkpoint", "pretrain", tiny, True),
        (str(ckpt / "model.safetensors"), None): ("checkpoint", "pretrain", tiny, True),
        (str(pretraining_run / ENCODER_FILE), None): ("encoder", None, tiny, False),
        (str(released), None): ("released", None, tiny, True),
        (str(released_encoder), None): ("released", None, tiny, False),
        ("vit_small_patch16_224", str(pretraining_run / ENCODER_FILE)): ("timm", None, ("vit_small_patch16_224", {}), False),
        (str(ft), None): ("run", "finetune", tiny, False),
    }  # fmt: skip
    for (source, weights), (kind, stage, (name, kwargs), decoder) in expected.items():
        src = resolve_source(source, weights)
        assert (src.kind, src.stage, src.timm.name, src.mae is not None) == (kind, stage, name, decoder), source
        assert kwargs.items() <= src.timm.kwargs.items(), source
        assert "patch_embed.proj.weight" in src.encoder_state_dict(), source
    assert resolve_source(released).mae.norm_pix_loss is False  # the official release predicts raw pixels
    assert same_weights(resolve_source(ft).state_dict(), vit.state_dict())


def test_stage_is_recorded_in_config_yaml_and_read_back(tmp_path):
    for cls in (PretrainConfig, LinprobeConfig, FinetuneConfig):
        path = tmp_path / f"{cls.stage}.yaml"
        save_config(cls(), path)
        assert next(iter(yaml.safe_load(path.read_text()).items())) == ("stage", cls.stage)  # the first key
        assert load_config(cls, path) == cls()  # a run's config.yaml is a config file of its stage
    with pytest.raises(ConfigError, match="is a pretrain run's config, not finetune's") as err:
        load_config(FinetuneConfig, tmp_path / "pretrain.yaml")
    assert "\n" not in str(err.value)


def test_stage_names_are_the_stage_table_names():
    for name, entry in STAGES.items():
        if entry.training:
            assert entry.config_class().stage == name


def test_runs_written_before_the_stage_was_recorded_are_still_read(pretraining_run):
    config = yaml.safe_load((pretraining_run / "config.yaml").read_text())
    del config["stage"]
    (pretraining_run / "config.yaml").write_text(yaml.safe_dump(config))
    ckpt = pretraining_run / "checkpoints" / "ckpt-00000010"
    state = torch.load(ckpt / "state.pt", weights_only=True)
    del state["stage"]
    torch.save(state, ckpt / "state.pt")
    assert resolve_source(pretraining_run).stage == "pretrain"
    assert resolve_source(ckpt).stage == "pretrain"


def test_path_that_is_no_source_gets_one_line(tmp_path):
    notes = tmp_path / "notes.pth"
    notes.write_text("not a checkpoint")
    tensor = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), tensor)
    probe = tmp_path / "lp"
    probe.mkdir()
    save_config(LinprobeConfig(pretrained="runs/pt"), probe / "config.yaml")
    (tmp_path / "empty").mkdir()
    cases = {
        str(tmp_path / "missing"): "missing: no such file or folder, and not a timm model name",
        str(tmp_path / "empty"): "empty: a folder with neither config.yaml (a run) nor state.pt (a checkpoint)",
        str(notes): "notes.pth: not a weights file torch or safetensors can read",
        str(tensor): "tensor.pt: holds a Tensor, not a state dict",
        str(probe): "a linear-probe run trains a head on a frozen encoder; give that encoder (its pretrained=runs/pt)",
        "vit_tiny_patch16_224": "is a timm model name: give its weights with --weights FILE",
    }
    for source, message in cases.items():
        with pytest.raises(SourceError) as err:
            resolve_source(source)
        assert message in str(err.value) and "\n" not in str(err.value), source
    with pytest.raises(ConfigError, match=r"^pretrained: .*missing: no such file or folder") as err:
        create_vit("auto", str(tmp_path / "missing"), num_classes=10)  # the stages' door says it as a config error
    assert "\n" not in str(err.value)


@pytest.mark.slow
def test_real_runs_record_their_stage_and_resolve_by_it(tmp_path):
    """The stages write ``stage`` into config.yaml and every checkpoint; the resolver reads
    it back, and a fine-tuning run knows its timm model from the run it started from."""
    common = ["data.train=shards/cifar10/test-000000.tar", "data.val=", "batch_size=32", "max_steps=2",
              "data.num_workers=1", "progress=false"]  # fmt: skip
    for name, extra in (("pretrain", ["model_overrides.depth=1"]), ("finetune", [f"pretrained={tmp_path / 'pretrain'}"])):
        proc = subprocess.run([sys.executable, "-m", f"pipelines.{name}", f"output_dir={tmp_path / name}", *common, *extra],
                              cwd=ROOT, capture_output=True, text=True, timeout=600)  # fmt: skip
        assert proc.returncode == 0, proc.stderr[-3000:]
        run = tmp_path / name
        assert yaml.safe_load((run / "config.yaml").read_text())["stage"] == name
        ckpt = sorted((run / "checkpoints").iterdir())[-1]
        assert torch.load(ckpt / "state.pt", weights_only=True)["stage"] == name
        src = resolve_source(run)
        assert (src.kind, src.stage, src.weights_file.parent) == ("run", name, ckpt)
        assert src.timm.name == "vit_tiny_patch16_224" and src.timm.kwargs["depth"] == 1
        assert load_config(STAGES[name].config_class(), run / "config.yaml").output_dir == str(run)
