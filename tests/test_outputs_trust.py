"""Output paths can be trusted: a command replaces a folder only when it is vlkit's own output of the same kind,
never the input, '.', '/', home or a folder of someone else's files; problems are one line and leave nothing."""

from __future__ import annotations

import errno
import importlib
import json
import os
import shutil
import subprocess
from pathlib import Path

import pytest

from vlkit.cli import main
from vlkit.cli.quickstart import _run_folder
from vlkit.errors import VlkitError
from vlkit.search.index import build_index, read_index_info
from vlkit.inference.loading import load_for_inference
from vlkit.utils.fs import (MARKER_NAME, atomic_directory, check_output_dir, check_output_file, output_kind,
                            remove_temporaries, write_marker)


def _cli(capsys, *args) -> subprocess.CompletedProcess:
    """``vlkit ARGS`` in this process (the refusals come before any model is loaded)."""
    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return subprocess.CompletedProcess(args, code, out.out, out.err)


def _one_line_error(proc, *needles: str) -> str:
    assert proc.returncode == 2, (proc.returncode, proc.stdout[-1000:], proc.stderr[-2000:])
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("vlkit: error: "), proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _notes(tmp_path: Path) -> Path:
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("call the lab\n")
    return notes


def _leftovers(parent: Path) -> list[str]:
    return [p.name for p in parent.iterdir() if p.name.startswith(".")]


# ------------------------------------------------------------------------------------------ the mechanism


def test_atomic_directory_replaces_only_its_own_kind(tmp_path):
    notes = _notes(tmp_path)
    with pytest.raises(VlkitError, match="notes: the folder exists and is not an earlier vlkit index"):
        with atomic_directory(notes, "index") as tmp:
            (tmp / "index.json").write_text("{}")
    assert _snapshot(notes) == {"todo.txt": b"call the lab\n"} and not _leftovers(tmp_path)

    out = tmp_path / "out"
    for content in ("first", "second"):  # an earlier output of the same kind is replaced
        with atomic_directory(out, "index") as tmp:
            (tmp / "v.txt").write_text(content)
    assert (out / "v.txt").read_text() == "second" and output_kind(out) == "index"
    with pytest.raises(VlkitError, match="holds a vlkit index, not an earlier vlkit eval report"):
        with atomic_directory(out, "report"):
            pass
    empty = tmp_path / "empty"
    empty.mkdir()
    with atomic_directory(empty, "report") as tmp:
        (tmp / "index.html").write_text("<html>")
    assert output_kind(empty) == "report" and not _leftovers(tmp_path)


def test_special_paths_inputs_and_files_are_refused(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    data = tmp_path / "data.lance"
    data.mkdir()
    (data / "part").write_text("rows")
    cases = [(".", "current directory"), (str(tmp_path.parent), "current directory"), ("/", "root or home"),
             (str(Path.home()), "root or home")]
    for path, reason in cases:
        with pytest.raises(VlkitError, match=reason):
            check_output_dir(path, "index", what="--out")
    with pytest.raises(VlkitError, match="is the input"):
        check_output_dir(data, "index", inputs=[data])
    with pytest.raises(VlkitError, match="holds the input"):
        check_output_dir(tmp_path / "sub", "index", inputs=[tmp_path / "sub" / "x.lance"])
    (tmp_path / "file").write_text("mine")
    with pytest.raises(VlkitError, match="file: exists and is not a directory"):
        check_output_dir(tmp_path / "file", "index")
    with pytest.raises(VlkitError, match=r"cannot create it \(.*file is not a directory\)"):
        with atomic_directory(tmp_path / "file" / "index", "index"):
            pass
    with pytest.raises(VlkitError, match="is a directory"):
        check_output_file(data, what="--out")
    with pytest.raises(VlkitError, match="is the input"):
        check_output_file(data / "part", inputs=[data / "part"])
    assert (tmp_path / "file").read_text() == "mine" and (data / "part").read_text() == "rows"


def test_disk_errors_are_one_line_and_leave_nothing(tmp_path, monkeypatch):
    out = tmp_path / "out"
    with pytest.raises(VlkitError, match=r"out: cannot write \(No space left on device\)"):
        with atomic_directory(out, "index") as tmp:
            (tmp / "a").write_text("partial")
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    assert not out.exists() and not _leftovers(tmp_path)

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS))

    monkeypatch.setattr("tempfile.mkdtemp", read_only)
    with pytest.raises(VlkitError, match=r"out: cannot create the folder \(Read-only file system\)"):
        with atomic_directory(out, "index"):
            pass
    assert not out.exists()


def test_only_exact_temporary_names_are_cleaned(tmp_path):
    (tmp_path / ".step-00000004.tmp-ab12cd_9").mkdir()
    (tmp_path / ".step-00000004.old-zz99yy88").mkdir()
    for keep in (".step-00000004.tmp-mine", ".step-notes", "step-00000004"):
        (tmp_path / keep).mkdir()
    removed = remove_temporaries(tmp_path, r"step-\d{8}")
    assert sorted(p.name for p in removed) == [".step-00000004.old-zz99yy88", ".step-00000004.tmp-ab12cd_9"]
    assert sorted(p.name for p in tmp_path.iterdir()) == [".step-00000004.tmp-mine", ".step-notes",
                                                         "step-00000004"]


# ------------------------------------------------------------------------------------------ vlkit index


def test_index_out_never_deletes_what_is_not_an_index(trained_run, synth, tmp_path, capsys, monkeypatch):
    run = trained_run[0]
    notes = _notes(tmp_path)
    _one_line_error(_cli(capsys, "index", run, "--data", synth, "--out", notes), "--out", "notes", "not an earlier")
    assert _snapshot(notes) == {"todo.txt": b"call the lab\n"}
    data = tmp_path / "data.lance"
    shutil.copytree(synth, data)
    before = _snapshot(data)
    _one_line_error(_cli(capsys, "index", run, "--data", data, "--out", data), "is the input")
    monkeypatch.chdir(tmp_path)
    _one_line_error(_cli(capsys, "index", run, "--data", data, "--out", "."), "current directory")
    assert _snapshot(data) == before and _snapshot(notes) == {"todo.txt": b"call the lab\n"}


def test_an_earlier_index_is_replaced(trained_run, synth, tmp_path):
    loaded = load_for_inference(trained_run[0])
    out = tmp_path / "index"
    first = build_index(loaded, synth, out, split="test")
    second = build_index(loaded, synth, out, split="val")
    info = read_index_info(out)
    assert info.split == "val" and info.captions == second.captions != first.captions
    assert output_kind(out) == "index" and (out / MARKER_NAME).is_file() and not _leftovers(tmp_path)


# ------------------------------------------------------------------------------------------ other commands


def test_eval_report_checked_before_evaluating(trained_run, synth, tmp_path, capsys, monkeypatch):
    def evaluate(*args, **kwargs):
        raise AssertionError("the report folder must be checked before the evaluation runs")

    monkeypatch.setattr(importlib.import_module("vlkit.eval.evaluate"), "evaluate", evaluate)
    notes = _notes(tmp_path)
    _one_line_error(_cli(capsys, "eval", trained_run[0], "--data", synth, "--report", notes),
                    "--report", "not an earlier vlkit eval report")
    _one_line_error(_cli(capsys, "eval", trained_run[0], "--data", synth, "--report", synth), "is the input")
    assert _snapshot(notes) == {"todo.txt": b"call the lab\n"}


def test_quickstart_typo_touches_nothing(tmp_path, capsys, monkeypatch):
    qs = tmp_path / "qs"
    run = qs / "run"
    (run / "checkpoints" / "step-00000010").mkdir(parents=True)
    (run / "checkpoints" / "latest").write_text("step-00000010")
    (run / "config.yaml").write_text("epochs: 2\n")
    (run / "metrics.jsonl").write_text('{"step": 10, "train/loss": 1.0}\n')
    (qs / "data.lance").mkdir()
    (qs / "sheet.png").write_bytes(b"png")
    write_marker(qs, "quickstart")
    before = _snapshot(qs)
    monkeypatch.chdir(tmp_path)
    typo = _cli(capsys, "quickstart", "--out", qs, "epoch=3")  # a config error lists every problem
    assert typo.returncode == 2 and "epoch: unknown key" in typo.stderr and "Traceback" not in typo.stderr
    _one_line_error(_cli(capsys, "quickstart", "--out", qs, "--data", tmp_path / "missing.json"),
                    "missing.json", "no such file")
    assert _snapshot(qs) == before
    assert sorted(p.name for p in qs.iterdir()) == [MARKER_NAME, "data.lance", "run", "sheet.png"]
    # the next run trains into a new numbered folder; resume=latest picks the newest
    assert _run_folder(qs, resume=False) == qs / "run-2"
    (qs / "run-2").mkdir()
    assert _run_folder(qs, resume=False) == qs / "run-3" and _run_folder(qs, resume=True) == qs / "run-2"
    notes = _notes(tmp_path)
    _one_line_error(_cli(capsys, "quickstart", "--out", notes), "not an earlier vlkit quickstart folder")
    assert _snapshot(notes) == {"todo.txt": b"call the lab\n"}


# --- file outputs and the synthetic dataset folder ------------------------------------------------------------


def test_synth_never_writes_into_a_folder_of_user_files(tmp_path):
    from vlkit.data.synth import generate

    notes = tmp_path / "notes"
    (notes / "images").mkdir(parents=True)
    (notes / "images" / "000000.png").write_bytes(b"my own picture")
    with pytest.raises(VlkitError, match="not an earlier vlkit synthetic dataset"):
        generate(notes, 3, seed=0)
    assert (notes / "images" / "000000.png").read_bytes() == b"my own picture"
    assert sorted(p.name for p in notes.rglob("*")) == ["000000.png", "images"]
    first = generate(tmp_path / "synth", 3, seed=0)  # a new folder, then the same folder again: allowed
    again = generate(tmp_path / "synth", 3, seed=0)
    assert first == again and len(again.read_text().splitlines()) == 3


def test_contact_sheet_and_plot_outputs_are_checked_before_any_work(synth, tmp_path):
    from vlkit.data.sheet import contact_sheet
    from vlkit.train.plots import plot_run

    folder = tmp_path / "sheet.png"
    folder.mkdir()
    with pytest.raises(VlkitError, match="is a directory; name a file"):
        contact_sheet(synth, folder, n=2)
    with pytest.raises(VlkitError, match="is the input"):
        contact_sheet(synth, synth, n=2)
    under_file = tmp_path / "file"
    under_file.write_text("x")
    with pytest.raises(VlkitError, match=str(under_file / "sheet.png")):
        contact_sheet(synth, under_file / "sheet.png", n=2)
    written = contact_sheet(synth, tmp_path / "ok.png", n=2)
    assert written.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["file", "ok.png", "sheet.png"]  # no temporary left

    run = tmp_path / "run"
    run.mkdir()
    (run / "metrics.jsonl").write_text('{"step": 1, "train/loss": 1.0}\n{"step": 2, "train/loss": 0.5}\n')
    with pytest.raises(VlkitError, match="is the input"):
        plot_run(run, run / "metrics.jsonl")
    (run / "curves.png").mkdir()
    with pytest.raises(VlkitError, match="is a directory"):
        plot_run(run)
    assert plot_run(run, run / "c.svg").read_text().lstrip().startswith("<?xml")


# --- what counts as vlkit's own model folder ------------------------------------------------------------------


def _foreign_hf_folder(path: Path) -> dict[str, bytes]:
    path.mkdir()
    (path / "config.json").write_text('{"architectures": ["CLIPModel"], "model_type": "clip"}')
    (path / "model.safetensors").write_bytes(b"someone else's weights")
    (path / "README.md").write_text("# my fine-tuned CLIP\n")
    (path / "tokenizer_config.json").write_text("{}")
    return _snapshot(path)


def test_a_hugging_face_folder_is_never_replaced_but_vlkit_models_are(tmp_path):
    import torch

    import vlkit
    from vlkit.models.clip.convert import export_hf
    from vlkit.models.io import load_model, save_model

    torch.manual_seed(0)
    model = vlkit.create_model("clip-tiny", vocab_size=100, context_length=16)
    foreign = tmp_path / "hf-checkout"
    before = _foreign_hf_folder(foreign)
    assert output_kind(foreign) is None
    with pytest.raises(VlkitError, match="hf-checkout: the folder exists and is not an earlier vlkit model"):
        save_model(model, foreign)
    with pytest.raises(VlkitError, match="hf-checkout: the folder exists and is not an earlier vlkit model"):
        export_hf(model, foreign)
    assert _snapshot(foreign) == before and not _leftovers(tmp_path)

    # vlkit's own folders are replaced: a saved model, an export (also by the other), each again
    saved, exported = tmp_path / "saved", tmp_path / "exported"
    save_model(model, saved)
    export_hf(model, exported)
    assert output_kind(saved) == output_kind(exported) == "model"
    with torch.no_grad():
        model.logit_scale.fill_(1.5)
    save_model(model, saved)
    export_hf(model, exported)
    assert float(load_model(saved).logit_scale.detach()) == 1.5
    assert json.loads((exported / "config.json").read_text())["logit_scale_init_value"] == pytest.approx(1.5)
    save_model(model, exported)
    assert float(load_model(exported).logit_scale.detach()) == 1.5 and not _leftovers(tmp_path)


# --- quickstart: what decides a resume, and every output checked first --------------------------------------


class _Stop(Exception):
    pass


def _quickstart_until_ingest(capsys, monkeypatch, qs: Path, *overrides: str) -> list[Path]:
    """Run ``vlkit quickstart --out qs OVERRIDES`` up to the ingest (stopped there); returns the run folders
    checked as new runs. A refusal before that is returned as the failed process."""
    new_runs: list[Path] = []
    runlog = importlib.import_module("vlkit.train.runlog")
    check = runlog.check_new_run_dir
    monkeypatch.setattr(runlog, "check_new_run_dir", lambda d: (new_runs.append(Path(d)), check(d)))

    def ingest(*args, **kwargs):
        raise _Stop

    monkeypatch.setattr(importlib.import_module("vlkit.data.ingest"), "ingest", ingest)
    with pytest.raises(_Stop):
        _cli(capsys, "quickstart", "--out", qs, *overrides)
    return new_runs


def _quickstart_folder(tmp_path: Path) -> Path:
    qs = tmp_path / "qs"
    (qs / "run" / "checkpoints" / "step-00000010").mkdir(parents=True)
    (qs / "run" / "checkpoints" / "latest").write_text("step-00000010")
    (qs / "run" / "config.yaml").write_text("epochs: 2\n")
    write_marker(qs, "quickstart")
    return qs


def test_quickstart_resume_is_read_from_the_config(tmp_path, capsys, monkeypatch):
    qs = _quickstart_folder(tmp_path)
    # resume=null is no resume: a new run folder, checked as one (and the captioner's new run folder)
    assert _quickstart_until_ingest(capsys, monkeypatch, qs, "resume=null") == [qs / "run-2", qs / "caption-run"]
    assert _quickstart_until_ingest(capsys, monkeypatch, qs, "resume=latest") == [qs / "caption-run"]
    assert _quickstart_until_ingest(capsys, monkeypatch, qs, "--caption-epochs", "0", "resume=latest") == []
    _one_line_error(_cli(capsys, "quickstart", "--out", qs, f"output_dir={tmp_path / 'elsewhere'}"),
                    "output_dir=", "--out")
    other = tmp_path / "other" / "checkpoints" / "step-00000010"
    _one_line_error(_cli(capsys, "quickstart", "--out", qs, f"resume={other}"), "not a checkpoint of a quickstart run")


def test_quickstart_checks_index_and_sheet_before_writing(tmp_path, capsys, monkeypatch):
    def ingest(*args, **kwargs):
        raise AssertionError("the outputs must be checked before the ingest")

    monkeypatch.setattr(importlib.import_module("vlkit.data.ingest"), "ingest", ingest)
    qs = _quickstart_folder(tmp_path)
    shutil.move(_notes(tmp_path), qs / "index")
    before = _snapshot(qs)
    _one_line_error(_cli(capsys, "quickstart", "--out", qs), "index", "not an earlier vlkit index")
    assert _snapshot(qs) == before
    shutil.rmtree(qs / "index")
    (qs / "sheet.png").mkdir()
    (qs / "sheet.png" / "keep.txt").write_text("mine")
    before = _snapshot(qs)
    _one_line_error(_cli(capsys, "quickstart", "--out", qs), "sheet.png", "is a directory")
    assert _snapshot(qs) == before
    # a folder that merely looks like one (a dataset and a sheet, no marker) is not a quickstart folder
    looks = tmp_path / "looks"
    (looks / "data.lance").mkdir(parents=True)
    (looks / "sheet.png").write_bytes(b"my picture")
    _one_line_error(_cli(capsys, "quickstart", "--out", looks), "not an earlier vlkit quickstart folder")
    assert _snapshot(looks) == {"sheet.png": b"my picture"}
