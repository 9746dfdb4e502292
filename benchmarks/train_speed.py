"""Training speed: our trainers vs plain `fit` with a standard loss, fp32 vs bfloat16,
and (when PyTorch is installed) pytorch-metric-learning's batch-hard triplet.

Every row trains the same network on the same in-memory P×K batch, so the input
pipeline is out of the measurement; ratios are the result.

    python benchmarks/train_speed.py [--steps 30] [--image-size 64] [--width 0.5] [--quality]
"""

import argparse
import os
import time

import _common  # noqa: F401  (quiet TensorFlow before it is imported)
import keras
import numpy as np

from fgkeras import losses as fg_losses
from fgkeras.evaluation import format_table
from fgkeras.models import MetricLearner, build_embedder


def _batch(args):
    rng = np.random.default_rng(0)
    p, k = args.classes_per_batch, args.images_per_class
    images = rng.integers(0, 256, (p * k, args.image_size, args.image_size, 3)).astype("uint8")
    labels = np.repeat(np.arange(p), k).astype("int32")
    return images, labels


def _embedder(args):
    keras.utils.set_random_seed(0)
    return build_embedder("resnet18", width=args.width, embedding_dim=128, image_size=args.image_size)


def measure_keras(args):
    images, labels = _batch(args)
    rows = []

    def add(name, model, baseline=None):
        model.compile(optimizer=keras.optimizers.Adam(1e-3), **({"loss": baseline} if baseline else {}))
        rate = _common.fit_images_per_second(model, images, labels, args.steps)
        rows.append({"setting": name, "images_per_s": rate})
        print(f"{name:<55s} {rate:8.1f} images/s", flush=True)
        return rate

    embedder = _embedder(args)
    plain_triplet = add("plain fit, embedder + BatchHardTripletLoss as a Keras loss", embedder,
                        fg_losses.BatchHardTripletLoss(margin=0.1))
    ours_triplet = add("ours: MetricLearner(triplet='batch_hard')",
                       MetricLearner(_embedder(args), softmax="none", triplet="batch_hard"))

    inputs = keras.Input((args.image_size, args.image_size, 3))
    logits = keras.layers.Dense(args.classes_per_batch)(_embedder(args).features(inputs))
    plain_softmax = add("plain fit, embedder + Dense + sparse cross-entropy", keras.Model(inputs, logits),
                        keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    ours_softmax = add("ours: MetricLearner(softmax='bias')",
                       MetricLearner(_embedder(args), num_classes=args.classes_per_batch,
                                     softmax="bias", triplet="none"))

    keras.config.set_dtype_policy("mixed_bfloat16")
    try:
        ours_bf16 = add("ours: MetricLearner(triplet='batch_hard'), mixed_bfloat16",
                        MetricLearner(_embedder(args), softmax="none", triplet="batch_hard"))
    finally:
        keras.config.set_dtype_policy("float32")
    ratios = {
        "step time, ours batch-hard / plain fit batch-hard (goal <= 1.05)": plain_triplet / ours_triplet,
        "step time, ours softmax / plain fit softmax (goal <= 1.05)": plain_softmax / ours_softmax,
        "images/s, bfloat16 / float32 (goal >= 1.3)": ours_bf16 / ours_triplet,
    }
    return rows, ratios, ours_triplet


def measure_torch(args):
    """pytorch-metric-learning's batch-hard triplet on a same-size ResNet-18, or None."""
    try:
        import torch
        from pytorch_metric_learning import losses, miners
    except ImportError:
        return None
    from _torch_resnet import resnet18

    torch.manual_seed(0)
    torch.set_num_threads(os.cpu_count() or 1)  # TensorFlow uses every core too
    images, labels = _batch(args)
    net = resnet18(width=args.width, embedding_dim=128)
    optimizer = torch.optim.Adam(net.parameters(), lr=1e-3)
    loss_fn = losses.TripletMarginLoss(margin=0.1, distance=None)
    miner = miners.BatchHardMiner()
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0
    y = torch.from_numpy(labels).long()

    def step():
        optimizer.zero_grad()
        embeddings = torch.nn.functional.normalize(net(x), dim=1)
        loss = loss_fn(embeddings, y, miner(embeddings, y))
        loss.backward()
        optimizer.step()

    for _ in range(3):
        step()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    rate = args.steps * len(images) / (time.perf_counter() - start)
    print(f"{'peer: pytorch-metric-learning BatchHardMiner + TripletMarginLoss':<55s} {rate:8.1f} images/s")
    return rate


def measure_quality(args):
    """Recall@1 on unseen synthetic classes, float32 vs mixed_bfloat16, same budget."""
    from fgkeras import configs, experiments

    config = configs.get_config("baseline")
    config.model.width = args.width
    config.data.image_size = args.image_size
    rows = []
    for mixed in (False, True):
        config.train.mixed_precision = mixed
        rows += experiments.compare(config, ["triplet_batch_hard"], verbose=0)
        rows[-1]["method"] = "batch-hard, " + ("mixed_bfloat16" if mixed else "float32")
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--width", type=float, default=0.5)
    parser.add_argument("--classes-per-batch", type=int, default=16)
    parser.add_argument("--images-per-class", type=int, default=4)
    parser.add_argument("--quality", action="store_true",
                        help="also train fp32 and bf16 to compare Recall@1 (minutes)")
    args = parser.parse_args()

    rows, ratios, ours = measure_keras(args)
    torch_rate = measure_torch(args)
    if torch_rate is not None:
        rows.append({"setting": "peer: pytorch-metric-learning batch-hard, same ResNet-18", "images_per_s": torch_rate})
        ratios["images/s, ours batch-hard / pytorch-metric-learning"] = ours / torch_rate
    sections = [
        ("Throughput", format_table(rows, headers={"images_per_s": "images/s"},
                                    formats={"images_per_s": "{:.1f}"})),
        ("Ratios", "\n".join(f"- {name}: **{value:.2f}**" for name, value in ratios.items())),
        ("Setup", f"ResNet-18 width {args.width}, {args.image_size} px, batch "
                  f"{args.classes_per_batch}×{args.images_per_class}, {args.steps} timed steps after a warm-up, "
                  "one in-memory batch repeated (no input pipeline in the measurement)."
                  + ("" if torch_rate is not None else
                     " PyTorch is not installed, so the peer row is absent (`pip install -e .[peers]`).")),
    ]
    if args.quality:
        sections.append(("Recall on unseen classes, float32 vs bfloat16", format_table(measure_quality(args))))
    print("\n".join(f"{name}: {value:.2f}" for name, value in ratios.items()))
    print("wrote", _common.write_results("train_speed", sections))


if __name__ == "__main__":
    main()
