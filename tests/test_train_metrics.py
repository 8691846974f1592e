"""The metrics logger: JSONL records, TensorBoard event files read back with TensorBoard's own
reader (scalars, hparams, config text, resume purging), and console lines."""

import json

import pytest
from tensorboard.backend.event_processing import event_accumulator as ea
from tensorboard.plugins.hparams import plugin_data_pb2

from mimo_jax.train.metrics import MetricsLogger, flat_hparams

CONFIG = {"train": {"lr": 0.003, "mesh": "", "time_limit_minutes": None, "remat": "none"},
          "model": {"hidden_size": 32, "layer_types": ["full", "sliding"]}}


def _train_record(step: int, loss: float) -> dict:
    return {"step": step, "loss": loss, "ce": loss - 0.5, "mtp_ce": [loss + 0.5, loss + 1.0],
            "grad_norm": 1.5, "lr": 1e-3, "tokens_per_s": 100.0, "mfu": 0.01}


def _logger(workdir, start_step=0, **kw) -> MetricsLogger:
    kw = {"tensorboard": True, "progress_bar": False, "console_every": 100, **kw}
    return MetricsLogger(str(workdir), total_steps=10, start_step=start_step, config=CONFIG, **kw)


def _events(workdir) -> ea.EventAccumulator:
    acc = ea.EventAccumulator(str(workdir / "tensorboard"), size_guidance={ea.TENSORS: 0})
    acc.Reload()
    return acc


def test_jsonl_and_tensorboard_scalars_hparams_text(tmp_path):
    log = _logger(tmp_path)
    log.log(_train_record(1, 2.5))
    log.log({"step": 1, "split": "val", "loss": 2.0, "perplexity": 7.39})
    log.log(_train_record(2, 2.25))
    log.close()
    recs = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
    assert recs[0] == _train_record(1, 2.5) and recs[1]["split"] == "val" and len(recs) == 3

    acc = _events(tmp_path)
    loss = acc.Scalars("train/loss")
    assert [(e.step, e.value) for e in loss] == [(1, 2.5), (2, 2.25)]
    assert acc.Scalars("train/mtp_ce/1")[0].value == pytest.approx(3.5)
    assert [(e.step, round(e.value, 4)) for e in acc.Scalars("val/perplexity")] == [(1, 7.39)]
    assert "val/split" not in acc.Tags()["scalars"]  # strings are not scalars
    # hparams: the flattened config, linked to the run's loss curves
    meta = acc.SummaryMetadata("_hparams_/session_start_info")
    assert meta.plugin_data.plugin_name == "hparams"
    start = plugin_data_pb2.HParamsPluginData.FromString(meta.plugin_data.content)
    hp = start.session_start_info.hparams
    assert hp["train.lr"].number_value == pytest.approx(0.003)
    assert hp["model.hidden_size"].number_value == 32
    assert hp["model.layer_types"].string_value == '["full", "sliding"]'
    exp = plugin_data_pb2.HParamsPluginData.FromString(
        acc.SummaryMetadata("_hparams_/experiment").plugin_data.content).experiment
    assert {m.name.tag for m in exp.metric_infos} == {"train/loss", "val/loss"}
    # the config as text (an indented markdown code block)
    (text,) = acc.Tensors("config/text_summary")
    body = text.tensor_proto.string_val[0].decode()
    assert all(line.startswith("    ") for line in body.splitlines())
    assert json.loads(body) == CONFIG


def test_resumed_run_hides_the_killed_runs_later_steps(tmp_path):
    killed = _logger(tmp_path)
    for step in range(1, 9):  # logged up to step 8, but the last checkpoint was step 5
        killed.log(_train_record(step, 10.0 + step))
    killed.close()
    resumed = _logger(tmp_path, start_step=5)
    for step in (6, 7):
        resumed.log(_train_record(step, 20.0 + step))
    resumed.close()
    got = [(e.step, e.value) for e in _events(tmp_path).Scalars("train/loss")]
    assert got == [(1, 11.0), (2, 12.0), (3, 13.0), (4, 14.0), (5, 15.0), (6, 26.0), (7, 27.0)]


def test_no_tensorboard_writes_no_event_files(tmp_path):
    log = _logger(tmp_path, tensorboard=False)
    log.log(_train_record(1, 2.5))
    log.close()
    assert not (tmp_path / "tensorboard").exists()
    assert (tmp_path / "metrics.jsonl").read_text().count("\n") == 1


def test_console_lines_at_the_interval_and_every_n_seconds(tmp_path, capsys):
    log = _logger(tmp_path, tensorboard=False, console_every=3, every_s=3600)
    for step in range(1, 7):
        log.log(_train_record(step, 1.0))
    log.close()
    err = capsys.readouterr().err
    assert [line.split(":")[0] for line in err.splitlines()] == ["step 3", "step 6"]
    # With no bar (stderr is not a terminal here), a line once `every_s` has passed.
    log = _logger(tmp_path, tensorboard=False, console_every=1000, every_s=0.0)
    log.log(_train_record(7, 1.0))
    log.close()
    assert capsys.readouterr().err.startswith("step 7: loss 1.0000 ce 0.5000 mtp [1.500, 2.000]")


def test_flat_hparams():
    assert flat_hparams({"a": {"b": 1, "c": {"d": True}}, "e": None, "f": (1, 2), "g": "x"}) == {
        "a.b": 1, "a.c.d": True, "e": "null", "f": "[1, 2]", "g": "x"}
