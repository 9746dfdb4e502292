"""ViewGAN reproduction on the synthetic vehicles (#14): ablation table, few-shot table, step time.

Trains each variant of Table 2 on the train classes (every instance in the 5 front-facing
views), then on the unseen classes measures identity preservation (KNN top-1 / top-5 of the
generated images), view accuracy (an independent view classifier) and the distance to the
renderer's true image; then the few-shot protocol without and with the full model's
augmentation; and the time of one ViewGAN step against one forward-backward of G and D.

    python benchmarks/viewgan.py --smoke          # about 5 minutes on 2 cores: a check that it runs
    python benchmarks/viewgan.py                  # the default benchmark (<= 60 minutes)
    python benchmarks/viewgan.py --full           # every variant, longer training, more splits

Only figures: nothing here is a test.
"""

import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import tensorflow as tf

from fgkeras import configs
from fgkeras.evaluation import identity
from fgkeras.evaluation import viewgan as vg
from fgkeras.index import best_seconds

logger = logging.getLogger("benchmarks.viewgan")


def _config(args):
    config = configs.get_config("viewgan")
    if args.smoke:
        vg.viewgan_smoke(config)
        config.train.epochs, config.train.steps_per_epoch = 1, args.steps or 40
        config.viewgan.repeats = 1
    else:
        config.data.image_size = 64
        config.viewgan.connection_scale = 4  # 16×16, r = 4 (1/8 would be 8×8, nearly covered by the window)
        config.train.epochs, config.train.steps_per_epoch = 1, args.steps or (1500 if args.full else 600)
        config.viewgan.repeats = 5 if args.full else 3
        if not args.full:  # the default run within 60 min on 2 cores: G, D of width 16, judges of width 0.5
            config.viewgan.width, config.model.width = 16, 0.5
    configs.override(config, args.set)
    return config


def step_time_ratio(game, batch, repeats=5):
    """(seconds of one train_step, of one G + D forward-backward, ratio), compiled, best of `repeats`."""
    images = tf.constant(batch["image"])
    labels, views, targets = (tf.constant(batch[k]) for k in ("label", "view", "target_view"))
    step = tf.function(lambda: game.train_step(batch))
    variables = game.generator.trainable_variables + game.discriminator.trainable_variables

    @tf.function
    def forward_backward():
        with tf.GradientTape() as tape:
            play = game._play(images, labels, views, targets, training=True)
            loss = tf.reduce_sum(play["real_identity"]) + tf.reduce_sum(play["fake_view"])
        return tape.gradient(loss, variables)

    step(), forward_backward()  # trace
    train = best_seconds(lambda: step(), repeats)
    plain = best_seconds(lambda: forward_backward(), repeats)
    return train, plain, train / plain


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny data and training: checks that it runs")
    parser.add_argument("--full", action="store_true", help="every variant, longer training, more splits")
    parser.add_argument("--variants", help="comma-separated variants (default: by mode)")
    parser.add_argument("--steps", type=int, help="training steps per variant")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--out", help="also write the tables and figures as JSON here")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    config = _config(args)
    if args.variants:
        variants = args.variants.split(",")
    elif args.smoke:
        variants = ["vanilla", "full"]
    elif args.full:
        variants = ["vanilla", "global_nc_4", "global_nc_8", "cnc_4", "cnc_8", "cnc_im", "full", "unet"]
    else:
        variants = ["vanilla", "cnc_4", "full", "unet"]

    start = time.time()
    _, train_arrays, unseen_arrays = vg.viewgan_data(config)
    logger.info("data: %d train, %d unseen images at %d px in %.0f s", len(train_arrays["label"]),
                len(unseen_arrays["label"]), train_arrays["image"].shape[1], time.time() - start)
    extractor, view_classifier = vg.judges(config, train_arrays, unseen_arrays, epochs=2 if args.smoke else 8)
    rows = {"real input (copy)": identity.identity_preservation(
        lambda images, targets: images, extractor, view_classifier, unseen_arrays,
        num_classes=vg._ints(config.viewgan.eval_classes, "eval_classes"), seed=config.train.seed)}
    games, seconds = {}, {}
    for variant in variants:
        config.train.variant = variant
        t = time.time()
        game, _ = vg.train_viewgan(config, train_arrays, verbose=0)
        seconds[variant] = time.time() - t
        games[variant] = game
        rows[variant] = vg.evaluate_viewgan(game, config, unseen_arrays, extractor, view_classifier,
                                            few_shot=False)["identity"]
        logger.info("%s: %s (%.0f s)", variant, rows[variant], seconds[variant])
    best = "full" if "full" in games else variants[-1]
    few_shot = vg.evaluate_viewgan(games[best], config, unseen_arrays, extractor, view_classifier)["few_shot"]
    probe = next(iter(vg.view_pairs({**train_arrays, "label": np.unique(train_arrays["label"], return_inverse=True)[1]},
                                    config.viewgan.batch_size)))
    batch = {k: v.numpy() for k, v in probe.items()}
    train_s, plain_s, ratio = step_time_ratio(games[best], batch)

    print(f"\nViewGAN on synthetic vehicles: {train_arrays['image'].shape[1]} px, "
          f"{len(np.unique(train_arrays['label']))} train / {len(np.unique(unseen_arrays['label']))} unseen classes, "
          f"{len(train_arrays['views'])} views, {config.train.epochs * config.train.steps_per_epoch} steps of "
          f"{config.viewgan.batch_size} per variant\n")
    print(identity.format_identity_rows(rows))
    print(f"\nFew-shot with {best} ({config.viewgan.per_image} generated per image):\n")
    print(identity.format_few_shot_rows(few_shot))
    print(f"\nStep time ({best}, batch {config.viewgan.batch_size}): train_step {1000 * train_s:.0f} ms, "
          f"G + D forward-backward {1000 * plain_s:.0f} ms, ratio {ratio:.2f}")
    print("Training seconds: " + ", ".join(f"{v} {s:.0f}" for v, s in seconds.items())
          + f"; total {time.time() - start:.0f} s")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"config": config.to_dict(), "identity": rows, "few_shot": few_shot,
                       "step_seconds": {"train_step": train_s, "forward_backward": plain_s, "ratio": ratio},
                       "train_seconds": seconds}, f, indent=2, default=float)
    return 0


if __name__ == "__main__":
    sys.exit(main())
