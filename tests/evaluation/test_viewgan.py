"""`fgkeras.evaluation.viewgan`: ViewGAN trained from a configuration."""

import numpy as np

from fgkeras import configs
from fgkeras.evaluation import viewgan


def test_train_viewgan_builds_and_fits_the_game_in_the_configured_strategy(mirrored_strategy):
    # `fgkeras train --method viewgan` calls `train_viewgan` itself, not `experiments.train`, so the
    # strategy scope must be its own. Mutation tried: `train_viewgan` without it (the code before)
    # trains on one device and fails the first assertion.
    config = configs.override(viewgan.viewgan_smoke(configs.get_config("viewgan")), [
        "train.distribute=mirrored", "train.epochs=1", "train.steps_per_epoch=1"])
    game, history = viewgan.train_viewgan(config, verbose=0)
    assert game.distribute_strategy is mirrored_strategy and mirrored_strategy.num_replicas_in_sync == 2
    assert {"g_loss", "d_loss"} <= set(history.history)
    assert all(np.isfinite(history.history[name]).all() for name in ("g_loss", "d_loss"))
