"""Training configs: YAML loading, overrides, validation that reports every problem, recipes, CLI."""

from __future__ import annotations

from pathlib import Path

import pytest

from vlkit.config import load as config_load
from vlkit.config.load import (
    CHOICES,
    ConfigError,
    config_to_dict,
    dump_yaml,
    load_config,
    register_choice,
)
from vlkit.config.recipes import find_config, list_recipes, recipe_path, recipe_text
from vlkit.config.schema import LockConfig, TrainConfig
from vlkit.errors import VlkitError

from .conftest import ROOT, run_cli

GOOD = """\
# vlkit train good.yaml
model:
  name: clip-tiny
datasets:
  data:
    path: data.lance
tasks:
  - name: retrieval
    dataset: data
batch_size: 8
"""

BAD = """\
trainer: 3
epochs: 1.5
precision: fp64
batch_size: 10
grad_accum: 3
optim:
  lr_head: fast
  betas: [0.9]
datasets:
  data: {}
tasks:
  - {name: retrieval, dataset: dta, loss: clip}
"""


def write(tmp_path: Path, text: str, name: str = "cfg.yaml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def problems_of(excinfo: pytest.ExceptionInfo) -> dict[str, str]:
    """``{key path: message}`` from a ConfigError, checking its lines start with the key path."""
    exc = excinfo.value
    assert isinstance(exc, ConfigError)
    lines = str(exc).splitlines()
    assert lines[0].startswith("invalid config") and lines[1:] == exc.problems
    return {line.split(":", 1)[0]: line.split(":", 1)[1].strip() for line in exc.problems}


@pytest.fixture
def good(tmp_path):
    return write(tmp_path, GOOD)


def test_good_config_builds_nested_dataclasses(good):
    cfg = load_config(good)
    assert isinstance(cfg, TrainConfig)
    assert cfg.datasets["data"].path == "data.lance" and cfg.datasets["data"].val_split == "val"
    assert cfg.tasks[0].dataset == "data" and cfg.tasks[0].loss is None  # the task's default (contrastive)
    assert cfg.optim.betas == (0.9, 0.98) and isinstance(cfg.optim.betas, tuple)
    assert cfg.model.lock is None and cfg.batch_size == 8


def test_every_problem_reported_at_once(tmp_path):
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, BAD))
    found = problems_of(excinfo)
    assert found["trainer"] == "unknown key"
    assert found["epochs"] == "expected an int, got 1.5"
    assert found["precision"].startswith("'fp64' is not one of bf16, fp16, fp32")
    assert found["optim.lr_head"] == "expected a float, got 'fast'"
    assert found["optim.betas"] == "expected a list of 2 floats, got a list of 1"
    assert found["datasets.data.path"] == "missing required value"
    assert found["tasks.0.loss"].startswith("'clip' is not one of caption, coca, contrastive, momentum, siglip")
    assert "batch_size" in found and "grad_accum 3" in found["batch_size"]
    assert found["tasks.0.dataset"].startswith("'dta' is not a key of datasets")
    assert "did you mean 'data'?" in found["tasks.0.dataset"]
    assert len(excinfo.value.problems) == 9
    assert str(tmp_path) in str(excinfo.value).splitlines()[0]


def test_type_rules(tmp_path):
    text = GOOD + "seed: true\nema: 1\nmax_steps: null\nmodel:\n  name: 7\n"
    text = text.replace("model:\n  name: clip-tiny\n", "")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text))
    found = problems_of(excinfo)
    assert found["seed"] == "expected an int, got true"  # a bool is not an int
    assert found["model.name"].startswith("expected a string, got 7")
    assert found["ema"].startswith("must be between 0 and 1")  # an int is accepted as a float
    assert "max_steps" not in found  # Optional: null is fine


def test_suggestions_and_cross_field_checks(tmp_path):
    text = GOOD + "epoch: 3\nbatch_size: 0\ngrad_accum: -1\ntasks: []\n"
    text = text.replace("tasks:\n  - name: retrieval\n    dataset: data\nbatch_size: 8\n", "")
    with pytest.raises(ConfigError) as excinfo:
        load_config(write(tmp_path, text))
    found = problems_of(excinfo)
    assert found["epoch"] == "unknown key (did you mean 'epochs'?)"
    assert found["batch_size"] == "must be positive, got 0"
    assert found["grad_accum"] == "must be positive, got -1"
    assert found["tasks"].startswith("at least one task is required")


def test_no_file_uses_defaults_and_needs_a_task():
    with pytest.raises(ConfigError) as excinfo:
        load_config(None)
    assert list(problems_of(excinfo)) == ["tasks"]
    cfg = load_config(None, ["datasets.d.path=x.lance", "tasks.0.dataset=d"])
    assert cfg.tasks[0].name == "retrieval" and cfg.datasets["d"].path == "x.lance"


def test_overrides_of_each_kind(good):
    cfg = load_config(good, [
        "optim.lr_head=1e-3",
        "optim.betas=[0.9, 0.95]",
        "optim.grad_clip=null",
        "datasets.data.path=other.lance",
        "datasets.extra.path=extra.lance",
        "tasks.0.weight=2",
        "tasks.1.dataset=extra",
        "model.args.vision_layers=4",
        "model.args.nested.depth=2",
        "compile=true",
        "output_dir=runs/x",
        "epochs=3",
    ])
    assert cfg.optim.lr_head == 1e-3 and isinstance(cfg.optim.lr_head, float)
    assert cfg.optim.betas == (0.9, 0.95) and cfg.optim.grad_clip is None
    assert cfg.optim.lr_image == 1e-4  # untouched siblings keep their defaults
    assert cfg.datasets["data"].path == "other.lance" and cfg.datasets["extra"].path == "extra.lance"
    assert cfg.tasks[0].weight == 2.0 and cfg.tasks[1].dataset == "extra" and len(cfg.tasks) == 2
    assert cfg.model.args == {"vision_layers": 4, "nested": {"depth": 2}}
    assert cfg.compile is True and cfg.output_dir == "runs/x" and cfg.epochs == 3


def test_float_exponents_in_yaml_files(tmp_path):
    cfg = load_config(write(tmp_path, GOOD + "optim:\n  lr_head: 1e-3\n  eps: 5E-7\n  lr_text: 1.0e+2\n"))
    assert (cfg.optim.lr_head, cfg.optim.eps, cfg.optim.lr_text) == (1e-3, 5e-7, 100.0)


def test_override_creates_optional_sub_config(good):
    cfg = load_config(good, ["model.lock.tower=text"])
    assert cfg.model.lock == LockConfig(tower="text")
    cfg = load_config(good, ["model.lock={tower: image, unlocked_blocks: 2}", "model.lock.unlock_projection=true"])
    assert cfg.model.lock == LockConfig(tower="image", unlocked_blocks=2, unlock_projection=True)
    assert load_config(good, ["model.lock.tower=text", "model.lock=null"]).model.lock is None


def test_bad_overrides_are_reported_with_the_rest(good):
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, [
            "optim.lr_hed=1", "epochs=", "nokey", "tasks.5.weight=1", "seed.x=1",
            "tasks.x.weight=1", "precision=fp8", "model.lock.tower=both",
        ])
    found = problems_of(excinfo)
    assert found["optim.lr_hed"].startswith("unknown key (did you mean 'lr_head'?)")
    assert "optim.lr_hed=1" in found["optim.lr_hed"]
    assert "no value" in found["epochs"]
    assert "not key=value" in found["nokey"]
    assert "out of range" in found["tasks.5"]
    assert "not a section" in found["seed"]
    assert "use an index" in found["tasks.x"]
    assert found["precision"].startswith("'fp8' is not one of")
    assert found["model.lock.tower"].startswith("'both' is not one of image, text")
    assert len(found) == 8


def test_yaml_errors_name_file_and_line(tmp_path):
    path = write(tmp_path, "model:\n  name: clip-tiny\n bad: [1, 2\n")
    with pytest.raises(VlkitError) as excinfo:
        load_config(path)
    assert f"{path}:3" in str(excinfo.value) or f"{path}:4" in str(excinfo.value)
    assert "invalid YAML" in str(excinfo.value)
    with pytest.raises(VlkitError, match="must be a YAML mapping"):
        load_config(write(tmp_path, "- 1\n- 2\n", "list.yaml"))
    with pytest.raises(VlkitError, match="not found"):
        load_config(tmp_path / "missing.yaml")


def test_round_trip(good, tmp_path):
    cfg = load_config(good, [
        "model.lock.tower=text", "model.args.vision_layers=2", "optim.eps=1e-8",
        "model.name='1e3'", "ema=0.999", "best_metric=val/data/t2i_r1",
    ])
    data = config_to_dict(cfg)
    assert data["optim"]["betas"] == [0.9, 0.98] and data["model"]["lock"]["tower"] == "text"
    text = dump_yaml(cfg, header="resolved config\nvlkit train")
    assert text.startswith("# resolved config\n# vlkit train\n")
    again = load_config(write(tmp_path, text, "dumped.yaml"))
    assert again == cfg and again.model.name == "1e3"


def test_choices_registry(good, monkeypatch):
    monkeypatch.setattr(config_load, "CHOICES", {k: set(v) for k, v in CHOICES.items()})
    assert {"retrieval", "captioning", "vqa", "itm", "classification"} <= config_load.CHOICES["tasks.*.name"]
    with pytest.raises(ConfigError, match="'new_task' is not one of"):
        load_config(good, ["tasks.0.name=new_task"])
    config_load.register_choice("tasks.*.name", "new_task")
    assert load_config(good, ["tasks.0.name=new_task"]).tasks[0].name == "new_task"
    # a new pattern makes a field enumerated; * matches mapping keys too
    config_load.register_choice("datasets.*.train_split", "train", "all")
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, ["datasets.data.train_split=tran"])
    assert problems_of(excinfo)["datasets.data.train_split"].endswith("(did you mean 'train'?)")
    with pytest.raises(ValueError):
        register_choice("tasks..name", "x")
    assert "new_task" not in CHOICES["tasks.*.name"]  # the real table was not touched


def test_recipes(tmp_path):
    names = list_recipes()
    assert "synth_clip_tiny" in names
    assert recipe_path("synth_clip_tiny") == ROOT / "vlkit" / "configs" / "synth_clip_tiny.yaml"
    assert recipe_path("synth_clip_tiny.yaml") == recipe_path("synth_clip_tiny")
    assert "clip-tiny" in recipe_text("synth_clip_tiny")
    with pytest.raises(VlkitError, match="available: .*synth_clip_tiny"):
        recipe_path("synth_clip_tin")
    assert find_config("synth_clip_tiny") == recipe_path("synth_clip_tiny")
    assert find_config(write(tmp_path, GOOD)) == tmp_path / "cfg.yaml"
    with pytest.raises(VlkitError, match="not found"):
        find_config(tmp_path / "nope.yaml")


def test_every_shipped_config_validates(tmp_path):
    configs = ROOT / "vlkit" / "configs"
    assert configs.is_dir()
    for path in sorted(configs.glob("*.yaml")):
        first = path.read_text().splitlines()[0]
        assert first.startswith("#") and "vlkit " in first, f"{path.name}: first line must give its command"
        cfg = load_config(path)
        assert load_config(write(tmp_path, dump_yaml(cfg), path.name)) == cfg


def test_cli_validate(tmp_path, good):
    proc = run_cli("configs", "validate", good, "--set", "epochs=2")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"ok {good}"
    bad = write(tmp_path, BAD, "bad.yaml")
    proc = run_cli("configs", "validate", good, bad)
    assert proc.returncode == 2
    assert f"ok {good}" in proc.stdout and f"FAIL {bad}: 9 problems" in proc.stderr
    assert "  optim.lr_head: expected a float, got 'fast'" in proc.stderr.splitlines()
    proc = run_cli("configs", "validate")
    assert proc.returncode == 0, proc.stderr
    assert "ok synth_clip_tiny" in proc.stdout.splitlines()


def test_cli_list_show_cp(tmp_path):
    proc = run_cli("configs", "list")
    assert proc.returncode == 0, proc.stderr
    line = next(line for line in proc.stdout.splitlines() if line.startswith("synth_clip_tiny "))
    assert "vlkit train synth_clip_tiny" in line
    proc = run_cli("configs", "show", "synth_clip_tiny")
    assert proc.returncode == 0 and proc.stdout == recipe_text("synth_clip_tiny")
    dest = tmp_path / "mine.yaml"
    assert run_cli("configs", "cp", "synth_clip_tiny", dest).returncode == 0
    assert dest.read_text() == recipe_text("synth_clip_tiny")
    dest.write_text("edited")
    proc = run_cli("configs", "cp", "synth_clip_tiny", dest)
    assert proc.returncode == 2 and "--force" in proc.stderr and dest.read_text() == "edited"
    assert run_cli("configs", "cp", "synth_clip_tiny", dest, "--force").returncode == 0
    assert dest.read_text() == recipe_text("synth_clip_tiny")
    assert run_cli("configs", "cp", "synth_clip_tiny", tmp_path).returncode == 0
    assert (tmp_path / "synth_clip_tiny.yaml").exists()
    proc = run_cli("configs", "show", "nope")
    assert proc.returncode == 2 and "vlkit: error: unknown recipe 'nope'" in proc.stderr


def test_task_losses_and_captioning_keys_are_checked(good):
    cfg = load_config(good, ["tasks.0.name=captioning", "tasks.0.loss=coca", "tasks.0.num_beams=5",
                             "tasks.0.label_smoothing=0.1"])
    assert (cfg.tasks[0].loss, cfg.tasks[0].num_beams, cfg.tasks[0].label_smoothing) == ("coca", 5, 0.1)
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, ["tasks.0.name=captioning", "tasks.0.loss=siglip"])
    assert problems_of(excinfo)["tasks.0.loss"] == ("task captioning has no loss 'siglip'; it must be one of "
                                                    "caption, coca")
    with pytest.raises(ConfigError) as excinfo:  # a retrieval task would silently ignore these
        load_config(good, ["tasks.0.loss=caption", "tasks.0.num_beams=5", "tasks.0.label_smoothing=0.1"])
    found = problems_of(excinfo)
    assert found["tasks.0.loss"].startswith("task retrieval has no loss 'caption'")
    assert found["tasks.0.num_beams"].startswith("only the captioning and vqa tasks read it")
    assert found["tasks.0.label_smoothing"].startswith("only the captioning and vqa tasks read it")
    with pytest.raises(ConfigError) as excinfo:
        load_config(good, ["tasks.0.name=captioning", "tasks.0.label_smoothing=1.0"])
    assert "label_smoothing" in problems_of(excinfo)["tasks.0.label_smoothing"]
