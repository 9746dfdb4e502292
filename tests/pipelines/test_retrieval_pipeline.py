"""The retrieval pipeline at smoke size on a CSV of synthetic vehicles, in the main environment (the
gallery embedded in process: no Beam needed).

One root is run to completion once (after a run killed in its train step); every other test works on
a copy of it, so that each sees the same starting point.
"""

import glob
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import textwrap

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from PIL import Image  # noqa: E402

pytest.importorskip(
    "tensorflow_serving",
    reason="the pipeline runs in the main environment (its export writes TF Serving warmup requests); in the "
           "Beam environment, which has no serving stack, only its Beam step runs (test_embed_gallery.py)")

from fgkeras import cli, configs, experiments  # noqa: E402
from fgkeras.data import SyntheticVehicles  # noqa: E402
from fgkeras.export import list_versions, model_record  # noqa: E402
from fgkeras.index import Index  # noqa: E402
from pipelines import retrieval_pipeline  # noqa: E402
from pipelines.retrieval_pipeline import STEPS  # noqa: E402

REPOSITORY = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
NAME = "baseline"


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    """The smoke-sized synthetic vehicles written as image files and a labels.csv (splits train / unseen)."""
    data = configs.smoke(configs.get_config(NAME)).data
    root = tmp_path_factory.mktemp("source")
    return SyntheticVehicles(seed=data.seed, image_size=data.image_size, num_makes=data.num_makes,
                             models_per_make=data.models_per_make, images_per_class=data.images_per_class,
                             ).write_image_folder(str(root), splits=("train", "unseen"))


def _assignments(source, *more):
    return ["data.source=csv", f"data.path={source}", "data.test_split=unseen", *more]


def _run(source, root, *more):
    config, settings = retrieval_pipeline.load_config(NAME, _assignments(source, *more), smoke=True)
    results = retrieval_pipeline.run(config, root, settings, verbose=0)
    assert [r.step for r in results] == list(STEPS)
    return {r.step: r for r in results}


def _statuses(results):
    return {step: result.status for step, result in results.items()}


def _run_killed_in_train(source, root):
    """Runs the pipeline in a process that SIGKILLs itself in the train step, once model.keras is written."""
    script = textwrap.dedent(f"""
        import os, signal
        from fgkeras import experiments
        from pipelines import retrieval_pipeline

        def killed(*args, **kwargs):
            os.kill(os.getpid(), signal.SIGKILL)

        experiments.save_embedder = killed   # train saves model.keras, then the embedder
        config, settings = retrieval_pipeline.load_config({NAME!r}, {_assignments(source)!r}, smoke=True)
        retrieval_pipeline.run(config, {str(root)!r}, settings, verbose=0)
    """)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPOSITORY, os.environ.get("PYTHONPATH", "")])}
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def completed(source, tmp_path_factory):
    """A root whose first run was killed halfway through train, then run to the end."""
    root = tmp_path_factory.mktemp("pipeline") / "root"
    killed = _run_killed_in_train(source, root)
    after_kill = {
        "returncode": killed.returncode, "stderr": killed.stderr.decode(errors="replace")[-2000:],
        "ingest_manifest": os.path.isfile(root / "ingest" / "manifest.json"),
        "train_dir": os.path.exists(root / "train"),
        "staged_models": glob.glob(str(root / ".train.tmp-*" / "model.keras")),
    }
    results = _run(source, root)
    return {"root": root, "after_kill": after_kill, "results": results}


@pytest.fixture
def copy(completed, tmp_path):
    """A copy of the completed root (its serving root inside it)."""
    target = tmp_path / "root"
    shutil.copytree(completed["root"], target)
    return target


def test_a_step_killed_halfway_leaves_nothing_that_looks_complete(completed):
    after_kill, results, root = completed["after_kill"], completed["results"], completed["root"]
    assert after_kill["returncode"] == -9, after_kill["stderr"]
    assert after_kill["ingest_manifest"]            # the step before finished
    assert after_kill["staged_models"]              # train was killed halfway: model.keras written, staged
    assert not after_kill["train_dir"]              # and nothing at root/train
    # The next run keeps the finished step, redoes the killed one and what follows, and cleans up.
    assert _statuses(results) == {"ingest": "skipped", **{step: "ran" for step in STEPS[1:]}}
    assert not glob.glob(str(root / ".*.tmp-*"))


def test_a_full_run_writes_every_artefact_and_a_served_version_with_its_index(completed, copy):
    root, results = completed["root"], completed["results"]
    for step in STEPS:
        manifest = retrieval_pipeline.read_manifest(root / step)
        assert manifest["step"] == step and manifest["seconds"] >= 0 and manifest["config"]["experiment"]
        for relative, entry in manifest["outputs"]["files"].items():  # every output listed, by content
            assert os.path.getsize(root / step / relative) == entry["bytes"], (step, relative)
    for path in ("ingest/train.csv", "ingest/gallery.csv", "train/model.keras", "train/embedder.keras",
                 "evaluate/metrics.json", "bless/blessing.json", f"export/{NAME}/0/saved_model.pb",
                 "embed_gallery/embeddings/embeddings-00000-of-00001.tfrecord",
                 "embed_gallery/dead_letter/dead_letter-00000-of-00001.jsonl", "index/index/manifest.json",
                 "push/push.json"):
        assert os.path.isfile(root / path), path
    assert retrieval_pipeline.read_manifest(root / "train")["inputs"]["artefacts"].keys() == {"ingest:train"}
    embedding = retrieval_pipeline.read_manifest(root / "embed_gallery")["metrics"]
    assert embedding["method"] == ("beam" if importlib.util.find_spec("apache_beam") else "in_process")
    gallery_images = results["ingest"].manifest["metrics"]["gallery_images"]
    assert embedding["embedded"] == gallery_images and embedding["dead_letters"] == 0

    # The served layout: version 1 and its own index, which records that version (what the server pairs).
    model_root = root / "serving" / "saved_models" / NAME
    index_dir = root / "serving" / "indexes" / NAME / "1"
    assert list_versions(str(model_root)) == [1]
    index = Index.load(str(index_dir))
    assert index.metadata["model"] == model_record(str(model_root / "1"), NAME, 1)
    assert len(index) == gallery_images
    assert retrieval_pipeline.served(list(results.values()), str(root / "serving")) == (
        str(model_root / "1"), str(index_dir))
    card = json.loads((model_root / "1" / "assets.extra" / "model_card.json").read_text())
    assert card["metrics"]["recall@1"] == results["evaluate"].manifest["metrics"]["recall@1"]

    # The gRPC server serves the version with that index: a gallery image finds itself first (on a
    # copy: the query upserts an item into the served index).
    item = index.ids[0]
    image = np.asarray(Image.open(root / "ingest" / item).convert("RGB"))
    answer = experiments.serve_and_query(str(copy / "serving" / "saved_models" / NAME),
                                         str(copy / "serving" / "indexes" / NAME), image)
    assert answer["top_ids"][0] == item and answer["top_scores"][0] > 0.99


def test_a_second_run_skips_every_step(source, copy):
    before = {step: retrieval_pipeline.read_manifest(copy / step) for step in STEPS}
    results = _run(source, copy)
    assert _statuses(results) == {step: "skipped" for step in STEPS}
    assert {step: retrieval_pipeline.read_manifest(copy / step) for step in STEPS} == before
    assert list_versions(str(copy / "serving" / "saved_models" / NAME)) == [1]


def test_a_new_threshold_reruns_bless_alone_when_it_blesses_as_before(source, copy):
    results = _run(source, copy, "pipeline.threshold=0.5")
    assert _statuses(results) == {**{step: "skipped" for step in STEPS}, "bless": "ran"}
    assert results["bless"].manifest["inputs"]["config"]["pipeline.threshold"] == 0.5
    assert results["bless"].manifest["metrics"]["baseline_version"] == 1  # judged against the served version


def test_a_new_gate_metric_reruns_from_bless_and_pushes_a_new_version(source, copy):
    results = _run(source, copy, "pipeline.metric=map@r")
    before_bless = ("ingest", "train", "evaluate")
    assert _statuses(results) == {step: "skipped" if step in before_bless else "ran" for step in STEPS}
    assert results["push"].manifest["metrics"]["version"] == 2
    assert list_versions(str(copy / "serving" / "saved_models" / NAME)) == [1, 2]
    index = Index.load(str(copy / "serving" / "indexes" / NAME / "2"))
    assert index.metadata["model"]["version"] == 2


def test_a_candidate_worse_than_the_served_version_blocks_the_steps_after_bless(source, copy, capsys):
    card_path = copy / "serving" / "saved_models" / NAME / "1" / "assets.extra" / "model_card.json"
    card = json.loads(card_path.read_text())
    card["metrics"]["recall@1"] = 1.0  # the served version now claims perfect recall
    card_path.write_text(json.dumps(card))
    arguments = [arg for assignment in _assignments(source, "pipeline.threshold=0.01") for arg in ("--set", assignment)]
    assert cli.main(["pipeline", "run", NAME, "--smoke", "--root", str(copy), *arguments]) == 1
    printed = capsys.readouterr().out
    assert "| bless | ran |" in printed and "not blessed" in printed
    for step in ("export", "embed_gallery", "index", "push"):
        assert f"| {step} | blocked |" in printed
    assert list_versions(str(copy / "serving" / "saved_models" / NAME)) == [1]


def test_a_changed_gallery_file_reruns_from_ingest_but_not_train(source, copy, tmp_path):
    moved = tmp_path / "source"
    shutil.copytree(os.path.dirname(source), moved)  # the same files: nothing reruns
    csv = str(moved / "labels.csv")
    results = _run(csv, copy)
    assert _statuses(results)["ingest"] == "ran" and _statuses(results)["train"] == "skipped"
    assert _statuses(results)["evaluate"] == "skipped"  # the same content: the same gallery artefact
    gallery = sorted(glob.glob(str(moved / "images" / "*" / "unseen_*.png")))[0]
    pixels = np.asarray(Image.open(gallery)).copy()
    pixels[0, 0] = 255 - pixels[0, 0]
    Image.fromarray(pixels).save(gallery)
    statuses = _statuses(_run(csv, copy))
    assert (statuses["ingest"], statuses["train"], statuses["evaluate"]) == ("ran", "skipped", "ran")


def test_a_tampered_artefact_is_redone_and_the_steps_after_it_are_kept(source, copy):
    metrics = copy / "evaluate" / "metrics.json"
    metrics.write_text(metrics.read_text().replace('"recall@1": ', '"recall@1": 1e-9 + '))  # not what it listed
    results = _run(source, copy)
    assert _statuses(results) == {**{step: "skipped" for step in STEPS}, "evaluate": "ran"}
    json.loads(metrics.read_text())  # written again, whole; the same figures, so bless and after keep theirs


def test_a_step_that_raises_halfway_leaves_no_artefact_and_is_redone(source, copy, monkeypatch):
    shutil.rmtree(copy / "index")  # as if it had never run

    def save_halfway(index, directory):
        os.makedirs(directory)
        with open(os.path.join(directory, "embeddings.npy"), "wb") as f:
            f.write(b"\x93NUMPY half")
        raise RuntimeError("disk full")

    with monkeypatch.context() as patched:
        patched.setattr(Index, "save", save_halfway)
        with pytest.raises(RuntimeError, match="disk full"):
            _run(source, copy)
    assert not os.path.exists(copy / "index")
    assert not glob.glob(str(copy / ".*.tmp-*"))
    results = _run(source, copy)
    assert _statuses(results)["index"] == "ran" and _statuses(results)["embed_gallery"] == "skipped"
    assert os.path.isfile(copy / "index" / "index" / "manifest.json")


def test_the_cli_runs_the_pipeline_from_a_name_or_a_json_file(source, copy, tmp_path, capsys):
    assert cli.main(["pipeline", "run", NAME, "--smoke", "--root", str(copy),
                     *[arg for assignment in _assignments(source) for arg in ("--set", assignment)]]) == 0
    printed = capsys.readouterr().out
    rows = [line.split("|")[1:3] for line in printed.splitlines() if line.startswith("| ") and "---" not in line]
    assert [(step.strip(), status.strip()) for step, status in rows[1:]] == [(step, "skipped") for step in STEPS]
    assert f"fgkeras serve --model-dir {copy / 'serving' / 'saved_models' / NAME}" in printed

    config, _ = retrieval_pipeline.load_config(NAME, _assignments(source), smoke=True)
    path = tmp_path / "experiment.json"
    path.write_text(json.dumps({**config.to_dict(), "pipeline": {"threshold": 0.25}}))
    assert cli.main(["pipeline", "run", str(path), "--root", str(copy)]) == 0
    manifest = retrieval_pipeline.read_manifest(copy / "bless")
    assert manifest["inputs"]["config"]["pipeline.threshold"] == 0.25  # the file's pipeline section
    assert retrieval_pipeline.read_manifest(copy / "train")["step"] == "train"
    assert "| train | skipped |" in capsys.readouterr().out  # the same experiment as the name and --set gave

    assert cli.main(["pipeline", "run", NAME, "--root", str(copy), "--set", "pipeline.nope=1"]) == 2
    assert "Unknown config key 'nope'" in capsys.readouterr().err


def test_pipeline_run_help(capsys):
    with pytest.raises(SystemExit) as exit_info:
        cli.main(["pipeline", "run", "--help"])
    assert exit_info.value.code == 0
    printed = capsys.readouterr().out
    assert "CONFIG" in printed and "--root" in printed and "--serving-root" in printed and "--set" in printed


@pytest.mark.skipif(not os.environ.get("FGKERAS_BEAM_PYTHON"),
                    reason="FGKERAS_BEAM_PYTHON (the Python of the Beam environment, docs/scale_out.md) is not set")
def test_the_beam_environment_embeds_the_gallery_as_in_process_embedding_does(source, completed, copy):
    from pipelines import embedding_records

    results = _run(source, copy, f"pipeline.beam_python={os.environ['FGKERAS_BEAM_PYTHON']}")
    assert _statuses(results)["embed_gallery"] == "ran" and _statuses(results)["export"] == "skipped"
    assert results["embed_gallery"].manifest["metrics"]["method"] == "beam_python"

    def embeddings(root):
        return embedding_records.read_embedding_files(glob.glob(str(root / "embed_gallery" / "embeddings" / "*")))

    (beam_ids, beam_vectors), (ids, vectors) = embeddings(copy), embeddings(completed["root"])
    assert beam_ids == ids
    np.testing.assert_allclose(beam_vectors, vectors, atol=1e-5)
