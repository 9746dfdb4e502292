"""`train.distribute=multi_worker`: 2 real worker processes on 127.0.0.1 give one device's weights.

Each worker is a child process with its own `TF_CONFIG` (worker 0 is the chief) that runs
`experiments.train` on the P×K stream for a few steps; a third process trains the same config on
one device. Keras's `fit` distributes the stream with `tf.data` auto-sharding, which for a stream
that reads no files shards by data: every worker builds the whole global batch and keeps its
slice, so the two workers together train on exactly the single device's images.

The backbone's batch norms are frozen (`model.freeze_bn`): with them training, each worker would
normalise its half-batch with its own statistics, which one device on the whole batch does not
(the embedder's feature batch norm is synchronised across replicas). The loss is the no-bias
softmax, a per-image mean, and the optimizer SGD, so the summed replica gradients give one
device's update up to float rounding (the two halves' gradients are summed in another order): after
4 steps each weight tensor's distance to the single device's is below 1% of the update it took
(0.1% here), while a step that did not scale the loss per replica would take twice the update.

HTG plays its game on the global batch (F's features are all-gathered, every replica forms the
same triplets and runs G and D on all of them), so its game is compared too; without the basic
model (`train.warmup_epochs=0`), whose triplets are formed within each replica's shard, as for any
triplet baseline, and for 2 steps: after 4 the distance reached 1% of the update (7e-3 of 0.70 on
one kernel), most likely a triplet at its margin's hinge falling on the other side in one run.

Mutations tried: the stream with `tf.data` auto-sharding OFF fails the batch assertion (each
worker then trains on the same half of every batch); without `BuiltBeforeFit` (Keras's symbolic
build, then its scalar logs reduced on axis 0) the workers fail before their first step.
"""

import json
import os
import socket
import subprocess
import sys

import numpy as np
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WORKER = '''
import sys

import keras
import numpy as np

from fgkeras import configs, experiments

method, distribute, out = sys.argv[1], sys.argv[2], sys.argv[3]
config = configs.override(configs.smoke(configs.get_config("baseline")), [
    f"train.method={method}", "train.warmup_epochs=0", "model.freeze_bn=true", "train.validation_classes=0", "train.epochs=2",
    "train.steps_per_epoch=2", "train.optimizer=sgd", "train.momentum=0", "train.learning_rate=0.05",
    "data.image_size=32", f"train.distribute={distribute}",
    *(["train.epochs=1"] if method == "htg" else [])])


class SaveInitialWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        np.savez(out + ".initial.npz", *[np.asarray(w) for w in self.model.weights])


model, history = experiments.train(config, verbose=0, callbacks=[SaveInitialWeights()])
np.savez(out, *[np.asarray(w) for w in model.weights])
# The first global batch as this process sees it, distributed as `fit` distributes it.
strategy = experiments.distribution_strategy(distribute)
train, _ = experiments.load_data(config.data)
batch = next(iter(strategy.experimental_distribute_dataset(experiments.training_dataset(config, train))))
np.save(out + ".batch.npy", np.concatenate([np.asarray(x) for x in strategy.experimental_local_results(batch["image"])]))
print("replicas", model.distribute_strategy.num_replicas_in_sync, history.history)
'''


def _free_ports(count):
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _environment(tf_config=None):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([REPO, os.environ.get("PYTHONPATH", "")]),
           "TF_CPP_MIN_LOG_LEVEL": "2", "CUDA_VISIBLE_DEVICES": ""}
    env.pop("TF_CONFIG", None)
    if tf_config is not None:
        env["TF_CONFIG"] = json.dumps(tf_config)
    return env


def _weights(path):
    with np.load(path) as arrays:
        return [arrays[f"arr_{i}"] for i in range(len(arrays.files))]


@pytest.mark.parametrize("method", ["softmax_nobias", "htg"])
def test_two_worker_processes_train_to_the_weights_of_one_device(tmp_path, method):
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [f"127.0.0.1:{port}" for port in _free_ports(2)]
    children = [
        subprocess.Popen([sys.executable, str(script), method, "multi_worker", str(tmp_path / f"worker{i}.npz")],
                         env=_environment({"cluster": {"worker": workers}, "task": {"type": "worker", "index": i}}),
                         cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        for i in range(2)]
    try:
        outputs = [child.communicate(timeout=600) for child in children]
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
    for child, (stdout, stderr) in zip(children, outputs):
        assert child.returncode == 0, stderr[-3000:]
        assert "replicas 2" in stdout
    single = subprocess.run([sys.executable, str(script), method, "none", str(tmp_path / "single.npz")],
                            env=_environment(), cwd=tmp_path, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stderr[-3000:]
    assert "replicas 1" in single.stdout

    # Each worker trains on its half of the global batch: together, the single device's images.
    halves = [np.load(tmp_path / f"worker{i}.npz.batch.npy") for i in range(2)]
    whole = np.load(tmp_path / "single.npz.batch.npy")
    assert len(halves[0]) == len(halves[1]) == len(whole) // 2
    np.testing.assert_array_equal(np.concatenate(halves), whole)

    chief, other, expected = (_weights(tmp_path / name) for name in ("worker0.npz", "worker1.npz", "single.npz"))
    initial = _weights(tmp_path / "single.npz.initial.npz")
    np.testing.assert_array_equal(np.concatenate([w.ravel() for w in initial]), np.concatenate(
        [w.ravel() for w in _weights(tmp_path / "worker0.npz.initial.npz")]))  # the same start
    assert len(chief) == len(expected)
    updated = 0
    for mine, theirs, peer, start in zip(chief, expected, other, initial):
        np.testing.assert_array_equal(mine, peer)  # the workers hold one model
        update = np.linalg.norm(theirs - start)
        assert np.linalg.norm(mine - theirs) <= 1e-2 * update + 1e-6
        updated += update > 0
    assert updated > 10  # the convolutions and the heads moved (the frozen batch norms do not)
