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
