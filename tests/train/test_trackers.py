"""`report_to`: a tiny run logged to TensorBoard, W&B (offline), MLflow (a local sqlite store) and CSV, each
read back with the tracker's own library: the resolved configuration as hyperparameters, every metric of
metrics.jsonl at its step with its value, the run closed as finished, failed or killed; and a tracker
whose package is missing refused before anything is written."""

import csv
import json
import os
import signal
import struct
import sys
import threading
import time
from pathlib import Path

import pytest
import yaml
from tiny import init_tiny_model_dir

import bumblecore
from bumblecore.args import OutputArgs
from bumblecore.cli import main
from bumblecore.train.monitor import Monitor, read_history

pytest.importorskip("wandb")
pytest.importorskip("mlflow")

DEMO = Path(bumblecore.__file__).parent / "demo_data"


@pytest.fixture(scope="module")
def model_and_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("tracked")
    lines = (DEMO / "pretrain.jsonl").read_text(encoding="utf-8").splitlines()[:24]
    (root / "text.jsonl").write_text("\n".join(lines) + "\n", encoding="utf-8")
    return init_tiny_model_dir(str(root / "model")), root / "text.jsonl"


@pytest.fixture(scope="module")
def mlflow_uri(tmp_path_factory):
    """One sqlite store for the module: creating its schema takes seconds."""
    return f"sqlite:///{tmp_path_factory.mktemp('mlflow') / 'mlflow.db'}"


@pytest.fixture
def offline_trackers(tmp_path, monkeypatch, mlflow_uri):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wandb_dir"))
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    (tmp_path / "wandb_dir").mkdir()
    return tmp_path


def train(output_dir, model_and_data, **keys):
    model, data = model_and_data
    config = {
        "training_stage": "pretrain",
        "model_name_or_path": str(model),
        "dataset_path": str(data),
        "output_dir": str(output_dir),
        "cutoff_len": 64,
        "max_steps": 4,
        "train_micro_batch_size_per_gpu": 2,
        "gradient_accumulation_steps": 1,
        "train_model_precision": "fp32",
        "save_steps": 100,
        **keys,
    }
    file = Path(output_dir).parent / f"{Path(output_dir).name}.yaml"
    file.write_text(yaml.safe_dump(config))
    main(["train", "--config", str(file)])


def wandb_records(run_dir: Path) -> list:
    """The records of an offline run's .wandb file, decoded with wandb's own protobuf messages. The file is
    a LevelDB-style log (wandb's store): a 7-byte header, then 32 KiB blocks of chunks, each with a 7-byte
    header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data = next(run_dir.glob("run-*.wandb")).read_bytes()
    assert data[:4] == b":W&B"
    records, pending, position = [], b"", 7
    while position + 7 <= len(data):
        left_in_block = 32768 - position % 32768
        _, length, kind = struct.unpack("<IHB", data[position : position + 7])
        if left_in_block < 7 or kind == 0:  # a block's zero-filled tail
            position += left_in_block
            continue
        pending += data[position + 7 : position + 7 + length]
        position += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(pending)
            records.append(record)
            pending = b""
    return records


def series_of(history: list[dict]) -> dict:
    """metrics.jsonl as {tracker name: [(step, value), ...]}: `loss` is train/loss, `eval/loss` stays."""
    series = {}
    for record in history:
        for key, value in record.items():
            if key != "step":
                series.setdefault(key if "/" in key else f"train/{key}", []).append((record["step"], value))
    return series


def test_report_to_resolves_the_original_switch_and_other_spellings():
    def resolved(report_to=("tensorboard",), use_tensorboard=None):
        return OutputArgs(report_to=report_to, use_tensorboard=use_tensorboard).report_to

    assert OutputArgs().report_to == resolved() == ["tensorboard"]  # the default
    assert resolved(use_tensorboard=False) == [] and resolved(["csv"], use_tensorboard=True) == ["tensorboard", "csv"]
    assert resolved("wandb, mlflow") == ["wandb", "mlflow"] and resolved("none") == resolved(None) == []
    assert resolved(["CSV", "csv", "wandb"]) == ["csv", "wandb"]
    with pytest.raises(ValueError, match="report_to 'neptune' is not one of tensorboard, wandb, mlflow, swanlab, csv"):
        resolved(["neptune"])


def test_every_tracker_reads_back_the_runs_config_and_metrics(offline_trackers, model_and_data, mlflow_uri):
    from mlflow.tracking import MlflowClient
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    from tensorboard.plugins.hparams import plugin_data_pb2

    out = offline_trackers / "run"
    train(
        out,
        model_and_data,
        eval_dataset_path=str(model_and_data[1]),
        eval_steps=2,
        report_to=["tensorboard", "wandb", "mlflow", "csv"],
        run_name="tracked",
        tracker_project="trackers-test",
    )
    history = read_history(out / "metrics.jsonl")
    expected = series_of(history)
    resolved = yaml.safe_load((out / "training_args.yaml").read_text(encoding="utf-8"))
    assert [step for step, _ in expected["train/loss"]] == [1, 2, 3, 4]
    assert [step for step, _ in expected["eval/loss"]] == [0, 2, 4]

    # MLflow: the run, its parameters and every metric's history, through MlflowClient.
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trackers-test").experiment_id])
    assert run.info.status == "FINISHED" and run.info.run_name == "tracked"
    scalars = {k: str(v) for k, v in resolved.items() if isinstance(v, (str, int, float, bool)) or v is None}
    assert {k: run.data.params[k] for k in scalars} == scalars
    for key, points in expected.items():
        logged = sorted((m.step, m.value) for m in client.get_metric_history(run.info.run_id, key))
        assert logged == points, key

    # W&B (offline): the run file's records.
    (run_dir,) = (offline_trackers / "wandb_dir" / "wandb").glob("offline-run-*")
    records = wandb_records(run_dir)
    kinds = [r.WhichOneof("record_type") for r in records]
    run_record = records[kinds.index("run")].run
    assert (run_record.display_name, run_record.project) == ("tracked", "trackers-test")
    config = {u.key: json.loads(u.value_json) for r in records if r.HasField("config") for u in r.config.update}
    assert {k: config[k] for k in resolved} == resolved
    logged = {}
    for r in records:
        if r.HasField("history"):
            row = {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
            for key, value in row.items():
                if not key.startswith(("_", "trainer/")):
                    logged.setdefault(key, []).append((row["trainer/global_step"], value))
    assert logged == expected
    assert records[kinds.index("exit")].exit.exit_code == 0

    # TensorBoard: the scalars (float32) and the configuration in the HParams plugin.
    events = EventAccumulator(str(out / "runs"))
    events.Reload()
    for key, points in expected.items():
        scalars = events.Scalars(key)
        assert [e.step for e in scalars] == [step for step, _ in points], key
        assert [e.value for e in scalars] == pytest.approx([value for _, value in points], rel=1e-6), key
    content = plugin_data_pb2.HParamsPluginData.FromString(
        events.PluginTagToContent("hparams")["_hparams_/session_start_info"]
    )
    assert content.session_start_info.hparams["learning_rate"].number_value == resolved["learning_rate"]
    assert content.session_start_info.hparams["training_stage"].string_value == "pretrain"

    # CSV: one row per record, a column per metric.
    with open(out / "csv" / "metrics.csv", newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    from_csv = {}
    for row in rows:
        for key, value in row.items():
            if key != "step" and value != "":
                from_csv.setdefault(key, []).append((int(row["step"]), float(value)))
    assert from_csv == expected


def test_a_failing_run_is_marked_failed(offline_trackers, model_and_data, mlflow_uri, capsys):
    from mlflow.tracking import MlflowClient

    out = offline_trackers / "diverges"
    # A learning rate this large makes the loss non-finite after the first update: the engine stops the run.
    with pytest.raises(SystemExit):
        train(out, model_and_data, learning_rate=1e30, report_to="wandb,mlflow", tracker_project="trackers-failed")
    assert "stopped before that step's optimiser update" in capsys.readouterr().err  # the engine's stop
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("trackers-failed").experiment_id])
    assert run.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == [
        r["step"] for r in read_history(out / "metrics.jsonl") if "loss" in r
    ]
    (run_dir,) = (offline_trackers / "wandb_dir" / "wandb").glob("offline-run-*")
    assert [r.exit.exit_code for r in wandb_records(run_dir) if r.HasField("exit")] == [1]


def test_an_interrupted_run_is_marked_killed(offline_trackers, mlflow_uri):
    from mlflow.tracking import MlflowClient

    monitor = Monitor(
        offline_trackers / "interrupted", ["mlflow"], hyperparameters={"seed": 1}, tracker_project="killed"
    )
    monitor.log({"step": 1, "loss": 2.5})
    monitor.close(error=KeyboardInterrupt())
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("killed").experiment_id])
    assert run.info.status == "KILLED" and run.data.params == {"seed": "1"} and run.data.metrics == {"train/loss": 2.5}


def test_a_run_stopped_by_sigterm_is_marked_killed(tmp_path, model_and_data, mlflow_uri, monkeypatch):
    from mlflow.tracking import MlflowClient

    monkeypatch.setenv("MLFLOW_TRACKING_URI", mlflow_uri)
    out = tmp_path / "stopped"
    metrics = out / "metrics.jsonl"

    finished = threading.Event()

    def stop_after_two_steps():  # as a scheduler would: SIGTERM to the training process
        while not finished.is_set() and (not metrics.exists() or len(metrics.read_text().splitlines()) < 2):
            time.sleep(0.05)
        if not finished.is_set():
            os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=stop_after_two_steps, daemon=True).start()
    try:
        with pytest.raises(SystemExit) as stop:
            train(out, model_and_data, max_steps=100000, report_to="mlflow,csv", tracker_project="stopped")
    finally:
        finished.set()
    assert stop.value.code == 128 + signal.SIGTERM
    client = MlflowClient(mlflow_uri)
    (run,) = client.search_runs([client.get_experiment_by_name("stopped").experiment_id])
    logged = [r["step"] for r in read_history(metrics)]
    assert run.info.status == "KILLED" and len(logged) >= 2
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == logged
    with open(out / "csv" / "metrics.csv", newline="", encoding="utf-8") as f:
        assert [int(row["step"]) for row in csv.DictReader(f)] == logged  # flushed on the way out


@pytest.mark.parametrize("tracker", ["wandb", "mlflow"])
def test_a_missing_tracker_package_is_refused_before_anything_is_written(
    tmp_path, model_and_data, monkeypatch, capsys, tracker
):
    monkeypatch.setitem(sys.modules, tracker, None)  # `import <tracker>` fails as if it were not installed
    with pytest.raises(SystemExit):
        train(tmp_path / "out", model_and_data, report_to=[tracker])
    assert f"report_to {tracker}: the {tracker} package is not installed; pip install 'bumblecore[{tracker}]'" in (
        capsys.readouterr().err
    )
    assert not (tmp_path / "out").exists()


def swanlab_run(logdir: Path) -> tuple[dict, dict, dict]:
    """A local SwanLab run read back from its own files: (experiment row of runs.swanlab, the config of
    files/config.yaml, {metric: [(step, value), ...]} from logs/<tag folder>/*.log)."""
    import sqlite3

    with sqlite3.connect(logdir / "runs.swanlab") as db:  # swanboard's store: experiments, their tags
        db.row_factory = sqlite3.Row
        (experiment,) = [dict(row) for row in db.execute("SELECT * FROM experiment")]
        project = db.execute("SELECT name FROM project WHERE id = ?", (experiment["project_id"],)).fetchone()[0]
        tags = db.execute("SELECT name, folder FROM tag WHERE experiment_id = ?", (experiment["id"],)).fetchall()
    run_dir = logdir / experiment["run_id"]
    config = {k: v["value"] for k, v in yaml.safe_load((run_dir / "files" / "config.yaml").read_text()).items()}
    metrics = {}
    for name, folder in tags:
        lines = [json.loads(line) for log in sorted((run_dir / "logs" / folder).glob("*.log")) for line in log.open()]
        metrics[name] = [(line["index"], line["data"]) for line in lines]
    return {**experiment, "project": project}, config, metrics


def test_swanlab_reads_back_the_runs_config_and_metrics(tmp_path, model_and_data, monkeypatch):
    pytest.importorskip("swanlab")
    monkeypatch.setenv("SWANLAB_MODE", "local")  # no upload: the run's files and swanboard's database
    monkeypatch.delenv("SWANLAB_LOG_DIR", raising=False)  # swanlab sets it in-process: gone after the test
    out = tmp_path / "run"
    train(out, model_and_data, eval_dataset_path=str(model_and_data[1]), eval_steps=2, report_to="swanlab",
          run_name="tracked", tracker_project="trackers-test")  # fmt: skip
    expected = series_of(read_history(out / "metrics.jsonl"))
    resolved = yaml.safe_load((out / "training_args.yaml").read_text(encoding="utf-8"))
    experiment, config, metrics = swanlab_run(out / "swanlog")
    assert (experiment["name"], experiment["project"], experiment["status"]) == ("tracked", "trackers-test", 1)
    assert {k: config[k] for k in resolved} == resolved
    assert metrics == expected

    # An interrupted run is finished as crashed, with its reason. (swanlab 0.5.9's local mode hands swanboard
    # no error, so its database says 1 (success) either way; the reason is in the run's console/error.log.)
    monitor = Monitor(tmp_path / "interrupted", ["swanlab"], hyperparameters={"seed": 1}, tracker_project="killed")
    monitor.log({"step": 1, "loss": 2.5})
    monitor.close(error=KeyboardInterrupt())
    experiment, config, metrics = swanlab_run(tmp_path / "interrupted" / "swanlog")
    assert config["seed"] == 1 and metrics == {"train/loss": [(1, 2.5)]}
    errors = tmp_path / "interrupted" / "swanlog" / experiment["run_id"] / "console" / "error.log"
    assert "the run killed" in errors.read_text() and "error.log" not in {p.name for p in (out / "swanlog").rglob("*")}
