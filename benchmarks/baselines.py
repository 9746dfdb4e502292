"""The baselines side by side: softmax (bias / no-bias), triplet-random, batch-hard.

Same backbone, image size and number of images seen for every method; Recall@K and
mAP@R on classes never seen in training, on the synthetic vehicles and on
../shared/datasets/cars196_half (classes 1–98 train, 99–196 test; skipped when absent).

    python benchmarks/baselines.py [--seeds 1] [--set train.epochs=8 ...] [--smoke]
"""

import argparse

import _common

from fgkeras import configs
from fgkeras.evaluation import format_table

METHODS = ["softmax", "softmax_nobias", "triplet_random", "triplet_batch_hard"]
METRICS = ["recall@1", "recall@2", "recall@4", "recall@8", "map@r"]


def datasets(skip_cars=False, only_cars=False):
    """(slug, name, config) of the synthetic vehicles and, when present, cars196_half."""
    found = [] if only_cars else [("synthetic", "synthetic vehicles, unseen classes", configs.get_config("baseline"))]
    if skip_cars:
        return found
    if not _common.os.path.exists(_common.SHARED_CARS196):
        print(f"cars196_half skipped: {_common.SHARED_CARS196} not found", flush=True)
        return found
    cars = configs.get_config("cars196")
    cars.data.path = _common.SHARED_CARS196
    found.append(("cars196", "cars196_half, classes 99–196", cars))
    return found


def budget(config):
    return (f"ResNet-18 width {config.model.width}, {config.data.image_size} px, "
            f"{config.train.epochs}×{config.train.steps_per_epoch} steps of "
            f"{config.train.classes_per_batch}×{config.train.images_per_class} images, "
            f"{config.train.optimizer} lr {config.train.learning_rate} (cosine), random init, "
            f"augmentation {'on' if config.data.augment else 'off'}.")


def comparison_parser(description):
    """The options every comparison benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--skip-cars", action="store_true")
    parser.add_argument("--only-cars", action="store_true")
    return parser


def configured_datasets(args):
    """`datasets()` with `--smoke` and `--set` applied to each configuration."""
    for slug, name, config in datasets(args.skip_cars, args.only_cars):
        if args.smoke:
            configs.smoke(config)
        yield slug, name, configs.override(config, args.set)


def main():
    args = comparison_parser(__doc__).parse_args()
    for slug, name, config in configured_datasets(args):
        variants = {method: [f"train.method={method}"] for method in METHODS}
        rows = _common.compare_variants(config, variants, range(args.seeds), METRICS)
        table = format_table(rows, keys=["method", "seeds", *METRICS, "train_seconds"])
        print(f"\n{name}\n{table}", flush=True)
        print("wrote", _common.write_results(f"baselines_{slug}", [(name, table + "\n\n" + budget(config))]))


if __name__ == "__main__":
    main()
