"""FGGAN on the synthetic multi-view vehicles (#13): the paper's Tables 1 and 3, side by side.

Same S backbone, same pre-trained S (cached by config hash), same number of images seen:

- "S" (S off the shelf: the pre-trained S), "S ft" (S fine-tuned alone, no-bias softmax, for as
  many steps and pairs' user photos as the game gets), and the FGGAN variants (GDN*S, GDNS and
  GDNS with a residual G that starts as the identity, by default; `--full` adds CAE, GD, GDN*,
  GDN), each with its fc feature (S's embedding) and every aggregation of S's last conv map (MAC,
  SPoC, CroW, SCDA, GeM);
- protocols, all on the unseen classes: leave-one-out among their images ("unseen"), user photos
  against the stock photos ("stock"), unseen queries among seen and unseen items ("mixed", the
  open set with distractors), and the growing inventory (mAP@10 averaged over the years);
- the goal of the issue: GDNS >= 5 % relative mAP@10 on the unseen classes over the best of
  {S ft, S ft + best aggregation}, on >= 2 seeds.

    python benchmarks/fggan.py --smoke           # seconds-to-minutes, checks the path
    python benchmarks/fggan.py --steps 300       # a short real run (indicative)
    python benchmarks/fggan.py                   # the default run (about an hour on 2 cores)
    python benchmarks/fggan.py --study --seeds 1 --steps 300   # G's collapse: one change each

Every finished run is kept in benchmarks/results/<topic>.jsonl (`_common.RunStore`): the same
command started twice with `--threads 1` plays two runs at once, `--stored-only` prints the table.
Writes benchmarks/results/fggan_synthetic.md (`--study`: fggan_study.md, `--smoke`: fggan_smoke.md;
`<topic>_progress.md` while runs are missing).
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
    parser.add_argument("--full", action="store_true",
                        help="also CAE, GD, GDN* and GDN and the canonical-view and ℓ-layer studies (1 seed each)")
    parser.add_argument("--variants", help="comma-separated variants instead (e.g. GDNS for a short run)")
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--steps", type=int, help="game steps (default: the fggan config's epochs × steps)")
    parser.add_argument("--pretrain-steps", type=int, help="S's pre-training steps (default: the config's)")
    parser.add_argument("--image-size", type=int, help="default: the config's (64 px)")
    parser.add_argument("--cache-dir", default="runs/cache/fggan_semantic")
    parser.add_argument("--topic", help="results file name (default: fggan_synthetic, or fggan_smoke)")
    parser.add_argument("--step-time", action="store_true",
                        help="only the step-time ratio: one GDNS step against its players' separate steps")
    parser.add_argument("--study", action="store_true",
                        help="the study of G's collapse instead: GDNS with one change each (`STUDY`)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config key for every run, e.g. --set fggan.lam=0.1 (repeatable)")
    _common.add_store_options(parser)
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
    # The training classes among themselves: a G that collapses fails here too, one that only fails to
    # generalise to new classes does not.
    known = evaluation.retrieval_metrics(seen["embeddings"], seen["label"], **quiet)
    row["seen map@10"] = known["map@10"]
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


# The study of G's collapse (`--study`): GDNS runs, each with one change to the paper's settings
# (G's capacity, the weight of ℓ, the weight of S's term in G's loss); any other change is a `--set`.
STUDY = {
    "GDNS": [],
    "GDNS, λ 0.1": ["fggan.lam=0.1"],
    "GDNS, S term 0.1": ["fggan.semantic_weight=0.1"],
    "GDNS, G skips": ["fggan.generator_skips=true"],
    "GDNS, residual G": ["fggan.generator_residual=true"],
}
ABLATIONS = ("CAE", "GD", "GDN*", "GDN")  # 1 seed each, indicative
# The paper's two studies (Tables 5 and 6), behind --full, 1 seed each, indicative: the canonical view
# (its five, as azimuths of 8; the stock photos are rendered at it, so S is pre-trained anew on each) and
# the layer of N that ℓ is measured on. The front view and conv4 are the defaults: the GDNS row itself.
# A canonical-view row is measured on its own data (its stock photos at that view): read those rows
# against each other and the GDNS row, not against the front-view S ft.
CANONICAL_VIEWS = {"front-side": 1, "side": 2, "rear-side": 3, "rear": 4}
STUDIES = {
    **{f"GDNS, canonical {name}": [f"data.stock_view={view}", f"fggan.canonical_view={view}"]
       for name, view in CANONICAL_VIEWS.items()},
    **{f"GDNS, ℓ on {layer}": [f"fggan.recon_layer={layer}"] for layer in ("conv1", "conv2", "conv3")},
}


def games(args):
    """label -> overrides of every game this invocation plays (each also gets S and S ft)."""
    if args.study:
        return dict(STUDY)
    variants = args.variants.split(",") if args.variants else ["GDN*S", "GDNS", *(ABLATIONS if args.full else ())]
    played = {variant: [f"train.variant={variant}"] for variant in variants}
    if not args.variants:  # the paper's GDNS beside the one whose G starts as the identity (the study's finding)
        played["GDNS, residual G"] = STUDY["GDNS, residual G"]
    if args.full:
        played.update(STUDIES)
    return played


def measure(label, config, splits):
    """Trains the embedder `label` names ("S", "S ft" or a game) and evaluates every feature of it."""
    from fgkeras import experiments
    from fgkeras.models import CanonicalEmbedder

    train_set, test_set = splits()
    start = time.perf_counter()
    if label == "S":
        generator, semantic = None, experiments.pretrained_semantic(config, train_set, verbose=0)[0]
    elif label == "S ft":
        steps = config.train.epochs * config.train.steps_per_epoch
        generator, semantic = None, fine_tune_alone(config, train_set, steps)
    else:
        game, _ = experiments.train(config, train_set=train_set, verbose=0)
        generator, semantic = game.generator, game.semantic
    seconds = time.perf_counter() - start
    features = {feature: protocols(CanonicalEmbedder(generator, semantic, feature=feature), train_set, test_set,
                                   config) for feature in FEATURES}
    return {"method": label, "seed": config.train.seed, "train_seconds": round(seconds), "features": features}


def run(args, topic):
    """Rows of every embedder and feature over the seeds, from the store or trained here.

    Every run is kept in `results/<topic>.jsonl` (`_common.RunStore`), so the same command
    started twice (`--threads 1` each) plays two runs at once and a run cut short is the only
    one lost. Returns `(rows, seconds, config, labels, complete)`.
    """
    import functools

    from fgkeras import configs, experiments

    store = _common.RunStore(topic, enabled=not args.smoke)
    labels = {"S": ["train.variant=S"], "S ft": ["train.variant=S ft"], **games(args)}
    rows, seconds, complete = [], {}, True
    for seed in range(args.seeds):
        config = make_config(args, seed)
        splits = functools.cache(functools.partial(experiments.load_data, config.data))
        for label, overrides in labels.items():
            if seed > 0 and (label in ABLATIONS or label in STUDIES):
                continue
            keyed = configs.override(configs.ExperimentConfig.from_dict(config.to_dict()), overrides)
            result = _common.measured_run(keyed, store, functools.partial(measure, label, splits=splits),
                                          train_missing=not args.stored_only)
            if result is None:
                complete = False
                continue
            seconds.setdefault(label, []).append(result["train_seconds"])
            for feature, row in result["features"].items():
                name = label if feature == "embedding" else f"{label} + {feature.upper()}"
                rows.append({"method": name, "seed": seed, **row})
                if feature == "embedding":
                    logging.info("%s seed %d: unseen mAP@10 %.3f", name, seed, row["unseen map@10"])
    return rows, seconds, config, list(labels), complete


def summarise(rows):
    """Mean over seeds per method, with the spread (max - min) of the unseen mAP@10."""
    import numpy as np

    by_method = {}
    for row in rows:
        by_method.setdefault(row["method"], []).append(row)
    summary = []
    for method, group in by_method.items():
        keys = dict.fromkeys(k for r in group for k in r if k not in ("method", "seed"))
        # A figure added to the protocols later is averaged over the runs that have it.
        mean = {k: float(np.mean([r[k] for r in group if k in r])) for k in keys}
        values = [r["unseen map@10"] for r in group]
        summary.append({"method": method, "seeds": len(group), **mean, "spread": max(values) - min(values)})
    return summary


def step_time_ratio(image_size=64, width=0.5, base_width=32, pairs=32, steps=10):
    """One GDNS `train_step` against the sum of its players' separate steps, on one batch.

    The separate steps are what a strictly alternating Alg. 1 would run: D, N and S each a
    forward-backward on their own inputs (G's images computed once, outside), and G's step a
    forward through every player and a backward into G. Each applies its own optimizer.
    Returns `(ratio, fused_seconds, separate_seconds)` per step (goal: ratio <= 1.15).
    """
    import keras
    import numpy as np
    import tensorflow as tf

    from fgkeras import models
    from fgkeras.models import fggan

    keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    batch = {key: tf.constant(rng.integers(0, 256, (pairs, image_size, image_size, 3)).astype("float32"))
             for key in ("image", "canonical", "positive")}
    batch["label"] = tf.constant(np.repeat(np.arange(pairs // 4), 4).astype("int32"))
    semantic = models.build_embedder("resnet18", width=width, image_size=image_size)
    game = models.build_fggan(semantic, pairs // 4, image_size, base_width=base_width)
    game.compile()
    real, labels = batch["image"], batch["label"]
    generated = game.generator(real, training=True)

    def step(name, loss_of):
        variables, optimizer = game.player_variables(name), game.optimizers[name]

        @tf.function
        def run():
            with tf.GradientTape() as tape:
                loss = loss_of()
            optimizer.apply(tape.gradient(loss, variables), variables)
            return loss
        return run

    # Each player's own forward pass, scored by the game's own loss of that player.
    def discriminator_loss():
        logits = game.discriminator(tf.concat([real, generated], 0), training=True)
        return game._discriminator_loss({"d_real": logits[:pairs], "d_fake": logits[pairs:]})

    def normalizer_loss():
        pairs_in = tf.concat([fggan.make_pairs(batch["positive"], batch["canonical"]),
                              fggan.make_pairs(generated, batch["canonical"])], 0)
        logits = game.normalizer(pairs_in, training=True)
        return game._normalizer_loss({"n_positive": logits[:pairs], "n_negative": logits[pairs:]})

    def semantic_loss():
        logits = game.classifier(game.semantic.features(tf.concat([real, generated], 0), training=True))
        return game._semantic_loss({"labels": labels, "s_real": logits[:pairs], "s_fake": logits[pairs:]})

    def generator_loss():
        return game._generator_loss(game._play(batch, training=True))

    separate = [step("discriminator", discriminator_loss), step("normalizer", normalizer_loss),
                step("semantic", semantic_loss), step("generator", generator_loss)]
    fused = tf.function(game.train_step)

    def seconds_per_step(functions):
        for function in functions:
            function()  # traces
        start = time.perf_counter()
        for _ in range(steps):
            for function in functions:
                function()
        return (time.perf_counter() - start) / steps

    fused_seconds = seconds_per_step([lambda: fused(batch)])
    separate_seconds = seconds_per_step(separate)
    return fused_seconds / separate_seconds, fused_seconds, separate_seconds


def _best_feature(by_method, label):
    return max((row for method, row in by_method.items() if method == label or method.startswith(f"{label} +")),
               key=lambda row: row["unseen map@10"], default=None)


def against_rival(summary, games):
    """Each game's best feature against the best of S ft and S ft + aggregation (unseen mAP@10, %)."""
    by_method = {row["method"]: row for row in summary}
    rival = _best_feature(by_method, "S ft")
    rows = []
    for label in games:
        best = _best_feature(by_method, label)
        if best is None or rival is None:
            continue
        rows.append({"game": label, "best feature": best["method"], "seeds": best["seeds"],
                     "unseen map@10": f"{100 * best['unseen map@10']:.1f}", "spread": f"{100 * best['spread']:.1f}",
                     "rival": rival["method"], "rival map@10": f"{100 * rival['unseen map@10']:.1f}",
                     "gain": best["unseen map@10"] / rival["unseen map@10"] - 1})
        rows[-1]["relative gain"] = f"{100 * rows[-1]['gain']:+.1f} %"
    return rows


def goal(rows):
    """The issue's goal, from `against_rival`'s GDNS row."""
    gdns = next((row for row in rows if row["game"] == "GDNS"), None)
    if gdns is None:
        return "GDNS was not run."
    met = gdns["gain"] >= 0.05 and gdns["seeds"] >= 2
    return (f"Best GDNS feature: {gdns['best feature']}, unseen mAP@10 {gdns['unseen map@10']} (spread between "
            f"seeds {gdns['spread']}); best rival: {gdns['rival']}, {gdns['rival map@10']}. Relative gain "
            f"{gdns['relative gain']} → goal (>= +5 %, >= 2 seeds) {'met' if met else 'not met'}.")


def main(argv=None):
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if args.smoke:
        args.seeds = min(args.seeds, 1)
    from fgkeras.evaluation import format_table

    _common.set_threads(args)
    if args.step_time:
        ratio, fused, separate = step_time_ratio()
        text = (f"- one GDNS step / the sum of its players' separate steps: **{ratio:.2f}** (goal ≤ 1.15)\n"
                f"- seconds per step: fused {fused:.3f}, separate {separate:.3f} (64 px, 32 pairs, S = ResNet-18 "
                f"width 0.5, G, D, N width 32; 10 steps after tracing)")
        print(text)
        print("wrote", _common.write_results("fggan_step_time", [("Step time", text)]))
        return
    topic = args.topic or ("fggan_smoke" if args.smoke else "fggan_study" if args.study else "fggan_synthetic")
    rows, seconds, config, labels, complete = run(args, topic)
    games_run = labels[2:]
    summary = summarise(rows)
    gains = against_rival(summary, games_run)
    columns = ["method", "seeds", "unseen map@5", "unseen map@10", "unseen map@20", "unseen p@10", "spread",
               "stock map@10", "mixed map@10", "growing map@10", "seen map@10"]
    steps = config.train.epochs * config.train.steps_per_epoch
    setup = (f"Synthetic vehicles at {config.data.image_size} px ({config.data.num_makes} makes × "
             f"{config.data.models_per_make} models, {config.data.images_per_class} images per class, half of the "
             f"models unseen), S = {config.model.backbone} width {config.model.width}, embedding "
             f"{config.model.embedding_dim}, pre-trained {config.fggan.pretrain_steps} steps (no-bias softmax, "
             f"cached); then {steps} steps of batches of "
             f"{config.train.classes_per_batch * config.train.images_per_class} for S ft and for each game "
             f"(G, D, N width {config.fggan.width}, Adam 2e-4 β1 0.5). Seeds: {args.seeds} "
             f"(CAE/GD/GDN*/GDN and the studies: 1). Games: {', '.join(games_run)}. All figures on the unseen classes.")
    timing = "\n".join(f"- {name}: {', '.join(f'{s:.0f} s' for s in values)}" for name, values in seconds.items())
    gain_keys = ["game", "best feature", "seeds", "unseen map@10", "spread", "rival", "rival map@10", "relative gain"]
    path = _common.write_results(topic if complete else f"{topic}_progress", [
        ("Setup", setup),
        ("Goal", goal(gains)),
        ("Each game against S fine-tuned alone (unseen mAP@10, %)", format_table(gains, keys=gain_keys)),
        ("Retrieval on the unseen classes (mean over seeds; mAP and P in %)", format_table(summary, keys=columns)),
        ("Per seed", format_table(rows, keys=["method", "seed", "unseen map@10", "stock map@10", "mixed map@10"])),
        ("Wall time", timing),
    ])
    print(format_table(summary, keys=columns))
    print(format_table(gains, keys=gain_keys))
    print(goal(gains))
    print(f"Written to {path}")


if __name__ == "__main__":
    main()
