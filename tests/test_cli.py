import json
import os
import subprocess
import sys
import textwrap

import keras
import pytest

from fgkeras import _native_logs, cli, configs

# Lines written to stderr by TensorFlow 2.20's native libraries during `fgkeras export` and
# `fgkeras demo` on a machine without a GPU driver.
CUINIT = (b"2026-11-26 13:42:50.372704: E external/local_xla/xla/stream_executor/cuda/cuda_platform.cc:51] "
          b"failed call to cuInit: INTERNAL: CUDA error: Failed call to cuInit: UNKNOWN ERROR (303)")
ABSL_NOTICE = b"WARNING: All log messages before absl::InitializeLog() is called are written to STDERR"
ABSL_INFO = (b"I0000 00:00:1795700576.042171    9391 devices.cc:67] Number of eligible GPUs "
             b"(core count >= 8, compute capability >= 0.0): 0")
ABSL_WARNING = b"W0000 00:00:1795700576.226724    9391 tf_tfl_flatbuffer_helpers.cc:364] Ignored output_format."
QUANTIZER = b"fully_quantize: 0, inference_type: 6, input_inference_type: FLOAT32, output_inference_type: FLOAT32"
TFLITE_INFO = b"INFO: Created TensorFlow Lite XNNPACK delegate for CPU."
ABSL_ERROR = b"E0000 00:00:1795700576.226724    9391 flatbuffer_export.cc:12] Could not translate the graph."
TENSORFLOW_ERROR = b"2026-11-26 13:42:50.372704: E tensorflow/core/framework/op_kernel.cc:1857] OP_REQUIRES failed"
ABSL_FATAL = b"F0000 00:00:1795700576.226724    9391 check.cc:5] Check failed: size > 0"


def _table(printed):
    """The Markdown table in `printed`, by columns: {first cell of a row: {header: cell}}."""
    lines = [line.strip() for line in printed.splitlines() if line.startswith("|")]
    cells = [[cell.strip() for cell in line.strip("|").split("|")] for line in lines]
    assert len(cells) >= 3 and set(cells[1]) == {"---"}, printed
    header = cells[0]
    assert all(len(row) == len(header) for row in cells[2:]), printed
    return {row[0]: dict(zip(header, row)) for row in cells[2:]}


def _percent(value):
    return f"{100 * value:.1f}"


def _run(args, **kwargs):
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    return subprocess.run([sys.executable, *args], capture_output=True, env=env, timeout=600, **kwargs)


def test_demo_smoke_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["triplet_random", "triplet_batch_hard", "htg"]
    for row in results["rows"]:
        assert 0.0 <= row["recall@1"] <= 1.0 and 0.0 <= row["map@r"] <= 1.0
    printed = capsys.readouterr().out
    table = _table(printed)
    assert list(table) == methods
    for row in results["rows"]:  # each method's row shows the figures results.json records for it
        for metric in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r"):
            assert table[row["method"]][metric] == _percent(row[metric]), (row["method"], metric)
    assert results["config"]["train"]["epochs"] == 2  # --smoke took effect
    exported = results["export"]
    assert exported["pushed"] and exported["saved_model"].endswith(os.path.join("vehicles", "1"))
    assert os.path.exists(os.path.join(exported["saved_model"], "saved_model.pb"))
    assert os.path.exists(os.path.join(exported["index"], "manifest.json"))
    assert exported["tflite_parity"]["fp32"]["max_abs_diff"] < 1e-4
    assert "TFLite int8:" in printed
    served = results["served"]  # through the real gRPC server and client
    assert len(served["top_ids"]) == 5 and "new-arrival" not in served["top_ids"]
    assert served["top_ids_after_upsert"][0] == "new-arrival"
    assert served["top_scores_after_upsert"][0] > 0.99
    report = os.path.join(str(out), "report", "index.html")  # the demo ends with its report
    assert os.path.isfile(report) and printed.rstrip().endswith(report)


def test_export_refuses_a_worse_model_through_the_gate(tmp_path, capsys):
    run = tmp_path / "run"
    assert cli.main(["train", "--smoke", "--method", "triplet_batch_hard", "--out", str(run)]) == 0
    model = str(run / "model.keras")
    out = str(tmp_path / "deploy")
    assert cli.main(["export", "--smoke", "--model", model, "--out", out, "--name", "cars", "--no-tflite"]) == 0
    assert os.path.isdir(os.path.join(out, "saved_models", "cars", "1"))
    card = json.loads(open(os.path.join(out, "saved_models", "cars", "1", "assets.extra", "model_card.json")).read())
    # A serving version that claims perfect recall: the same model is now worse and is refused.
    card["metrics"]["recall@1"] = 1.0
    with open(os.path.join(out, "saved_models", "cars", "1", "assets.extra", "model_card.json"), "w") as f:
        json.dump(card, f)
    capsys.readouterr()
    assert cli.main(["export", "--smoke", "--model", model, "--out", out, "--name", "cars", "--no-tflite"]) == 1
    assert "Not pushed" in capsys.readouterr().out
    assert not os.path.exists(os.path.join(out, "saved_models", "cars", "2"))


def test_train_then_evaluate_a_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--smoke", "--method", "softmax_nobias", "--set", "train.steps_per_epoch=2",
                     "--out", str(out)]) == 0
    assert os.path.exists(out / "model.keras") and os.path.exists(out / "embedder.keras")
    trained = json.loads((out / "results.json").read_text())
    assert trained["config"]["train"]["method"] == "softmax_nobias"
    assert trained["config"]["train"]["steps_per_epoch"] == 2
    printed_after_training = _table(capsys.readouterr().out)["softmax_nobias"]
    assert printed_after_training["recall@1"] == _percent(trained["metrics"]["recall@1"])
    assert cli.main(["evaluate", "--smoke", "--model", str(out / "model.keras")]) == 0
    printed = capsys.readouterr().out
    # The saved model, reloaded, gives the same recall@1 as right after training.
    (row,) = _table(printed).values()
    assert row["model"] == "model.keras"
    assert row["recall@1"] == _percent(trained["metrics"]["recall@1"])


def test_bad_override_is_a_clear_error(capsys):
    assert cli.main(["train", "--smoke", "--set", "train.epoch=3"]) == 2
    assert "Unknown config key 'train.epoch'" in capsys.readouterr().err


def test_overrides_are_typed():
    config = configs.override(configs.get_config("baseline"),
                              ["train.epochs=3", "train.learning_rate=0.01", "data.augment=false",
                               "model.backbone=mobilenet"])
    assert (config.train.epochs, config.train.learning_rate) == (3, 0.01)
    assert config.data.augment is False and config.model.backbone == "mobilenet"
    with pytest.raises(ValueError, match="Bad value for 'train.epochs'"):
        configs.override(config, ["train.epochs=three"])
    with pytest.raises(ValueError, match="is a section"):
        configs.override(config, ["train=3"])


def test_config_json_round_trip():
    config = configs.override(configs.get_config("cars196"), ["train.epochs=2"])
    again = configs.ExperimentConfig.from_dict(json.loads(config.to_json()))
    assert again == config


def test_a_json_config_file_loads_as_the_config_it_holds(tmp_path):
    config = configs.override(configs.get_config("cars196"), ["train.epochs=2"])
    (tmp_path / "mine.json").write_text(config.to_json())
    assert configs.load_config(str(tmp_path / "mine.json")) == config
    (tmp_path / "list.json").write_text("[1]")
    with pytest.raises(ValueError, match="must hold a JSON object"):
        configs.load_config(str(tmp_path / "list.json"))
    (tmp_path / "typo.json").write_text('{"train": {"epoch": 3}}')
    with pytest.raises(ValueError, match="not an experiment configuration"):
        configs.load_config(str(tmp_path / "typo.json"))
    with pytest.raises(ValueError, match="No configuration file"):
        configs.load_config(str(tmp_path / "missing.json"))


def test_unknown_experiment():
    with pytest.raises(ValueError, match="Unknown experiment 'nope'"):
        configs.get_config("nope")


@pytest.mark.parametrize("line, severity", [
    (CUINIT, 1), (ABSL_NOTICE, 1), (ABSL_INFO, 0), (ABSL_WARNING, 1), (QUANTIZER, 0), (TFLITE_INFO, 0),
    (ABSL_ERROR, 2), (TENSORFLOW_ERROR, 2), (ABSL_FATAL, 3), (b"ERROR: Didn't find op for builtin opcode", 2),
    (b"Traceback (most recent call last):", None), (b"W0000 is not a log line", None),
])
def test_native_log_lines_and_their_severity(line, severity):
    assert _native_logs.severity(line + b"\n") == severity


def test_native_stderr_filter_keeps_errors_even_when_the_process_aborts(tmp_path):
    lines = [CUINIT, ABSL_NOTICE, ABSL_INFO, ABSL_WARNING, QUANTIZER, TFLITE_INFO, ABSL_ERROR, TENSORFLOW_ERROR,
             b"a line of no known format", ABSL_FATAL]
    script = textwrap.dedent(f"""
        import os, sys
        from fgkeras import cli
        with cli._filter_native_stderr():
            print("ours, through Python", file=sys.stderr)
            for line in {lines!r}:
                os.write(2, line + b"\\n")
            os.abort()
    """)
    result = _run(["-c", script], cwd=tmp_path)  # the abort may leave a core file
    assert result.returncode != 0
    assert result.stderr.splitlines() == [
        b"ours, through Python", ABSL_ERROR, TENSORFLOW_ERROR, b"a line of no known format", ABSL_FATAL]


def test_cli_logs_ours_and_only_the_warnings_of_other_libraries():
    script = textwrap.dedent("""
        import logging
        from fgkeras import cli
        cli._configure_logging(verbose=False)
        logging.getLogger("fgkeras.export").info("ours")
        logging.getLogger("absl").info("their info")
        logging.getLogger("tensorflow").warning("their warning")
    """)
    assert _run(["-c", script]).stderr.decode().splitlines() == [
        "INFO fgkeras.export: ours", "WARNING tensorflow: their warning"]


def test_command_line_stderr_has_no_tensorflow_noise(tmp_path):
    model = keras.Sequential([keras.Input((None, None, 3)), keras.layers.Rescaling(1 / 255),
                              keras.layers.GlobalAveragePooling2D()])
    model.save(tmp_path / "tiny.keras")
    result = _run(["-m", "fgkeras.cli", "evaluate", "--smoke", "--model", str(tmp_path / "tiny.keras")],
                  cwd=tmp_path)
    assert result.returncode == 0, result.stderr.decode()
    assert b"| tiny.keras |" in result.stdout
    assert b"cuInit" not in result.stderr
    severities = [_native_logs.severity(line) for line in result.stderr.splitlines()]
    assert all(severity is None or severity >= 2 for severity in severities)


def test_tensorboard_logs_default_to_the_run_directory_unless_log_dir_is_set():
    import argparse

    def config(*assignments):
        return cli._config(argparse.Namespace(config="baseline", method=None, smoke=True, set=list(assignments),
                                              out="runs/mine"))

    assert config("train.tensorboard=true").train.log_dir == os.path.join("runs/mine", "tensorboard")
    assert config("train.log_dir=elsewhere").train.log_dir == "elsewhere"
