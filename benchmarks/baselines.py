"""The baselines side by side: softmax (bias / no-bias), triplet-random, batch-hard.

Same backbone, image size and number of images seen for every method; Recall@K and
mAP@R on classes never seen in training, on the synthetic vehicles and on
../shared/datasets/cars196_half (classes 1–98 train, 99–196 test; skipped when absent).

    python benchmarks/baselines.py [--seeds 1] [--set train.epochs=8 ...] [--smoke]
"""

import argparse

import _common
import numpy as np

from fgkeras import configs, experiments
from fgkeras.evaluation import format_table

METHODS = ["softmax", "softmax_nobias", "triplet_random", "triplet_batch_hard"]
METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r"]


def run(config, methods, seeds):
    """Rows of mean ± std over seeds, one per method."""
    per_method = {m: [] for m in methods}
    for seed in seeds:
        config.train.seed = seed
        train_set, test_set = experiments.load_data(config.data)
        for row in experiments.compare(config, methods, train_set=train_set, test_set=test_set, verbose=0):
            per_method[row["method"]].append(row)
            print(f"seed {seed} {row['method']}: " + ", ".join(f"{k} {row[k]:.3f}" for k in METRICS), flush=True)
    rows = []
    for method, runs in per_method.items():
        row = {"method": method, "seeds": len(runs)}
        for key in METRICS:
            values = np.array([r[key] for r in runs]) * 100
            row[key] = f"{values.mean():.1f} ± {values.std():.1f}" if len(values) > 1 else f"{values[0]:.1f}"
        row["train_seconds"] = f"{np.mean([r['train_seconds'] for r in runs]):.0f}"
        rows.append(row)
    return rows


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--skip-cars", action="store_true")
    args = parser.parse_args()
    seeds = list(range(args.seeds))

    sections = []
    datasets = [("synthetic vehicles, unseen classes", configs.get_config("baseline"))]
    if not args.skip_cars and _common.os.path.exists(_common.SHARED_CARS196):
        cars = configs.get_config("cars196")
        cars.data.path = _common.SHARED_CARS196
        datasets.append(("cars196_half, classes 99–196", cars))
    for name, config in datasets:
        if args.smoke:
            configs.smoke(config)
        configs.override(config, args.set)
        rows = run(config, METHODS, seeds)
        table = format_table(rows, keys=["method", "seeds"] + METRICS + ["train_seconds"])
        print(f"\n{name}\n{table}", flush=True)
        budget = (f"ResNet-18 width {config.model.width}, {config.data.image_size} px, "
                  f"{config.train.epochs}×{config.train.steps_per_epoch} steps of "
                  f"{config.train.classes_per_batch}×{config.train.images_per_class} images, "
                  f"{config.train.optimizer} lr {config.train.learning_rate} (cosine), random init.")
        sections.append((name, table + "\n\n" + budget))
    print("wrote", _common.write_results("baselines", sections))


if __name__ == "__main__":
    main()
