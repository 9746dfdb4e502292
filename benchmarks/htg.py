"""HTG reproduction: triplet-random, batch-hard (OHEM), HTG and HTG+KPM side by side.

Same backbone, image size and number of images seen: every method trains for
`train.epochs`; HTG spends the first `train.warmup_epochs` of them on its basic model.
Recall@K and mAP@R on unseen classes (synthetic vehicles; cars196_half 99–196 when
present), mean ± std over seeds; then the step-time ratios on one batch.

    python benchmarks/htg.py [--seeds 3] [--set ...] [--smoke] [--skip-cars]
"""

import _common
import keras
import numpy as np
from baselines import METRICS, budget, comparison_parser, configured_datasets

from fgkeras.evaluation import format_table
from fgkeras.models import build_baseline, build_embedder, build_htg


VARIANTS = {
    "triplet_random": ["train.method=triplet_random"],
    "batch_hard (OHEM)": ["train.method=triplet_batch_hard"],
    "HTG": ["train.method=htg"],
    "HTG+KPM": ["train.method=htg", "model.kpm=true"],
}

# `--ablations`: what HTG's result depends on, one change at a time from the default HTG (the game on
# 14 of the 20 epochs, one cosine over the budget, random triplets, μ = β = γ = 1, KPM on P4,P5).
ABLATIONS = {
    "HTG (default)": ["train.method=htg"],
    "basic model only, no game": ["train.method=basic"],
    "shorter game (warm-up 12 of 20 epochs)": ["train.method=htg", "train.warmup_epochs=12"],
    "constant lr, no decay": ["train.method=htg", "train.decay_epochs=1000"],
    "a cosine per phase": ["train.method=htg", "train.restart_schedule=true"],
    "batch-hard triplets in the game": ["train.method=htg", "train.triplets=batch_hard"],
    "μ = 0 (F without D's identity loss)": ["train.method=htg", "train.mu=0"],
    "HTG+KPM (default)": ["train.method=htg", "model.kpm=true"],
    "HTG+KPM on P3,P4": ["train.method=htg", "model.kpm=true", "model.kpm_levels=P3,P4"],
    "HTG+KPM, a cosine per phase": ["train.method=htg", "model.kpm=true", "train.restart_schedule=true"],
}


def with_restart_control(variants):
    """Each variant, then the same with a warm restart of the learning rate after the warm-up
    (HTG: a cosine per phase; the others: the same restart at the same epoch), so one run
    decides which schedule every metric-learning method should default to."""
    controlled = {}
    for label, overrides in variants.items():
        controlled[label] = overrides
        controlled[f"{label}, restart"] = [*overrides, "train.restart_schedule=true"]
    return controlled


def htg_note(config):
    """HTG's recipe as the config sets it (each row's changes from it are in its label)."""
    train, model = config.train, config.model
    warmup = {"random": "random", "batch_hard": "batch-hard"}.get(train.warmup_triplets, train.warmup_triplets)
    game = {"random": "random", "batch_hard": "batch-hard"}.get(train.triplets, train.triplets)
    kpm = f"KPM on {model.kpm_levels}" + ("" if model.kpm else " for the +KPM rows")
    return (f"HTG: {train.warmup_epochs} of the {train.epochs} epochs on the basic model (no-bias softmax + "
            f"{warmup} triplets, lr {train.warmup_learning_rate}), the rest on the game ({game} triplets, "
            f"μ = {train.mu}, β = {train.beta}, γ = {train.gamma}); {kpm}.")


def step_ratios(image_size=64, width=0.5, steps=20):
    """Images/s of the batch-hard basic step, the HTG game step and plain fit, same batch."""
    from fgkeras import losses

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (64, image_size, image_size, 3)).astype("uint8")
    labels = np.repeat(np.arange(16), 4).astype("int32")

    def embedder():
        keras.utils.set_random_seed(0)
        return build_embedder("resnet18", width=width, image_size=image_size)

    plain = embedder()
    plain.compile(optimizer="adam", loss=losses.BatchHardTripletLoss())
    basic = build_baseline("triplet_batch_hard", embedder())
    basic.compile(optimizer="adam")
    game = build_htg(embedder(), num_classes=16)
    game.compile(f_optimizer=keras.optimizers.Adam(1e-3), g_optimizer=keras.optimizers.Adam(1e-3),
                 d_optimizer=keras.optimizers.Adam(1e-3))
    rates = {name: _common.fit_images_per_second(model, images, labels, steps)
             for name, model in [("plain", plain), ("basic", basic), ("htg", game)]}
    return (f"- step time HTG / batch-hard basic step: **{rates['basic'] / rates['htg']:.2f}** (goal ≤ 1.15)\n"
            f"- step time batch-hard custom train_step / plain fit with the loss: "
            f"**{rates['plain'] / rates['basic']:.2f}** (goal ≤ 1.1)\n"
            f"- images/s: plain {rates['plain']:.0f}, basic {rates['basic']:.0f}, HTG {rates['htg']:.0f} "
            f"(ResNet-18 width {width}, {image_size} px, batch 16×4)")


def main():
    parser = comparison_parser(__doc__)
    parser.add_argument("--skip-step-time", action="store_true")
    parser.add_argument("--ablations", action="store_true", help="run ABLATIONS instead of the methods")
    parser.add_argument("--only", action="append", metavar="LABEL", help="run only these variants")
    parser.add_argument("--restart-control", action="store_true",
                        help="also run every variant with train.restart_schedule=true, in the same table")
    args = parser.parse_args()
    _common.set_threads(args)

    variants, prefix = (ABLATIONS, "htg_ablations") if args.ablations else (VARIANTS, "htg")
    if args.restart_control:
        variants = with_restart_control(variants)
    if args.only:
        unknown = set(args.only) - set(variants)
        if unknown:
            parser.error(f"unknown variants {sorted(unknown)}; known: {sorted(variants)}")
        variants = {label: variants[label] for label in args.only}
    for slug, name, config in configured_datasets(args):
        store = _common.RunStore(f"{prefix}_{slug}", enabled=not args.smoke)
        rows = _common.compare_variants(config, variants, range(args.seeds), METRICS, store,
                                        train_missing=not args.stored_only)
        table = format_table(rows, keys=["method", "seeds", *METRICS, "train_seconds"])
        print(f"\n{name}\n{table}", flush=True)
        note = htg_note(config) + " " + budget(config, htg=True)
        topic = _common.results_topic(f"{prefix}_{slug}", rows, variants, range(args.seeds))
        print("wrote", _common.write_results(topic, [(name, table + "\n\n" + note)]))
    if not args.skip_step_time:
        ratios = step_ratios()
        print(ratios)
        print("wrote", _common.write_results("htg_step_time", [("Step time", ratios)]))


if __name__ == "__main__":
    main()
