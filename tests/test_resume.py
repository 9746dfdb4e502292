"""A run killed with SIGKILL mid-epoch and started again ends with the weights of a run never stopped.

Each test trains a tiny configuration in a child process three times: uninterrupted; with a
backup folder, killed by the parent (SIGKILL) once the child reports step N; and restarted with
the same command. The child saves its final weights to an .npz; they must be equal. The child
stops inside the step-N callback until it is killed, and `train.backup_every_steps=3` checkpoints
after step 3, 6, … and at each epoch's end (4 steps): killed after step N = 7 (or 11), the run
resumes mid-epoch from the checkpoint of step 6 (or 10).
"""

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

CHILD = '''
import json, os, sys, time

import keras
import numpy as np

from fgkeras import configs, experiments

method, backup_dir, out, stop_at = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
config = configs.override(configs.smoke(configs.get_config("viewgan" if method == "viewgan" else "baseline")), [
    f"train.method={method}", "train.epochs=3", "train.warmup_epochs=1", "train.steps_per_epoch=4",
    "data.image_size=32", f"train.backup_dir={backup_dir}", "train.backup_every_steps=3",
    "viewgan.width=8", "viewgan.batch_size=8", "viewgan.instances_per_class=2", "viewgan.id_dim=16",
    "viewgan.noise_dim=16",
    *(["train.variant=GDNS", "train.validation_classes=0"] if method == "fggan" else [])])


class Progress(keras.callbacks.Callback):
    """Records each `fit` (the model trained) and the steps; at step `stop_at` waits to be killed."""

    fits, steps = [], 0

    def on_train_begin(self, logs=None):
        Progress.fits.append(type(self.model).__name__)

    def on_train_batch_end(self, batch, logs=None):
        Progress.steps += 1
        if Progress.steps == stop_at:
            with open(out + ".stopped", "w") as f:
                f.write(str(Progress.steps))
            time.sleep(600)


model, history = experiments.train(config, verbose=0, callbacks=[Progress()])
np.savez(out, *[np.asarray(w) for w in model.weights])
with open(out + ".json", "w") as f:
    json.dump({"fits": Progress.fits, "steps": Progress.steps,
               "val_recall@1": history.history.get("val_recall@1")}, f)
'''


def _command(tmp_path, method, backup_dir, out, stop_at=0):
    script = tmp_path / "child.py"
    if not script.exists():
        script.write_text(CHILD)
    return [sys.executable, str(script), method, str(backup_dir), str(out), str(stop_at)]


def _environment():
    return {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
            "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}


def _run(command, cwd):
    done = subprocess.run(command, env=_environment(), cwd=cwd, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]


def _run_until_killed(command, cwd, marker):
    """Starts `command`, waits for it to write `marker`, SIGKILLs it."""
    child = subprocess.Popen(command, env=_environment(), cwd=cwd, stdout=subprocess.DEVNULL,
                             stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 600
    while not os.path.exists(marker):
        if child.poll() is not None:
            pytest.fail(f"the child ended before the kill: {child.stderr.read()[-3000:]}")
        assert time.monotonic() < deadline, "the child never reached the step to kill it at"
        time.sleep(0.2)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    assert child.returncode == -signal.SIGKILL


def _weights(path):
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


def _report(path):
    with open(f"{path}.json", encoding="utf-8") as f:
        return json.load(f)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """`method -> (weights, report)` of an uninterrupted run with the same seed, run once per method."""
    runs = {}

    def run(method):
        if method not in runs:
            folder = tmp_path_factory.mktemp(f"uninterrupted_{method}")
            _run(_command(folder, method, "", folder / "final.npz"), folder)
            runs[method] = (_weights(folder / "final.npz"), _report(folder / "final.npz"))
        return runs[method]

    return run


def _kill_and_resume(tmp_path, method, stop_at):
    """Trains with a backup folder, kills the run after step `stop_at`, restarts it to the end.

    Returns `(final weights, report of the restarted run, what the backup folder held after the kill)`.
    """
    backup, out = tmp_path / "backup", tmp_path / "final.npz"
    _run_until_killed(_command(tmp_path, method, backup, out, stop_at), tmp_path, f"{out}.stopped")
    left = sorted(os.path.relpath(os.path.join(parent, name), backup)
                  for parent, folders, files in os.walk(backup) for name in folders + files)
    _run(_command(tmp_path, method, backup, out), tmp_path)
    assert not backup.exists()  # removed when the run ends
    return _weights(out), _report(out), left


def _assert_same_weights(resumed, uninterrupted):
    assert len(resumed) == len(uninterrupted)
    for mine, theirs in zip(resumed, uninterrupted):
        np.testing.assert_allclose(mine, theirs, rtol=1e-6, atol=1e-7)


def test_a_baseline_killed_mid_epoch_resumes_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    """Batch-hard triplet baseline, killed after step 7 of 12 (epoch 2 of 3), resumed from step 6.

    Mutations tried (each makes this test fail): no step-indexed start of the stream in
    `fit_resumable` (`start = 0`: the resumed run trains on the stream's first batches again, as
    Keras's own `BackupAndRestore` does; max |Δw| 0.88); no passing over of the epoch's steps done
    before the checkpoint (`ResumableBackup._pass_over` a no-op: 2 extra steps).
    """
    weights, report, left = _kill_and_resume(tmp_path, "triplet_batch_hard", stop_at=7)
    assert left[0].startswith("step-000000006-epoch-000001")  # mid-epoch: epoch 2, 2 of its 4 steps done
    expected, expected_report = uninterrupted("triplet_batch_hard")
    _assert_same_weights(weights, expected)
    # The held-out evaluations after the resume are those of the uninterrupted run's epochs 2 and 3.
    assert report["val_recall@1"] == expected_report["val_recall@1"][1:]


def test_htg_killed_in_its_game_resumes_in_the_game_to_the_uninterrupted_weights(tmp_path, uninterrupted):
    """HTG (basic model: 1 epoch, game: 2 epochs of 4 steps), killed after the game's step 7.

    The restarted run must not train the basic model again (its `fit` calls are the game's only)
    and must restore F, G, D and the three optimizers and the random triplets' generator state.
    Mutations tried (each makes this test fail): `start = 0` in `fit_resumable`; not restoring the
    seed-generator states (`ResumableBackup.on_train_begin` without its `seeds.npz` loop: other
    random triplets after the resume); ignoring the `warmup.done` mark (the phase assertion).
    """
    weights, report, left = _kill_and_resume(tmp_path, "htg", stop_at=4 + 7)
    assert "warmup.done.weights.h5" in left and any(p.startswith("game/step-000000006-epoch-000001") for p in left)
    assert report["fits"] == ["HardTripletGAN"]
    _assert_same_weights(weights, uninterrupted("htg")[0])


def test_htg_killed_in_its_warmup_resumes_the_basic_model_then_plays_the_game(tmp_path, uninterrupted):
    """HTG killed after step 4 of its basic model's 4 (checkpoint of step 3, mid-epoch).

    Mutations tried (each makes this test fail): `start = 0` in `fit_resumable`.
    """
    weights, report, left = _kill_and_resume(tmp_path, "htg", stop_at=4)
    assert left[0] == "warmup" and "warmup.done.weights.h5" not in left
    assert any(p.startswith("warmup/step-000000003-epoch-000000") for p in left)
    assert report["fits"] == ["MetricLearner", "HardTripletGAN"]
    _assert_same_weights(weights, uninterrupted("htg")[0])


def test_viewgan_killed_mid_epoch_restores_both_players_and_their_optimizers(tmp_path, uninterrupted):
    """ViewGAN (G and D, one optimizer each), killed after step 7 of 12, resumed from step 6.

    The checkpoint holds both optimizers' states (read from its weights file), and the resumed
    run ends with the uninterrupted weights. Mutations tried: `start = 0` in `fit_resumable` makes
    it fail. `view_pairs` drawing from one random generator across iterations (as it did before)
    does not: each process iterates the stream once here, so the restarted process's stream
    already starts from the seed; the fix matters where one process starts the stream twice.
    """
    weights, _, left = _kill_and_resume(tmp_path, "viewgan", stop_at=7)
    assert left[0] == "step-000000006-epoch-000001"
    _assert_same_weights(weights, uninterrupted("viewgan")[0])


@pytest.mark.slow  # ~65 s of CPU more: the default suite keeps ViewGAN as its game beyond HTG
def test_fggan_killed_mid_epoch_restores_its_four_players_and_their_optimizers(tmp_path, uninterrupted):
    """FGGAN's GDNS game (G, D, N, S, one optimizer each), killed after step 7 of 12, resumed from step 6.

    S is pre-trained before the game and cached (`fggan.cache_dir`, under each run's working
    folder here): the uninterrupted and the killed run train it, the restarted run reads it.
    Mutations tried: `start = 0` in `fit_resumable` (the resumed game trains on the stream's
    first pairs again).
    """
    weights, _, left = _kill_and_resume(tmp_path, "fggan", stop_at=7)
    assert left[0] == "step-000000006-epoch-000001"
    _assert_same_weights(weights, uninterrupted("fggan")[0])


def test_a_checkpoint_holds_every_optimizer_and_is_replaced_whole(tmp_path):
    """One checkpoint folder at a time, renamed into place, with each optimizer's step count."""
    import keras

    from fgkeras import configs, experiments
    from fgkeras.models import HardTripletGAN

    config = configs.override(configs.smoke(configs.get_config("baseline")), [
        "train.method=htg", "train.epochs=2", "train.warmup_epochs=1", "train.steps_per_epoch=2",
        "train.validation_classes=0", f"train.backup_dir={tmp_path / 'backup'}", "train.backup_every_steps=1"])
    seen = []

    class Look(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            folder = tmp_path / "backup" / "game"
            if folder.exists():
                seen.append(sorted(os.listdir(folder)))

    class Stop(Exception):
        pass

    class StopAtTheEnd(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if isinstance(self.model, HardTripletGAN) and batch == 1:
                raise Stop

    with pytest.raises(Stop):
        experiments.train(config, verbose=0, callbacks=[Look(), StopAtTheEnd()])
    assert seen == [["step-000000001-epoch-000000"]]
    checkpoint = tmp_path / "backup" / "game" / "step-000000001-epoch-000000" / "model.weights.h5"
    with h5py.File(checkpoint, "r") as f:
        for player in ("f_optimizer", "g_optimizer", "d_optimizer"):
            assert int(np.asarray(f[player]["vars"]["0"])) == 1  # its iterations: one step taken


def test_backup_every_steps_must_be_a_non_negative_integer(tmp_path):
    from fgkeras import configs, experiments

    config = configs.override(configs.smoke(configs.get_config("baseline")), [
        f"train.backup_dir={tmp_path / 'backup'}", "train.backup_every_steps=-1"])
    with pytest.raises(ValueError, match=r"`backup_every_steps` \(`train.backup_every_steps`\) must be an integer >= 0"):
        experiments.train(config, verbose=0)
