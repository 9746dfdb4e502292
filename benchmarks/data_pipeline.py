"""Data pipeline speed: synthetic rendering and tf.data P×K batches vs the training step rate.

The input pipeline must never be what a training run waits for: the goal is a
tf.data throughput of at least 3× the images/s of the batch-hard training step.

    python benchmarks/data_pipeline.py [--batches 40]
"""

import argparse
import time

import _common
import keras
import numpy as np

from fgkeras.data import Augment, SyntheticVehicles, read_csv
from fgkeras.evaluation import format_table
from fgkeras.models import MetricLearner, build_embedder


def render_rate(image_size, images_per_class=8):
    vehicles = SyntheticVehicles(seed=123, image_size=image_size, images_per_class=images_per_class)
    start = time.perf_counter()
    count = len(vehicles.arrays("train")["label"])
    return count / (time.perf_counter() - start)


def pipeline_rate(imageset, image_size, batches, augment=True):
    dataset = imageset.class_balanced_dataset(
        classes_per_batch=16, images_per_class=4, image_size=image_size, seed=0,
        augment=Augment.standard() if augment else None,
    )
    iterator = iter(dataset)
    next(iterator)  # start-up (validation, first map) is not throughput
    start = time.perf_counter()
    for _ in range(batches):
        next(iterator)
    return batches * 64 / (time.perf_counter() - start)


def step_rate(image_size, width, steps=20):
    keras.utils.set_random_seed(0)
    model = MetricLearner(build_embedder("resnet18", width=width, image_size=image_size),
                          softmax="none", triplet="batch_hard")
    model.compile(optimizer="adam")
    images = np.random.default_rng(0).integers(0, 256, (64, image_size, image_size, 3)).astype("uint8")
    labels = np.repeat(np.arange(16), 4).astype("int32")
    return _common.fit_images_per_second(model, images, labels, steps)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batches", type=int, default=40)
    parser.add_argument("--width", type=float, default=0.5)
    args = parser.parse_args()

    rows = []
    for size in (64, 128, 224):
        rate = render_rate(size)
        rows.append({"what": f"SyntheticVehicles rendering, {size} px, one process", "rate": rate})
        print(rows[-1], flush=True)

    train = SyntheticVehicles(seed=0, image_size=64).imageset("train")
    sources = [("synthetic (in memory), 64 px", train, 64)]
    if _common.os.path.exists(_common.SHARED_CARS196):
        sources.append(("cars196_half JPEGs (from disk), 96 px", read_csv(_common.SHARED_CARS196, split="train"), 96))
    ratios = []
    for name, imageset, size in sources:
        data = pipeline_rate(imageset, size, args.batches)
        step = step_rate(size, args.width)
        rows.append({"what": f"tf.data P×K batches + augmentation: {name}", "rate": data})
        rows.append({"what": f"batch-hard training step, ResNet-18 width {args.width}, {size} px", "rate": step})
        ratios.append(f"- {name}: tf.data / training step = **{data / step:.1f}×** (goal ≥ 3×)")
        print(rows[-2:], flush=True)
    table = format_table(rows, headers={"rate": "images/s"}, formats={"rate": "{:.0f}"})
    print(table)
    print("\n".join(ratios))
    print("wrote", _common.write_results("data_pipeline", [("Rates", table), ("Ratios", "\n".join(ratios))]))


if __name__ == "__main__":
    main()
