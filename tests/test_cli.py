import json
import os

import pytest

from fgkeras import cli, configs


def test_demo_smoke_writes_results(tmp_path, capsys):
    out = tmp_path / "demo"
    assert cli.main(["demo", "--smoke", "--out", str(out)]) == 0
    results = json.loads((out / "results.json").read_text())
    methods = [row["method"] for row in results["rows"]]
    assert methods == ["triplet_random", "triplet_batch_hard", "htg"]
    for row in results["rows"]:
        assert 0.0 <= row["recall@1"] <= 1.0 and 0.0 <= row["map@r"] <= 1.0
    printed = capsys.readouterr().out
    assert "| triplet_batch_hard |" in printed
    assert results["config"]["train"]["epochs"] == 2  # --smoke took effect


def test_train_then_evaluate_a_saved_model(tmp_path, capsys):
    out = tmp_path / "run"
    assert cli.main(["train", "--smoke", "--method", "softmax_nobias", "--set", "train.steps_per_epoch=2",
                     "--out", str(out)]) == 0
    assert os.path.exists(out / "model.keras") and os.path.exists(out / "embedder.keras")
    trained = json.loads((out / "results.json").read_text())
    assert trained["config"]["train"]["method"] == "softmax_nobias"
    assert trained["config"]["train"]["steps_per_epoch"] == 2
    capsys.readouterr()
    assert cli.main(["evaluate", "--smoke", "--model", str(out / "model.keras")]) == 0
    printed = capsys.readouterr().out
    # The saved model, reloaded, gives the same recall@1 as right after training.
    assert f"{100 * trained['metrics']['recall@1']:.1f}" in printed


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


def test_unknown_experiment():
    with pytest.raises(ValueError, match="Unknown experiment 'nope'"):
        configs.get_config("nope")
