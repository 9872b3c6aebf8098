"""Stage configs: defaults, YAML, key=value in that order; bad keys and values named before any work."""

from __future__ import annotations

import dataclasses
import importlib
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mae.config import ConfigError, load_config, parse_overrides
from mae.finetune import FinetuneConfig
from mae.linprobe import LinprobeConfig
from mae.pretrain import PretrainConfig
from pipelines.stages import STAGES

ROOT = Path(__file__).resolve().parents[1]


def test_defaults_then_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("epochs: 10\nblr: 1.0e-3\ndata:\n  num_workers: 1\n  train: a.tar\n")
    cfg = load_config(PretrainConfig, f, ["epochs=20", "data.train=b-{0..3}.tar", "clip_grad=1"])
    assert cfg.epochs == 20  # the command line wins over the file
    assert cfg.blr == 1e-3  # the file wins over the default
    assert cfg.data.num_workers == 1 and cfg.data.train == "b-{0..3}.tar"
    assert cfg.clip_grad == 1.0 and isinstance(cfg.clip_grad, float)
    assert cfg.weight_decay == PretrainConfig().weight_decay  # untouched default


RECIPES = sorted((ROOT / "pipelines" / "configs").glob("*.yaml"))
RECIPE_STAGE = {"mae": "pretrain", "linprobe": "linprobe", "finetune": "finetune"}  # file name prefix -> stage


def flat(mapping: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in mapping.items():
        out.update(flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {prefix + key: value})
    return out


@pytest.mark.parametrize("path", RECIPES, ids=lambda p: p.name)
def test_every_recipe_loads_and_states_only_what_differs_from_the_defaults(path):
    """A recipe is a diff over its stage's defaults (as dinov2's are): a key that restates a
    default hides what the recipe really changes."""
    stage = RECIPE_STAGE.get(path.name.split("_")[0])
    assert stage is not None, f"{path.name}: name it <{'|'.join(RECIPE_STAGE)}>_..., the stage it configures"
    config_cls = STAGES[stage].config_class()
    loaded = flat(dataclasses.asdict(load_config(config_cls, path)))
    defaults = flat(dataclasses.asdict(config_cls()))
    restated = [key for key in flat(yaml.safe_load(path.read_text())) if loaded[key] == defaults.get(key, object())]
    assert not restated, f"{path.name} restates defaults of {config_cls.__name__}: {restated}"


def test_the_imagenet_pretraining_recipes_differ_only_in_the_model_and_its_folder():
    base, large = (yaml.safe_load((ROOT / "pipelines" / "configs" / f"mae_vit_{s}_in1k.yaml").read_text())
                   for s in ("base", "large"))  # fmt: skip
    differ = {key for key in base.keys() | large.keys() if base.get(key) != large.get(key)}
    assert differ == {"model", "output_dir"}  # the paper trains B and L with one recipe


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("epochz=3", "'epochz'"),
        ("data.trian=x.tar", "'data.trian'"),
        ("epochs=many", "epochs"),
        ("batch_size=1.5", "batch_size"),
        ("norm_pix_loss=maybe", "norm_pix_loss"),
        ("mixed_precision=fp8", "mixed_precision"),
        ("model=mae_vit_enormous", "mae_vit_enormous"),
        ("mask_ratio=1.2", "mask_ratio"),
        ("accum_iter=0", "accum_iter"),
        ("data=3", "data"),
        ("epochs", "key=value"),
    ],
)
def test_bad_key_or_value_is_named(override, named):
    with pytest.raises(ConfigError) as err:
        load_config(PretrainConfig, None, [override])
    assert named in str(err.value)


def test_bad_yaml_file_is_named(tmp_path):
    with pytest.raises(ConfigError, match="missing.yaml"):
        load_config(PretrainConfig, tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("epochs: [1,\n")
    with pytest.raises(ConfigError, match="bad.yaml"):
        load_config(PretrainConfig, bad)
    nested = tmp_path / "nested.yaml"
    nested.write_text("data:\n  shufle_buffer: 10\n")
    with pytest.raises(ConfigError, match=r"'data\.shufle_buffer' in .*nested\.yaml"):
        load_config(PretrainConfig, nested)


def test_override_values_are_read_as_yaml():
    assert parse_overrides(["a=1", "b=0.5", "c=true", "d=null", "e.f=x", "g="]) == {
        "a": 1, "b": 0.5, "c": True, "d": None, "e": {"f": "x"}, "g": ""}  # fmt: skip


@pytest.mark.parametrize("name", [name for name, stage in STAGES.items() if stage.training])
def test_each_training_entry_point_names_a_bad_key_before_any_work_and_lists_its_keys(name, tmp_path, capsys):
    """In this process (the fast tier); the tests below run the stage as its own process."""
    entry = importlib.import_module(STAGES[name].module)
    out = tmp_path / "run"
    assert entry.main([f"output_dir={out}", "blrr=1"]) == 2
    assert "'blrr'" in capsys.readouterr().err and not out.exists()
    with pytest.raises(SystemExit) as exit_:
        entry.main(["--help"])
    assert exit_.value.code == 0
    listed = capsys.readouterr().out
    assert all(key in listed for key in ("output_dir", "data.train", "resume", "mixed_precision"))


@pytest.mark.slow
def test_cli_rejects_bad_key_before_any_work(tmp_path):
    """The stage exits 2 naming the key, and writes no run folder."""
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}", "blrr=1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "'blrr'" in proc.stderr
    assert not out.exists()


@pytest.mark.slow
def test_cli_help_lists_keys():
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 0
    for key in ("data.train", "mask_ratio", "accum_iter", "resume", "mixed_precision"):
        assert key in proc.stdout


@pytest.mark.slow
def test_cli_missing_shards_are_named(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "pipelines.pretrain", f"output_dir={out}",
                           f"data.train={tmp_path}/nope-{{0..3}}.tar"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert proc.returncode == 2
    assert "nope-0.tar" in proc.stderr
    saved = yaml.safe_load((out / "config.yaml").read_text())  # the resolved config is kept with the run
    assert saved["data"]["train"].endswith("nope-{0..3}.tar")


def test_model_overrides_are_checked_with_the_config():
    with pytest.raises(ConfigError, match="depthh"):
        load_config(PretrainConfig, None, ["model_overrides.depthh=3"])
    with pytest.raises(ConfigError, match="embed_dim 100 is not divisible"):
        load_config(PretrainConfig, None, ["model_overrides.embed_dim=100"])
    assert load_config(PretrainConfig, None, ["model_overrides.depth=2"]).model_overrides == {"depth": 2}


def test_mixed_precision_no_on_the_command_line_is_the_string_no():
    """YAML 1.1 reads a bare `no` as false; the precision key still gets "no" (fp32)."""
    from mae.pretrain import PretrainConfig

    assert load_config(PretrainConfig, None, ["mixed_precision=no"]).mixed_precision == "no"


@pytest.mark.parametrize("cls", [PretrainConfig, LinprobeConfig, FinetuneConfig])
def test_default_warmup_shrinks_with_fewer_epochs_and_stays_at_the_defaults(cls):
    """A user who sets only ``epochs`` gets a warm-up that fits; the default run keeps its own."""
    default = load_config(cls)
    assert default.warmup() == cls.DEFAULT_WARMUP  # the default run is unchanged
    assert load_config(cls, overrides=[f"epochs={default.epochs * 3}"]).warmup() == cls.DEFAULT_WARMUP
    short = load_config(cls, overrides=["epochs=2"])
    assert 0 < short.warmup() < 2 and short.warmup() == pytest.approx(cls.DEFAULT_WARMUP * 2 / default.epochs)
    assert load_config(cls, overrides=["epochs=2", "warmup_epochs=2"]).warmup() == 2.0  # explicit wins


def test_explicit_warmup_longer_than_the_run_is_refused_in_one_line():
    with pytest.raises(ConfigError, match=r"warmup_epochs=3 is outside \[0, epochs=2\]: set warmup_epochs to at most 2") as err:
        load_config(PretrainConfig, overrides=["epochs=2", "warmup_epochs=3"])
    assert "\n" not in str(err.value)
