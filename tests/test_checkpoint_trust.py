"""Checkpoints and run folders can be trusted: a checkpoint never runs code, damage is detected (and resume falls
back to the newest intact checkpoint), a new run never writes into an old one, a torn metrics line is dropped."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from tests.conftest import CLIP_TINY_SYNTH
from vlkit.cli import main
from vlkit.config.load import load_config
from vlkit.errors import VlkitError
from vlkit.train.checkpoint import (MANIFEST_NAME, STATE_NAME, DamagedCheckpoint, load_checkpoint,
                                    open_resume_checkpoint, rng_states, save_checkpoint, set_rng_states,
                                    verify_checkpoint, write_manifest)
from vlkit.train.runlog import RunLog, read_metrics
from vlkit.train.trainer import Trainer


class _Payload:
    """Unpickling this calls ``open(path, "w")``: loading the file would create ``path``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self):
        return (open, (self.path, "w"))


def _crafted_checkpoint(run: Path, victim: Path, config_from: Path) -> Path:
    ckpt = run / "checkpoints" / "step-00000001"
    ckpt.mkdir(parents=True)
    torch.save({"model": _Payload(victim)}, ckpt / STATE_NAME)
    write_manifest(ckpt)  # the checksums match: only the content is hostile
    shutil.copy(config_from / "config.yaml", run / "config.yaml")
    return ckpt


def _flip_byte(path: Path, offset: int = -100) -> None:
    data = bytearray(path.read_bytes())
    data[offset] ^= 0xFF
    path.write_bytes(bytes(data))


def _copy_run(trained_run, tmp_path: Path) -> Path:
    run = tmp_path / "run"
    shutil.copytree(trained_run[0], run)
    return run


def _steps(run: Path) -> list[Path]:
    return sorted((run / "checkpoints").glob("step-*"))


def _one_line_error(stderr: str, *needles: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkit: error: "), stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def test_crafted_pickle_is_refused_and_runs_nothing(trained_run, synth, tmp_path, capsys):
    victim = tmp_path / "created-by-the-checkpoint"
    ckpt = _crafted_checkpoint(tmp_path / "evil", victim, trained_run[0])
    with pytest.raises(VlkitError, match=r"refusing to load.*\(io.open\)"):
        load_checkpoint(ckpt)
    assert not victim.exists()
    # the same file through the command line (eval, search and serve load models this way)
    capsys.readouterr()
    assert main(["eval", str(ckpt), "--data", str(synth)]) == 2
    _one_line_error(capsys.readouterr().err, "refusing to load", STATE_NAME)
    assert not victim.exists()


def test_saved_state_loads_weights_only_and_restores_rng(tmp_path):
    random.seed(3), np.random.seed(3), torch.manual_seed(3)
    states = rng_states()
    expected = (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist())
    save_checkpoint(tmp_path, 1, {"rng": states, "w": torch.ones(2)}, keep_last=2)
    loaded = torch.load(tmp_path / "checkpoints" / "step-00000001" / STATE_NAME, weights_only=True)
    random.seed(0), np.random.seed(0), torch.manual_seed(0)
    set_rng_states(loaded["rng"])
    assert (random.random(), np.random.rand(3).tolist(), torch.rand(3).tolist()) == expected


def test_checkpoint_written_before_manifests_still_loads(tmp_path):
    """An older checkpoint (NumPy RNG state as an array, no manifest) resumes without unpickling code."""
    ckpt = tmp_path / "step-00000001"
    ckpt.mkdir()
    torch.save({"rng": {"numpy": np.random.get_state()}, "w": torch.ones(2)}, ckpt / STATE_NAME)
    state = load_checkpoint(ckpt)
    assert state["rng"]["numpy"][0] == "MT19937" and state["w"].sum() == 2


def test_flipped_byte_is_detected_naming_the_file(trained_run, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    best = run / "checkpoints" / "best"
    verify_checkpoint(best)
    assert json.loads((best / MANIFEST_NAME).read_text())["files"][STATE_NAME]["sha256"]
    _flip_byte(best / STATE_NAME)
    with pytest.raises(DamagedCheckpoint, match=f"{STATE_NAME} does not match its SHA-256"):
        load_checkpoint(best)
    # an explicit damaged checkpoint is an error (one line on the command line), with no fallback
    with pytest.raises(DamagedCheckpoint, match=f"{best}: damaged checkpoint: {STATE_NAME}"):
        open_resume_checkpoint(str(best), run)


def test_damaged_latest_falls_back_to_the_newest_intact_one(trained_run, tmp_path, capsys):
    run = _copy_run(trained_run, tmp_path)
    steps = _steps(run)
    assert len(steps) >= 2
    latest = run / "checkpoints" / (run / "checkpoints" / "latest").read_text().strip()
    assert latest == steps[-1]
    _flip_byte(latest / STATE_NAME)
    warnings = []
    path, state = open_resume_checkpoint("latest", run, warn=warnings.append)
    assert path == steps[-2] and state["position"]["global_step"] == int(steps[-2].name.split("-")[1])
    assert len(warnings) == 1 and str(latest) in warnings[0] and "newest intact" in warnings[0]

    # the trainer resumes from it, says so, drops a torn metrics line and the temporaries of a killed save
    checkpoints = run / "checkpoints"
    (checkpoints / ".step-00000099.tmp-abcd_123").mkdir()
    (checkpoints / ".step-notes").mkdir()  # not a name vlkit gives its temporaries: kept
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"step": 9999, "train/lo')
    cfg = load_config(run / "config.yaml", [f"output_dir={run}", "resume=latest", "tensorboard=false"])
    trainer = Trainer(cfg)
    err = capsys.readouterr().err
    assert trainer.global_step == state["position"]["global_step"]
    assert "damaged checkpoint" in err and "resuming from" in err and "incomplete line" in err
    assert not (checkpoints / ".step-00000099.tmp-abcd_123").exists() and (checkpoints / ".step-notes").is_dir()
    rows = read_metrics(run)
    assert rows and max(r["step"] for r in rows) <= trainer.global_step


def test_pruning_keeps_the_checkpoint_just_written(tmp_path):
    for step in (1, 2, 3):
        save_checkpoint(tmp_path, step, {"w": torch.full((2,), float(step))}, keep_last=1, best=step == 2)
    root = tmp_path / "checkpoints"
    assert [p.name for p in _steps(tmp_path)] == ["step-00000003"]
    assert (root / "latest").read_text() == "step-00000003"
    assert load_checkpoint(root / "best")["w"][0] == 2  # best is a checkpoint of its own, checked too
    assert not [p for p in root.iterdir() if p.name.startswith(".")]


def test_new_run_into_an_old_run_is_refused(trained_run, synth, tmp_path):
    run = _copy_run(trained_run, tmp_path)
    before = {p: p.read_bytes() for p in run.rglob("*") if p.is_file()}
    cfg = load_config(run / "config.yaml", [f"output_dir={run}", "max_steps=2"])
    with pytest.raises(VlkitError, match="holds an earlier run.*resume=latest"):
        Trainer(cfg)
    assert {p: p.read_bytes() for p in run.rglob("*") if p.is_file()} == before  # nothing added or changed
    # a folder with the user's own config.yaml (not a run): nothing of theirs is overwritten
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "config.yaml").write_text("my notes\n")
    cfg = load_config(None, [f"datasets={{synth: {{path: {synth}}}}}", "tasks=[{name: retrieval, dataset: synth}]",
                             f"output_dir={mine}", *CLIP_TINY_SYNTH])
    with pytest.raises(VlkitError, match="config.yaml, which a new run would overwrite"):
        Trainer(cfg)
    assert (mine / "config.yaml").read_text() == "my notes\n"


def test_torn_metrics_line_is_skipped_by_readers(tmp_path):
    log = RunLog(tmp_path, tensorboard=False)
    log.log(1, {"train/loss": 2.0})
    log.log(2, {"train/loss": 1.5})
    with open(log.path, "a") as fh:
        fh.write('{"step": 3, "train/lo')
    torn = []
    assert [r["step"] for r in read_metrics(tmp_path, on_torn=lambda n, text: torn.append(n))] == [1, 2]
    assert torn == [3]
    log.truncate_after(1)
    assert [json.loads(line)["step"] for line in log.path.read_text().splitlines()] == [1]


def test_resume_continues_only_the_run_that_holds_the_checkpoint(trained_run, tmp_path):
    a = _copy_run(trained_run, tmp_path)
    b = tmp_path / "b"
    shutil.copytree(trained_run[0], b)
    step = _steps(a)[0]
    assert step.name != (a / "checkpoints" / "latest").read_text().strip()  # b would be cut back to it
    before = {run: _snapshot(run) for run in (a, b)}
    for output_dir in (b, tmp_path / "new"):
        cfg = load_config(a / "config.yaml", [f"output_dir={output_dir}", f"resume={step}", "tensorboard=false"])
        with pytest.raises(VlkitError, match=r"not a checkpoint of output_dir .*resume continues the run that "
                                             r"holds the checkpoint.*model\.pretrained="):
            Trainer(cfg)
    cfg = load_config(a / "config.yaml", [f"output_dir={tmp_path / 'new'}", "resume=latest", "tensorboard=false"])
    with pytest.raises(VlkitError, match="resume=latest: no checkpoint in"):
        Trainer(cfg)
    assert {run: _snapshot(run) for run in (a, b)} == before and not (tmp_path / "new").exists()
    # the run's own checkpoint, named by a path that is not spelled as output_dir is: resumed
    cfg = load_config(a / "config.yaml", [f"output_dir={a}", f"resume={a}/../{a.name}/checkpoints/{step.name}",
                                          "tensorboard=false"])
    assert Trainer(cfg).global_step == int(step.name.split("-")[1])


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_checkpoint_is_known_by_vlkit_files_not_by_a_state_pt(tmp_path):
    from vlkit.utils.fs import atomic_directory, output_kind

    mine = tmp_path / "experiments" / "best"  # someone's folder that happens to hold a state.pt
    mine.mkdir(parents=True)
    (mine / STATE_NAME).write_bytes(b"my own state")
    (mine / "notes.txt").write_text("lr sweep\n")
    assert output_kind(mine) is None
    with pytest.raises(VlkitError, match="not an earlier vlkit checkpoint"):
        with atomic_directory(mine, "checkpoint"):
            pass
    assert _snapshot(mine) == {STATE_NAME: b"my own state", "notes.txt": b"lr sweep\n"}
    # vlkit's own: a manifest beside state.pt, or (before manifests) a state.pt in a vlkit run's checkpoints/
    with_manifest = tmp_path / "ckpt"
    with_manifest.mkdir()
    torch.save({"w": torch.zeros(1)}, with_manifest / STATE_NAME)
    write_manifest(with_manifest)
    run = tmp_path / "run"
    older = run / "checkpoints" / "best"
    older.mkdir(parents=True)
    (older / STATE_NAME).write_bytes(b"older")
    assert output_kind(older) is None  # not yet a run: no config.yaml
    (run / "config.yaml").write_text("epochs: 1\n")
    assert output_kind(with_manifest) == output_kind(older) == "checkpoint"
