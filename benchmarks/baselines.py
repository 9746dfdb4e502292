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


def optimizer_note(train):
    """The optimizer and its settings, as `fgkeras.models.make_optimizer` gets them."""
    settings = [f"momentum {train.momentum}"] if train.optimizer == "sgd" else [f"β1 {train.beta_1}",
                                                                               f"β2 {train.beta_2}"]
    if train.weight_decay:
        settings.append(f"weight decay {train.weight_decay}")
    elif train.optimizer == "adamw":
        settings.append("weight decay 0.004 (Keras's default)")
    return f"{train.optimizer} lr {train.learning_rate} ({', '.join(settings)})"


def schedule_note(train, htg=False):
    """How the learning rate moves over the budget (`experiments.train`'s rules)."""
    if htg and train.decay_epochs:
        return f"the paper's step decay (÷10 every {train.decay_epochs} epochs of each phase)"
    if train.restart_schedule:
        return (f"a cosine per phase (warm restart after epoch {train.warmup_epochs})" if htg else
                f"cosine with a warm restart after epoch {train.warmup_epochs}")
    return "one cosine decay over the whole budget"


def backbone_note(config):
    """The backbone, its initialisation and its fine-tuning recipe."""
    model = config.model
    note = f"{model.backbone} width {model.width}, " + (f"from {model.preset}" if model.preset else "random init")
    if model.freeze_bn:
        note += ", batch norms frozen"
    if config.train.backbone_lr_multiplier != 1.0:
        note += f", backbone lr ×{config.train.backbone_lr_multiplier}"
    return note


def selection_note(train):
    """Which epoch's weights are evaluated."""
    if not train.validation_classes:
        return "the last epoch's weights (no held-out classes)"
    which = "the best epoch's weights" if train.restore_best else "the last epoch's weights"
    stop = f", early stopping after {train.patience} evaluations without gain" if train.patience else ""
    every = "after every epoch" if train.validation_every == 1 else f"every {train.validation_every} epochs"
    return f"{which} by Recall@1 on {train.validation_classes:.0%} of the train classes held out ({every}{stop})"


def budget(config, htg=False):
    """The note under a table: everything the rows share, read from the config they ran with."""
    train = config.train
    return (f"{backbone_note(config)}, {config.data.image_size} px, "
            f"{train.epochs}×{train.steps_per_epoch} steps of {train.classes_per_batch}×{train.images_per_class} "
            f"images, {optimizer_note(train)} on {schedule_note(train, htg)}, "
            f"augmentation {'on' if config.data.augment else 'off'}; evaluated with {selection_note(train)}.")


def comparison_parser(description):
    """The options every comparison benchmark takes."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--seeds", type=int, default=1)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--smoke", action="store_true")
    parser.add_argument("--skip-cars", action="store_true")
    parser.add_argument("--only-cars", action="store_true")
    _common.add_store_options(parser)
    return parser


def configured_datasets(args):
    """`datasets()` with `--smoke` and `--set` applied to each configuration."""
    for slug, name, config in datasets(args.skip_cars, args.only_cars):
        if args.smoke:
            configs.smoke(config)
        yield slug, name, configs.override(config, args.set)


def main():
    args = comparison_parser(__doc__).parse_args()
    _common.set_threads(args)
    for slug, name, config in configured_datasets(args):
        variants = {method: [f"train.method={method}"] for method in METHODS}
        store = _common.RunStore(f"baselines_{slug}", enabled=not args.smoke)
        rows = _common.compare_variants(config, variants, range(args.seeds), METRICS, store,
                                        train_missing=not args.stored_only)
        table = format_table(rows, keys=["method", "seeds", *METRICS, "train_seconds"])
        print(f"\n{name}\n{table}", flush=True)
        topic = _common.results_topic(f"baselines_{slug}", rows, variants, range(args.seeds))
        print("wrote", _common.write_results(topic, [(name, table + "\n\n" + budget(config))]))


if __name__ == "__main__":
    main()
