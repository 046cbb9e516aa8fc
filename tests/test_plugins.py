"""Plug-ins: a module named by ``imports:`` registers a task, a loss, a metric, a model, an optimizer and a
schedule, and a run trains with every one of them; a module that does not import is one line naming the key;
the momentum loss on a model without queues is a config error naming the task and the model."""

from __future__ import annotations

import json
import os
import sys
import textwrap

import pytest
import torch

from vlkit.config.load import ConfigError, load_config
from vlkit.errors import VlkitError

from .conftest import run_cli

pytestmark = pytest.mark.usefixtures("one_thread")

PLUGIN = '''
"""Test plug-ins: one of each kind."""
import torch
import torch.nn.functional as F

from vlkit.metrics.registry import register_metric
from vlkit.models.clip.builders import clip_tiny
from vlkit.models.registry import register_model
from vlkit.modules.losses.registry import register_loss
from vlkit.tasks import register_task
from vlkit.tasks.retrieval import RetrievalTask
from vlkit.train.optimizers import register_optimizer
from vlkit.train.schedules import register_schedule


@register_model("clip-plugin-small")
def plugin_clip(**overrides):
    return clip_tiny(**{"embed_dim": 20, **overrides})


@register_loss("plugin_offset", task="retrieval")
def plugin_offset(image_embeds, text_embeds, scale):
    # the contrastive loss plus a constant: the same gradients, a logged loss above 10
    logits = scale * image_embeds @ text_embeds.T
    labels = torch.arange(len(logits), device=logits.device)
    return 10.0 + (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2


@register_metric("plugin_pair_sim", task="retrieval")
def plugin_pair_sim(p):
    return float((p["image_embeds"][p["text_image"]] * p["text_embeds"]).sum(-1).mean())


@register_metric("plugin_counts", task="retrieval")
def plugin_counts(p):
    return {"images": len(p["image_embeds"]), "texts": len(p["text_embeds"])}


@register_task("plugin_retrieval")
class PluginRetrieval(RetrievalTask):
    def forward_backward(self, *args, **kwargs):
        return {**super().forward_backward(*args, **kwargs), "plugin_steps": 1.0}


@register_optimizer("plugin_sgd")
def plugin_sgd(groups, cfg):
    return torch.optim.SGD(groups, lr=cfg.lr_head, momentum=0.5, dampening=0.25)


@register_schedule("plugin_halving")
def plugin_halving(s, n, cfg):
    return 0.5 ** (s // 2)
'''

CONFIG = """# vlkit train {path}
imports: [vlkit_test_plugin]
model: {{name: clip-plugin-small, args: {{context_length: 32}}}}
datasets: {{synth: {{path: {data}}}}}
tasks:
  - {{name: retrieval, dataset: synth, loss: plugin_offset, metrics: [plugin_pair_sim, plugin_counts]}}
  - {{name: plugin_retrieval, dataset: synth}}
optim: {{name: plugin_sgd, schedule: plugin_halving, warmup_steps: 0, lr_image: 0.01, lr_text: 0.01, lr_head: 0.01}}
batch_size: 32
max_steps: 6
eval_every: 6
save_every: 6
log_every: 1
progress: false
tensorboard: false
"""


def test_a_run_trains_with_every_kind_of_plugin(synth, tmp_path):
    """The module lies beside the config (the config's folder is searched)."""
    from vlkit.train.trainer import Trainer

    (tmp_path / "vlkit_test_plugin.py").write_text(PLUGIN)
    cfg = tmp_path / "plugins.yaml"
    cfg.write_text(CONFIG.format(path=cfg, data=synth))
    run = tmp_path / "run"
    assert "vlkit_test_plugin" not in sys.modules
    Trainer(load_config(cfg, [f"output_dir={run}"])).run()
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    train = {r["step"]: r for r in rows if "train/loss" in r}
    assert sorted(train) == [1, 2, 3, 4, 5, 6]
    # loss: the plug-in's offset shows in the retrieval task's loss, not in the other task's
    assert all(r["train/synth/retrieval/loss"] > 10 for r in train.values())
    assert all(r["train/synth/plugin_retrieval/loss"] < 10 for r in train.values())
    # task: the plug-in task trained every step
    assert all(r["train/synth/plugin_retrieval/plugin_steps"] == 1.0 for r in train.values())
    # schedule: 0.5 ** ((step - 1) // 2) times the peak rate
    assert [train[s]["train/lr_head"] for s in range(1, 7)] == pytest.approx(
        [0.01, 0.01, 0.005, 0.005, 0.0025, 0.0025])
    # metrics: a number and a mapping, under val/<dataset>/
    val = next(r for r in rows if "val/synth/plugin_pair_sim" in r)
    assert -1.0 <= val["val/synth/plugin_pair_sim"] <= 1.0
    assert val["val/synth/plugin_counts_images"] > 0
    assert val["val/synth/plugin_counts_texts"] >= val["val/synth/plugin_counts_images"]
    # model: the plug-in's size is what was trained and saved (a clip-* name: it gets the word tokenizer that
    # vlkit builds from the captions for a CLIP trained from scratch)
    saved = json.loads((run / "model" / "config.json").read_text())
    assert saved["architecture"] == "clip" and saved["config"]["embed_dim"] == 20
    # optimizer: the plug-in's SGD (its dampening) is in the checkpoint
    state = torch.load(run / "checkpoints" / "step-00000006" / "state.pt", weights_only=True)
    assert state["optimizer_name"] == "plugin_sgd"
    assert {g["dampening"] for g in state["optimizer"]["param_groups"]} == {0.25}
    # the saved config keeps the imports, so the run's checkpoints load again
    assert "vlkit_test_plugin" in (run / "config.yaml").read_text()


def test_imports_found_on_pythonpath(tmp_path):
    """A module on PYTHONPATH (not beside the config) is imported before validation: its task validates."""
    lib = tmp_path / "lib" / "mypkg"
    lib.mkdir(parents=True)
    (lib / "__init__.py").write_text("")
    (lib / "tasks.py").write_text(textwrap.dedent("""
        from vlkit.tasks import register_task
        from vlkit.tasks.retrieval import RetrievalTask

        register_task("pythonpath_task")(type("PythonpathTask", (RetrievalTask,), {}))
    """))
    conf = tmp_path / "conf"
    conf.mkdir()
    cfg = conf / "c.yaml"
    cfg.write_text("imports: [mypkg.tasks]\ndatasets: {d: {path: x}}\ntasks: [{name: pythonpath_task, dataset: d}]\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "lib"), os.environ.get("PYTHONPATH", "")])}
    import subprocess

    ok = subprocess.run([sys.executable, "-m", "vlkit", "configs", "validate", str(cfg)], capture_output=True,
                        text=True, env=env, timeout=120)
    assert ok.returncode == 0 and ok.stdout.startswith("ok "), ok.stderr
    with pytest.raises(VlkitError, match=r"c.yaml: imports.0: module 'mypkg.tasks' not found on sys.path or in "):
        load_config(cfg)  # without that PYTHONPATH


def test_a_failing_import_is_one_line_naming_the_key(tmp_path):
    (tmp_path / "broken_plugin.py").write_text("import os\nraise RuntimeError('plug-in refuses\\nto load')\n")
    cfg = tmp_path / "c.yaml"
    cfg.write_text("imports: [json, broken_plugin]\ndatasets: {d: {path: x}}\ntasks: [{name: retrieval, dataset: d}]\n")
    out = run_cli("train", cfg, f"output_dir={tmp_path / 'run'}")
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert lines == [f"vlkit: error: {cfg}: imports.1: importing module 'broken_plugin' failed: "
                     "RuntimeError: plug-in refuses"]
    assert not (tmp_path / "run").exists()
    missing = run_cli("train", cfg, "imports=[no_such_plugin_module]", f"output_dir={tmp_path / 'run'}")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1 and "imports.0: module 'no_such_plugin_module' not found" in missing.stderr
    with pytest.raises(VlkitError, match=r"imports.0: 'plugins/x.py' is not a module name"):
        load_config(cfg, ["imports=[plugins/x.py]"])


def test_momentum_loss_on_a_clip_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError) as info:
        load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d, loss: momentum}]",
                           "model.name=clip-tiny"])
    assert info.value.problems == [
        "tasks.0.loss: task retrieval cannot train model 'clip-tiny' with loss 'momentum': it has no queue (the "
        "loss needs momentum encoders and feature queues: a brivl-* model with model.args.momentum > 0, e.g. 0.995)"]
    # a brivl model passes the validation; built without queues, it is refused before any work
    cfg = load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d, loss: momentum}]",
                             "model.name=brivl-tiny"])
    from vlkit.modules.losses.registry import check_model, get_loss
    from vlkit.train.trainer import check_task_losses

    spec = get_loss("retrieval", "momentum")
    no_queue, with_queue = torch.nn.Module(), torch.nn.Module()
    no_queue.queue, with_queue.queue = None, torch.nn.Identity()
    assert check_model(spec, with_queue, "brivl-tiny") is None
    with pytest.raises(VlkitError, match=r"tasks.0.loss: task retrieval: model 'brivl-tiny' cannot train with loss "
                                         r"'momentum': it has no queue"):
        check_task_losses(cfg, no_queue)
    # via the command line: exit 2, the one problem
    out = run_cli("train", "synth_clip_tiny", "tasks.0.loss=momentum", f"output_dir={tmp_path / 'run'}")
    assert out.returncode == 2 and "tasks.0.loss: task retrieval cannot train model 'clip-tiny'" in out.stderr


def test_unknown_plugin_names_are_config_errors():
    with pytest.raises(ConfigError) as info:
        load_config(None, ["datasets={d: {path: x}}", "tasks=[{name: retrieval, dataset: d, loss: nope, "
                           "metrics: [nope_metric]}]", "optim.name=nope", "optim.schedule=nope"])
    text = "\n".join(info.value.problems)
    assert "optim.name: 'nope' is not one of" in text and "optim.schedule: 'nope' is not one of" in text
    assert "tasks.0.loss: 'nope' is not one of" in text
    assert "tasks.0.metrics.0: task retrieval has no metric 'nope_metric'" in text


def test_registries_refuse_a_second_registration_and_check_metric_values():
    from vlkit.metrics.registry import compute_metrics, register_metric
    from vlkit.modules.losses.registry import register_loss
    from vlkit.train.optimizers import register_optimizer
    from vlkit.train.schedules import register_schedule

    with pytest.raises(ValueError, match="already registered"):
        register_loss("contrastive")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_optimizer("sgd")(lambda *a: None)
    with pytest.raises(ValueError, match="already registered"):
        register_schedule("cosine")(lambda *a: None)
    register_metric("test_bad_metric", task="test_task")(lambda p: "high")
    with pytest.raises(VlkitError, match=r"metric 'test_bad_metric' returned str, not a number"):
        compute_metrics("test_task", ["test_bad_metric"], {}, "val/d/")
    register_metric("test_sum", task="test_task")(lambda p: {"a": p["x"] + 1, "b": 2.5})
    assert compute_metrics("test_task", ["test_sum"], {"x": 1}, "val/d/") == {"val/d/test_sum_a": 2.0,
                                                                            "val/d/test_sum_b": 2.5}
