"""FGGAN on the synthetic multi-view vehicles (#13): the paper's Tables 1 and 3, side by side.

Same S backbone, same pre-trained S (cached by config hash), same number of images seen:

- "S" (S off the shelf: the pre-trained S), "S ft" (S fine-tuned alone, no-bias softmax, for as
  many steps and pairs' user photos as the game gets), and the FGGAN variants (GDN*S and GDNS by
  default; `--full` adds CAE, GD, GDN*, GDN), each with its fc feature (S's embedding) and every
  aggregation of S's last conv map (MAC, SPoC, CroW, SCDA, GeM);
- protocols, all on the unseen classes: leave-one-out among their images ("unseen"), user photos
  against the stock photos ("stock"), unseen queries among seen and unseen items ("mixed", the
  open set with distractors), and the growing inventory (mAP@10 averaged over the years);
- the goal of the issue: GDNS >= 5 % relative mAP@10 on the unseen classes over the best of
  {S ft, S ft + best aggregation}, on >= 2 seeds.

    python benchmarks/fggan.py --smoke           # seconds-to-minutes, checks the path
    python benchmarks/fggan.py --steps 300       # a short real run (indicative)
    python benchmarks/fggan.py                   # the default run (about an hour on 2 cores)

Writes benchmarks/results/fggan_synthetic.md (`--smoke`: fggan_smoke.md).
"""

import argparse
import logging
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402

FEATURES = ("embedding", "mac", "spoc", "crow", "scda", "gem")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data and a few steps: checks the path")
    parser.add_argument("--full", action="store_true", help="also CAE, GD, GDN* and GDN (1 seed each)")
    parser.add_argument("--variants", help="comma-separated variants instead (e.g. GDNS for a short run)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="game steps (default: the fggan config's epochs × steps)")
    parser.add_argument("--pretrain-steps", type=int, help="S's pre-training steps (default: the config's)")
    parser.add_argument("--image-size", type=int, help="default: the config's (64 px)")
    parser.add_argument("--cache-dir", default="runs/cache/fggan_semantic")
    parser.add_argument("--topic", help="results file name (default: fggan_synthetic, or fggan_smoke)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every run, e.g. --set fggan.lam=0.1 (repeatable)")
    return parser.parse_args(argv)


def make_config(args, seed):
    from fgkeras import configs

    config = configs.get_config("fggan")
    if args.smoke:
        configs.smoke(config)
        config.data.image_size = 32
    if args.image_size:
        config.data.image_size = args.image_size
    if args.steps:
        config.train.epochs, config.train.steps_per_epoch = 1, args.steps
    if args.pretrain_steps is not None:
        config.fggan.pretrain_steps = args.pretrain_steps
    config.fggan.cache_dir = args.cache_dir
    config.train.seed = seed
    return configs.override(config, args.set)


def embed(embedder, imageset, config):
    from fgkeras import evaluation

    dataset = imageset.as_dataset(image_size=config.data.image_size, batch_size=config.eval.batch_size)
    return evaluation.embed_dataset(embedder, dataset, verbose=False)


def protocols(embedder, train_set, test_set, config):
    """mAP@k and P@k of one embedder under every protocol (unseen classes as queries)."""
    import numpy as np

    from fgkeras import evaluation

    unseen, seen = embed(embedder, test_set, config), embed(embedder, train_set, config)
    quiet = {"verbose": False, "map_at_r": False}
    stock = unseen["is_stock"].astype(bool)
    row = {}
    loo = evaluation.retrieval_metrics(unseen["embeddings"], unseen["label"], **quiet)
    shop = evaluation.retrieval_metrics(unseen["embeddings"][~stock], unseen["label"][~stock],
                                        unseen["embeddings"][stock], unseen["label"][stock], **quiet)
    mixed = evaluation.open_set(seen["embeddings"], seen["label"], unseen["embeddings"], unseen["label"],
                                **quiet)["mixed"]
    years = evaluation.growing_inventory(unseen["embeddings"], unseen["label"], unseen["year"], **quiet)
    for name, metrics in (("unseen", loo), ("stock", shop), ("mixed", mixed)):
        for key in ("map@5", "map@10", "map@20", "p@10"):
            row[f"{name} {key}"] = metrics[key]
    row["growing map@10"] = float(np.nanmean([r["map@10"] for r in years]))
    return row


def fine_tune_alone(config, train_set, steps):
    """S fine-tuned alone from the pre-trained S: no-bias softmax on the training images, the game's
    optimizer (Adam 2e-4, β1 0.5) and batch size, as many steps as the game."""
    from fgkeras import experiments, models

    semantic, classifier = experiments.pretrained_semantic(config, train_set, verbose=0)
    learner = models.MetricLearner(semantic, num_classes=train_set.num_classes, softmax="no_bias", triplet="none")
    learner.classifier.kernel.assign(classifier.kernel)
    learner.compile(optimizer=experiments.optimizer_factory(config.train)(config.train.learning_rate))
    learner.fit(experiments.training_dataset(config, train_set), epochs=1, steps_per_epoch=steps, verbose=0,
                shuffle=False)
    return semantic


def run(args):
    import numpy as np

    from fgkeras import experiments
    from fgkeras.models import CanonicalEmbedder

    variants = ["GDN*S", "GDNS"] + (["CAE", "GD", "GDN*", "GDN"] if args.full else [])
    if args.variants:
        variants = args.variants.split(",")
    rows, seconds = [], {}
    for seed in range(args.seeds):
        config = make_config(args, seed)
        train_set, test_set = experiments.load_data(config.data)
        steps = config.train.epochs * config.train.steps_per_epoch
        start = time.perf_counter()
        semantic, _ = experiments.pretrained_semantic(config, train_set, verbose=0)
        seconds.setdefault("S pre-training (or cache)", []).append(time.perf_counter() - start)
        embedders = {"S": (None, semantic)}
        start = time.perf_counter()
        embedders["S ft"] = (None, fine_tune_alone(config, train_set, steps))
        seconds.setdefault("S ft", []).append(time.perf_counter() - start)
        for variant in variants:
            if seed > 0 and variant not in ("GDN*S", "GDNS"):
                continue  # the ablations: 1 seed, indicative
            config.train.variant = variant
            start = time.perf_counter()
            game, _ = experiments.train(config, train_set=train_set, verbose=0)
            seconds.setdefault(variant, []).append(time.perf_counter() - start)
            embedders[variant] = (game.generator, game.semantic)
        for method, (generator, semantic) in embedders.items():
            for feature in FEATURES:
                embedder = CanonicalEmbedder(generator, semantic, feature=feature)
                name = method if feature == "embedding" else f"{method} + {feature.upper()}"
                rows.append({"method": name, "seed": seed, **protocols(embedder, train_set, test_set, config)})
                logging.info("%s seed %d: unseen mAP@10 %.3f", name, seed, rows[-1]["unseen map@10"])
    return rows, seconds, config, variants


def summarise(rows):
    """Mean over seeds per method, with the spread (max - min) of the unseen mAP@10."""
    import numpy as np

    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in by_method.items():
        keys = [k for k in group[0] if k not in ("method", "seed")]
        mean = {k: float(np.mean([r[k] for r in group])) for k in keys}
        values = [r["unseen map@10"] for r in group]
        summary.append({"method": method, "seeds": len(group), **mean, "spread": max(values) - min(values)})
    return summary


def goal(summary):
    """GDNS's relative unseen mAP@10 over the best of S ft and S ft + aggregation."""
    by = {r["method"]: r for r in summary}
    if "GDNS" not in by:
        return "GDNS was not run."
    rivals = {m: r["unseen map@10"] for m, r in by.items() if m == "S ft" or m.startswith("S ft +")}
    best = max(rivals, key=rivals.get)
    gdns = max((r for m, r in by.items() if m == "GDNS" or m.startswith("GDNS +")), key=lambda r: r["unseen map@10"])
    gain = gdns["unseen map@10"] / rivals[best] - 1
    verdict = "met" if gain >= 0.05 and gdns["seeds"] >= 2 else "not met"
    return (f"Best GDNS feature: {gdns['method']}, unseen mAP@10 {100 * gdns['unseen map@10']:.1f} "
            f"(spread between seeds {100 * gdns['spread']:.1f}); best rival: {best}, {100 * rivals[best]:.1f}. "
            f"Relative gain {100 * gain:+.1f} % → goal (>= +5 %, >= 2 seeds) {verdict}.")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.seeds = min(args.seeds, 1)
    from fgkeras.evaluation import format_table

    rows, seconds, config, variants = run(args)
    summary = summarise(rows)
    columns = ["method", "seeds", "unseen map@5", "unseen map@10", "unseen map@20", "unseen p@10", "spread",
               "stock map@10", "mixed map@10", "growing map@10"]
    steps = config.train.epochs * config.train.steps_per_epoch
    setup = (f"Synthetic vehicles at {config.data.image_size} px ({config.data.num_makes} makes × "
             f"{config.data.models_per_make} models, {config.data.images_per_class} images per class, half of the "
             f"models unseen), S = {config.model.backbone} width {config.model.width}, embedding "
             f"{config.model.embedding_dim}, pre-trained {config.fggan.pretrain_steps} steps (no-bias softmax, "
             f"cached); then {steps} steps of batches of "
             f"{config.train.classes_per_batch * config.train.images_per_class} for S ft and for each game "
             f"(G, D, N width {config.fggan.width}, Adam 2e-4 β1 0.5). Seeds: {args.seeds} "
             f"(CAE/GD/GDN*/GDN: 1). Variants: {', '.join(variants)}. All figures on the unseen classes.")
    timing = "\n".join(f"- {name}: {', '.join(f'{s:.0f} s' for s in values)}" for name, values in seconds.items())
    topic = args.topic or ("fggan_smoke" if args.smoke else "fggan_synthetic")
    path = _common.write_results(topic, [
        ("Setup", setup),
        ("Goal", goal(summary)),
        ("Retrieval on the unseen classes (mean over seeds; mAP and P in %)", format_table(summary, keys=columns)),
        ("Per seed", format_table(rows, keys=["method", "seed", "unseen map@10", "stock map@10", "mixed map@10"])),
        ("Wall time", timing),
    ])
    print(format_table(summary, keys=columns))
    print(goal(summary))
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
