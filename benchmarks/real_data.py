"""A small real set: what each part of the training recipe gains on cars196_half, beside hand-made features.

The ladder trains `--methods` from scratch on classes 1–98 (96 px) and evaluates Recall@K and
mAP@R on classes 99–196. The second rung adds held-out model selection to the first; each later
rung adds one change to the second, so that every change is measured on the same base, side by
side (a cumulative ladder would measure weight decay and width on top of an augmentation that
costs here):

  from scratch, last epoch        no held-out classes, no augmentation, Adam, ResNet-18 width 0.5
  + held-out model selection      20 % of the train classes held out; the best epoch's weights, no early stop
  ... + Augment.standard()        flips, crops, colour jitter
  ... + weight decay              decoupled, `--weight-decay`
  ... + width 0.25                a narrower backbone

The pixel and colour-histogram baselines of the same test images are printed beside (the floor a
learned embedder must clear). Runs are long (minutes each on 2 cores), so every finished run is
kept in `results/real_data_cars196.jsonl` (`_common.RunStore`) and not trained again: a ladder
cut short by the end of a session loses only the run in progress, and the same command started
twice with `--threads 1` trains two runs at once.

    python benchmarks/real_data.py [--seeds 2] [--methods triplet_random,htg] [--rungs 3] [--set ...]
"""

import os

import _common
from baselines import METRICS, budget, comparison_parser

from fgkeras import configs, experiments
from fgkeras.evaluation import format_table, handcrafted_metrics

BASE = ["data.augment=false", "train.validation_classes=0", "model.width=0.5"]


def ladder(weight_decay):
    """(label, overrides) of each rung: the base, held-out selection, then one change each to it."""
    selected = [*BASE, "train.validation_classes=0.2", "train.restore_best=true", "train.patience=0"]
    return [("from scratch, last epoch", list(BASE)),
            ("+ held-out model selection", selected),
            ("... + Augment.standard()", [*selected, "data.augment=true"]),
            (f"... + weight decay {weight_decay:g}", [*selected, f"train.weight_decay={weight_decay}"]),
            ("... + width 0.25", [*selected, "model.width=0.25"])]


def main():
    parser = comparison_parser(__doc__)
    parser.set_defaults(seeds=2)
    parser.add_argument("--methods", default="triplet_random",
                        help="comma-separated train.method values (default: %(default)s)")
    parser.add_argument("--rungs", type=int, default=len(ladder(0)), help="run the first N rungs only")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    args = parser.parse_args()
    _common.set_threads(args)
    if not os.path.exists(_common.SHARED_CARS196):
        parser.exit(0, f"cars196_half not found at {_common.SHARED_CARS196}: nothing to measure\n")
    base = configs.get_config("cars196")
    base.data.path = _common.SHARED_CARS196
    if args.smoke:
        configs.smoke(base)
    base = configs.override(base, args.set)
    train_set, test_set = experiments.load_data(base.data)
    floor = handcrafted_metrics(test_set, base.data.image_size)
    floor_rows = [{"method": name, **{key: f"{metrics[key] * 100:.1f}" for key in METRICS}}
                  for name, metrics in floor.items()]
    print(format_table(floor_rows, keys=["method", *METRICS]), flush=True)

    store = _common.RunStore("real_data_cars196", enabled=not args.smoke)
    sections = [("Hand-made features, the same test images", format_table(floor_rows, keys=["method", *METRICS]))]
    rungs, complete = ladder(args.weight_decay)[:args.rungs], True
    train = _common.retrieval_run(lambda: (train_set, test_set), METRICS)
    for method in args.methods.split(","):
        runs_by_label = {}
        for label, overrides in rungs:
            for seed in range(args.seeds):
                config = configs.override(configs.ExperimentConfig.from_dict(base.to_dict()),
                                          [*overrides, f"train.method={method}", f"train.seed={seed}"])
                run = _common.measured_run(config, store, train, train_missing=not args.stored_only)
                if run is None:
                    continue  # another process trains it (or --stored-only)
                print(f"{method} seed {seed} {label}: " + ", ".join(f"{k} {run[k]:.3f}" for k in METRICS)
                      + f", {run['epochs_run']} epochs, {run['train_seconds']} s", flush=True)
                runs_by_label.setdefault(label, []).append(run)
        complete &= len(runs_by_label) == len(rungs) and all(len(runs) == args.seeds for runs in runs_by_label.values())
        table = format_table(_common.mean_std_rows(runs_by_label, METRICS), keys=["method", "seeds", *METRICS, "train_seconds"])
        print(f"\n{method}\n{table}", flush=True)
        sections.append((f"{method}: the recipe, one change a rung",
                         table + "\n\nThe last rung's setup: " + budget(config, htg=method == "htg")))
    if not args.smoke:
        topic = "real_data_cars196" if complete else "real_data_cars196_progress"
        print("wrote", _common.write_results(topic, sections))


if __name__ == "__main__":
    main()
