"""`train.distribute=multi_worker`: 2 real worker processes on 127.0.0.1 give one device's weights.

Each worker is a child process with its own `TF_CONFIG` (worker 0 is the chief) that runs
`experiments.train` on its method's stream (the P×K stream, FGGAN's pairs, ViewGAN's view pairs)
for a few steps; a third process trains the same config on one device. Keras's `fit` distributes
the stream with `tf.data` auto-sharding, which for a stream that reads no files shards by data:
every worker builds the whole global batch and keeps its slice, so the two workers together
train on exactly the single device's images.

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

FGGAN (slow: 90–170 s) warms G up for 2 steps (`fggan.generator_warmup_steps`), then plays its
four players on `experiments.fggan_pairs`, 16 pairs of 32 px, with S fresh (`fggan.pretrain_steps=0`:
pre-training S is the no-bias softmax above, with Adam) and its backbone's batch norms frozen; G's,
D's and N's are synchronised. Every player steps with SGD at 0.01. The game starts from the same
weights up to G's warm-up rounding (6e-8), and after 4 steps the largest distance is 2.2e-5 of the
update (float rounding). At 0.05 the game amplifies that rounding step by step (1e-5 of the update
after 1 step, 7e-4 after 2, 4% on S's deepest convolutions after 4), hence the lower rate.

ViewGAN (slow: 90–160 s) is trained by `evaluation.viewgan.train_viewgan` with its own smoke
config (`viewgan_smoke`: 32 px, 16 images per global batch) on `viewgan.training_pairs`; its noise
is drawn for the global batch and each replica takes its rows. Its players step with Adam (2e-4,
β1 = 0.5; ViewGAN takes no `train.optimizer`), whose first steps are close to lr × the sign of
the gradient, so a gradient component that rounding moves across zero steps the other way:
after 4 steps distances reach 5e-3 of the update (AIM's attention biases), below the 1%. One
weight is left out, the key bias of the CNC's attention (`NO_GRADIENT`): its gradient is zero but
for rounding (a bias added to every key adds one constant to each query's logits, which the
softmax cancels), and Adam steps it on that noise alone (8e-5 off a "step" of 1e-4).

Mutations tried: the stream with `tf.data` auto-sharding OFF fails the batch assertion (each
worker then trains on the same half of every batch); without `BuiltBeforeFit` (Keras's symbolic
build, then its scalar logs reduced on axis 0) the workers fail before their first step, as they
did in G's warm-up when it was a functional model compiled with its loss. FGGAN, each caught on
G's first convolution: G's loss not divided by the replicas (distance 25% of the
update), G's, D's and N's batch norms per replica (17%). ViewGAN, each caught on G's first
convolution: the noise drawn per replica (114%), G's and D's batch norms per replica (85%); G's
loss not divided by the replicas is caught only narrowly (1.08% against the 1%): Adam's step
depends on the loss's scale through its ε alone, so that mutation is what
`tests/models/test_viewgan.py`'s MirroredStrategy test (SGD) is for.
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
import json
import sys

import keras
import numpy as np

from fgkeras import configs, experiments
from fgkeras.evaluation import viewgan

method, distribute, out = sys.argv[1], sys.argv[2], sys.argv[3]
settings = ["train.epochs=2", "train.steps_per_epoch=2", "data.image_size=32", f"train.distribute={distribute}"]
sgd = ["train.optimizer=sgd", "train.momentum=0", f"train.learning_rate={0.01 if method == 'fggan' else 0.05}"]
if method == "viewgan":  # Adam(2e-4, beta_1 0.5) of `viewgan.learning_rate`: ViewGAN takes no `train.optimizer`
    config = configs.override(viewgan.viewgan_smoke(configs.get_config("viewgan")), settings)
elif method == "fggan":  # S fresh (no pre-training), its backbone's batch norms frozen; G warmed up
    config = configs.override(configs.smoke(configs.get_config("fggan")), [
        *settings, *sgd, "model.freeze_bn=true", "fggan.pretrain_steps=0", "fggan.generator_warmup_steps=2",
        f"fggan.cache_dir={out}.cache"])
else:
    config = configs.override(configs.smoke(configs.get_config("baseline")), [
        *settings, *sgd, f"train.method={method}", "train.warmup_epochs=0", "model.freeze_bn=true",
        "train.validation_classes=0", *(["train.epochs=1"] if method == "htg" else [])])


class SaveInitialWeights(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        np.savez(out + ".initial.npz", *[np.asarray(w) for w in self.model.weights])


model, history = experiments.train(config, verbose=0, callbacks=[SaveInitialWeights()])
np.savez(out, *[np.asarray(w) for w in model.weights])
with open(out + ".paths.json", "w") as f:
    json.dump([w.path for w in model.weights], f)
# The first global batch as this process sees it, distributed as `fit` distributes it.
strategy = experiments.distribution_strategy(distribute)
if method == "viewgan":
    stream, _ = viewgan.training_pairs(config, viewgan.viewgan_data(config)[1])
else:
    train, _ = experiments.load_data(config.data)
    stream = (experiments.fggan_pairs if method == "fggan" else experiments.training_dataset)(config, train)
batch = next(iter(strategy.experimental_distribute_dataset(stream)))
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


# Weights whose gradient is zero but for float rounding, which Adam turns into steps (see the docstring).
NO_GRADIENT = ("cnc/key/bias",)


@pytest.mark.parametrize("method", ["softmax_nobias", "htg", pytest.param("fggan", marks=pytest.mark.slow),
                                    pytest.param("viewgan", marks=pytest.mark.slow)])
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
    # The same start; FGGAN's after G's warm-up on each side, so up to float rounding.
    np.testing.assert_allclose(np.concatenate([w.ravel() for w in _weights(tmp_path / "worker0.npz.initial.npz")]),
                               np.concatenate([w.ravel() for w in initial]), rtol=0,
                               atol=1e-6 if method == "fggan" else 0)
    assert len(chief) == len(expected)
    paths = json.loads((tmp_path / "single.npz.paths.json").read_text())
    assert json.loads((tmp_path / "worker0.npz.paths.json").read_text()) == paths
    updated = 0
    for path, mine, theirs, peer, start in zip(paths, chief, expected, other, initial):
        np.testing.assert_array_equal(mine, peer)  # the workers hold one model
        if path.endswith(NO_GRADIENT):
            continue
        update = np.linalg.norm(theirs - start)
        assert np.linalg.norm(mine - theirs) <= 1e-2 * update + 1e-6, (path, np.linalg.norm(mine - theirs), update)
        updated += update > 0
    assert updated > 10  # the convolutions and the heads moved (the frozen batch norms do not)
