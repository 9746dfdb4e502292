"""FGGAN (`fgkeras.models.fggan`): the game's wiring, its variants, distribution and saving.

The reference below writes Eqs. (4)-(6), ℓ and G's loss out from the paper with plain
TensorFlow ops on the players themselves (not the module's loss helpers). One `train_step`
with SGD must move each player by exactly -lr × the gradient of its own loss: a mis-wired
term, sign, weight, pair, label, image or variable list changes some player's step.
See tests/models/MUTATIONS.md (## FGGAN).
"""

import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras import layers as fg_layers
from fgkeras.models import fggan
from fgkeras.models.fggan import (
    VARIANTS,
    CanonicalEmbedder,
    ViewNormalizingGAN,
    build_discriminator,
    build_fggan,
    build_generator,
    build_normalizer,
    make_pairs,
    reconstruction_loss,
)

K = 4
SIZE = 16
WIDTH = 4
LAM, SEMANTIC_WEIGHT = 2.0, 0.5  # not the defaults, so that a weight left out changes the step
RATES = {"discriminator": 0.1, "normalizer": 0.2, "semantic": 0.3, "generator": 0.4}  # a swap shows


def _batch(seed=0, n=8):
    rng = np.random.default_rng(seed)
    batch = {key: rng.integers(0, 256, (n, SIZE, SIZE, 3)).astype("float32")
             for key in ("image", "canonical", "positive")}
    batch["label"] = (np.arange(n) % K).astype("int32")
    return batch


def _values(variables):
    return [np.array(v) for v in variables]


def _game(tiny_embedder, variant="GDNS", seed=0, **kwargs):
    semantic = tiny_embedder(seed=seed)
    keras.utils.set_random_seed(seed + 1)
    return build_fggan(semantic, K, SIZE, variant=variant, base_width=WIDTH, **kwargs)


def _sgd_game(tiny_embedder, variant="GDNS", **kwargs):
    game = _game(tiny_embedder, variant, **{"lam": LAM, "semantic_weight": SEMANTIC_WEIGHT, **kwargs})
    short = {"generator": "g", "discriminator": "d", "normalizer": "n", "semantic": "s"}
    game.compile(**{f"{short[p]}_optimizer": keras.optimizers.SGD(RATES[p]) for p in game.players})
    return game


def _bce(logits, label):
    logits = tf.reshape(logits, (-1,))
    return tf.reduce_mean(tf.nn.sigmoid_cross_entropy_with_logits(tf.fill(tf.shape(logits), label), logits))


def _ce(labels, logits):
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _paper_losses(game, batch):
    """Each player's loss of the paper for `game.variant`, on one training-mode pass."""
    uses = VARIANTS[game.variant]
    x_r, x_c, x_p = (tf.constant(batch[k]) for k in ("image", "canonical", "positive"))
    y = tf.constant(batch["label"])
    x_z = game.generator(x_r, training=True)
    losses = {}
    g_terms = []
    if uses["discriminator"]:
        d = game.discriminator(tf.concat([x_r, x_z], 0), training=True)
        d_real, d_fake = d[:len(x_r)], d[len(x_r):]
        losses["discriminator"] = _bce(d_real, 1.0) + _bce(d_fake, 0.0)  # (4)
        g_terms.append(_bce(d_fake, 1.0))
    if uses["normalizer"]:
        pairs = [tf.concat([x_p, x_c], -1), tf.concat([x_z, x_c], -1)]
        if uses["reconstruction"]:  # ℓ's target: N's features of the canonical photo with itself
            pairs.append(tf.concat([x_c, x_c], -1))
        pairs = tf.concat(pairs, 0)
        play = keras.Model(game.normalizer.inputs,
                           [game.normalizer.outputs[0], game.normalizer.get_layer(f"{game.recon_layer}_act").output])
        logits, features = play(pairs, training=True)
        n = len(x_r)
        losses["normalizer"] = _bce(logits[:n], 1.0) + _bce(logits[n:2 * n], 0.0)  # (5)
        g_terms.append(_bce(logits[n:2 * n], 1.0))
        if uses["reconstruction"]:
            f_z, f_c = tf.reshape(features[n:2 * n], (n, -1)), tf.reshape(features[2 * n:], (n, -1))
            g_terms.append(game.lam * 0.5 * tf.reduce_mean(tf.square(f_z - f_c)))  # λℓ
    s_logits = game.classifier(game.semantic.features(tf.concat([x_r, x_z], 0), training=uses["semantic"]))
    if uses["semantic"]:
        losses["semantic"] = _ce(y, s_logits[:len(x_r)]) + _ce(y, s_logits[len(x_r):])  # (6)
        g_terms.append(game.semantic_weight * _ce(y, s_logits[len(x_r):]))
    if not (uses["discriminator"] or uses["normalizer"]):  # CAE: G reconstructs x_c
        g_terms.append(tf.reduce_mean(tf.square((x_z - x_c) / 127.5)))
    losses["generator"] = tf.add_n(g_terms)
    return losses


def _own_variables(game, name):
    """What each player owns, listed here rather than taken from the game: S is its embedder and its head."""
    if name == "semantic":
        return [*game.semantic.trainable_variables, *game.classifier.trainable_variables]
    return getattr(game, name).trainable_variables


def _expected_sgd_step(game, batch):
    with tf.GradientTape(persistent=True) as tape:
        losses = _paper_losses(game, batch)
    expected = {}
    for name in game.players:
        variables = _own_variables(game, name)
        gradients = tape.gradient(losses[name], variables)
        expected[name] = [np.array(v) - RATES[name] * (0 if g is None else np.array(g))
                          for v, g in zip(variables, gradients)]
    return {name: float(v) for name, v in losses.items()}, expected


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_one_train_step_is_sgd_on_each_players_loss_of_the_paper(variant, tiny_embedder):
    batch = _batch()
    game = _sgd_game(tiny_embedder, variant)
    # The pre-trained S of the variants without S: every weight, its batch norms' statistics too.
    frozen = [] if "semantic" in game.players else [*game.semantic.weights, *game.classifier.weights]
    before = _values(frozen)
    losses, expected = _expected_sgd_step(game, batch)
    logs = game.train_step(batch)
    for name in game.players:
        variables = _own_variables(game, name)
        for variable, got, want in zip(variables, _values(variables), expected[name]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5, err_msg=f"{name}: {variable.path}")
        np.testing.assert_allclose(float(logs[f"{name[0]}_loss"]), losses[name], rtol=1e-5, err_msg=name)
    for variable, b, a in zip(frozen, before, _values(frozen)):  # never moves, not even in inference mode
        np.testing.assert_array_equal(a, b, err_msg=variable.path)


def test_the_update_order_is_the_papers_and_every_player_moves(tiny_embedder):
    game = _sgd_game(tiny_embedder, "GDNS")
    assert game.players == ["discriminator", "normalizer", "semantic", "generator"]  # Alg. 1: D → N → S → G
    before = {name: _values(game.player_variables(name)) for name in game.players}
    game.train_step(_batch())
    for name in game.players:
        after = _values(game.player_variables(name))
        moved = [not np.array_equal(b, a) for b, a in zip(before[name], after)]
        assert sum(moved) >= len(moved) - 1, f"{name}: {moved}"


def test_players_own_disjoint_variables_and_the_variant_has_only_its_players(tiny_embedder):
    game = _game(tiny_embedder, "GDNS")
    paths = {name: {id(v) for v in game.player_variables(name)} for name in game.players}
    for name in game.players:
        assert [id(v) for v in game.player_variables(name)] == [id(v) for v in _own_variables(game, name)], name
    for a in paths:
        for b in paths:
            assert a == b or not paths[a] & paths[b], (a, b)
    assert {id(v) for v in game.trainable_variables} == set().union(*paths.values())
    gd = _game(tiny_embedder, "GD")
    assert gd.players == ["discriminator", "generator"] and gd.normalizer is None


def test_normalizer_pairs_stack_x_then_canonical_on_channels(tiny_embedder):
    batch = _batch()
    pairs = np.asarray(make_pairs(batch["image"], batch["canonical"]))
    assert pairs.shape == (8, SIZE, SIZE, 6)
    np.testing.assert_array_equal(pairs[..., :3], batch["image"])
    np.testing.assert_array_equal(pairs[..., 3:], batch["canonical"])
    game = _game(tiny_embedder, "GDNS")
    play = game._play(batch, training=False)
    generated = np.asarray(game.generator(batch["image"]))
    positive = game.normalizer(make_pairs(batch["positive"], batch["canonical"]))
    negative = game.normalizer(make_pairs(generated, batch["canonical"]))
    np.testing.assert_allclose(np.asarray(play["n_positive"]), np.asarray(positive), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(play["n_negative"]), np.asarray(negative), rtol=1e-5, atol=1e-5)


def test_the_literal_positive_pair_is_the_canonical_photo_with_itself(tiny_embedder):
    batch = _batch()
    del batch["positive"]  # not needed by the literal reading
    game = _game(tiny_embedder, "GDNS", positive_pair="identical")
    play = game._play(batch, training=False)
    expected = game.normalizer(make_pairs(batch["canonical"], batch["canonical"]))
    np.testing.assert_allclose(np.asarray(play["n_positive"]), np.asarray(expected), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="needs batch keys \\['positive'\\]"):
        _game(tiny_embedder, "GDNS")._play(batch)


def test_reconstruction_loss_is_zero_for_identical_features_and_half_the_mse():
    features = np.random.default_rng(0).normal(size=(3, 2, 2, 5)).astype("float32")
    assert float(reconstruction_loss(features, features)) == 0.0
    np.testing.assert_allclose(float(reconstruction_loss(features, features + 2.0)), 0.5 * 4.0, rtol=1e-6)


@pytest.mark.parametrize("recon_layer", ["conv2", "conv4"])
def test_reconstruction_is_measured_on_the_chosen_layer_of_n(recon_layer, tiny_embedder):
    batch = _batch()
    game = _game(tiny_embedder, "GDN", recon_layer=recon_layer)
    play = game._play(batch, training=False)
    layer = keras.Model(game.normalizer.inputs, game.normalizer.get_layer(f"{recon_layer}_act").output)
    generated = game.generator(batch["image"])
    expected = reconstruction_loss(layer(make_pairs(generated, batch["canonical"])),
                                   layer(make_pairs(batch["canonical"], batch["canonical"])))
    np.testing.assert_allclose(float(game._reconstruction_loss(play)), float(expected), rtol=1e-5)


def test_reconstruction_moves_g_only(tiny_embedder):
    # λ changes G's step and no other player's: ℓ is minimised by G alone.
    batch = _batch()
    steps = {}
    for lam in (0.0, 50.0):
        game = _sgd_game(tiny_embedder, "GDNS", lam=lam)
        game.train_step(batch)
        steps[lam] = {name: _values(game.player_variables(name)) for name in game.players}
    for name in ("discriminator", "normalizer", "semantic"):
        for a, b in zip(steps[0.0][name], steps[50.0][name]):
            np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=name)
    assert any(not np.allclose(a, b) for a, b in zip(steps[0.0]["generator"], steps[50.0]["generator"]))


def test_generator_keeps_the_image_size_and_the_pixel_range():
    generator = build_generator(32, base_width=4)
    images = np.random.default_rng(0).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    out = np.asarray(generator(images))
    assert out.shape == (2, 32, 32, 3) and out.min() >= 0.0 and out.max() <= 255.0
    assert fggan.default_depth(32) == 3 and fggan.default_depth(64) == 4 and fggan.default_depth(16) == 2
    assert [f"conv{i}" for i in range(1, 5)] == [l.name for l in build_normalizer(16, 4).layers
                                                 if isinstance(l, keras.layers.Conv2D)]


@pytest.mark.parametrize("skips", [False, True])
def test_only_a_generator_with_skips_passes_its_input_around_the_bottleneck(skips):
    generator = build_generator(32, base_width=4, skips=skips)
    bottleneck = generator.get_layer(f"down{fggan.default_depth(32)}")
    bottleneck.set_weights([np.zeros_like(w) for w in bottleneck.get_weights()])
    images = np.random.default_rng(1).integers(0, 256, (2, 32, 32, 3)).astype("uint8")
    out = np.asarray(generator(images, training=False))
    assert out.shape == (2, 32, 32, 3)
    assert np.abs(out[0] - out[1]).max() > 1e-3 if skips else np.allclose(out[0], out[1])


def test_a_residual_generator_starts_as_the_identity_and_learns_away_from_it():
    generator = build_generator(32, base_width=4, residual=True)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3)).astype("float32")
    np.testing.assert_allclose(np.asarray(generator(images, training=False)), images, atol=1e-3)
    optimizer = keras.optimizers.Adam(1e-2)
    target = 255.0 - images  # a change no identity can fit
    for _ in range(3):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(tf.square(generator(images, training=True) - target))
        optimizer.apply(tape.gradient(loss, generator.trainable_variables), generator.trainable_variables)
    out = np.asarray(generator(images, training=False))
    assert np.abs(out - images).max() > 1.0 and out.min() >= 0.0 and out.max() <= 255.0
    assert not np.allclose(np.asarray(build_generator(32, base_width=4)(images, training=False)), images, atol=1.0)


# --- the retrieval embedder ----------------------------------------------------------------------

def _hand_pooled(maps, feature):
    """MAC, SPoC, GeM (p = 3), CroW (a = b = 2) and SCDA written out in numpy."""
    if feature == "mac":
        return maps.max(axis=(1, 2))
    if feature == "spoc":
        return maps.mean(axis=(1, 2))
    if feature == "gem":
        return (np.maximum(maps, 1e-6) ** 3).mean(axis=(1, 2)) ** (1 / 3)
    if feature == "crow":
        x = np.maximum(maps, 0)
        spatial = x.sum(-1, keepdims=True)
        spatial = np.sqrt(spatial / np.sqrt((spatial**2).sum(axis=(1, 2), keepdims=True)))
        q = (x > 0).mean(axis=(1, 2))
        channel = np.log((x.shape[-1] * 1e-6 + q.sum(-1, keepdims=True)) / (1e-6 + q))
        return channel * (spatial * x).sum(axis=(1, 2))
    summed = maps.sum(-1, keepdims=True)  # scda
    mask = summed > summed.mean(axis=(1, 2), keepdims=True)
    avg = (maps * mask).sum(axis=(1, 2)) / mask.sum(axis=(1, 2))
    return np.concatenate([avg, np.where(mask, maps, -np.inf).max(axis=(1, 2))], -1)


@pytest.mark.parametrize("feature", ["mac", "spoc", "gem", "crow", "scda"])
def test_every_aggregation_gives_the_hand_computed_value_on_s_of_g(feature, tiny_embedder):
    game = _game(tiny_embedder, "GDNS")
    embedder = CanonicalEmbedder(game.generator, game.semantic, feature=feature)
    images = _batch()["image"][:3]
    maps = np.asarray(game.semantic.backbone(game.semantic.normalize_input(game.generator(images))))
    assert maps.shape[1:3] == (3, 3)  # a tiny map: every location counts
    expected = _hand_pooled(maps.astype("float64"), feature)
    np.testing.assert_allclose(np.asarray(embedder.features(images)), expected, rtol=1e-4, atol=1e-5)
    out = np.asarray(embedder(images))
    assert out.shape == (3, embedder.embedding_dim) == (3, expected.shape[-1])
    np.testing.assert_allclose(np.linalg.norm(out, axis=-1), 1.0, rtol=1e-5)


def test_the_embedder_is_s_of_g_and_s_alone_without_g(tiny_embedder):
    game = _game(tiny_embedder, "GDNS")
    images = _batch()["image"][:3]
    np.testing.assert_allclose(np.asarray(game.embedder(images)),
                               np.asarray(game.semantic(game.generator(images))), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(game.predict(images, verbose=0)), np.asarray(game.embedder(images)),
                               rtol=1e-5, atol=1e-6)
    alone = CanonicalEmbedder(None, game.semantic)
    np.testing.assert_allclose(np.asarray(alone(images)), np.asarray(game.semantic(images)), rtol=1e-5, atol=1e-6)
    assert game.embedder.generator is game.generator and game.embedder.semantic is game.semantic


# --- training, distribution, saving --------------------------------------------------------------

def _dataset(n=8, seed=0):
    return tf.data.Dataset.from_tensor_slices(_batch(seed, n)).batch(n)


@pytest.mark.parametrize("variant", ["CAE", "GDNS"])  # every variant steps in the SGD test above
def test_a_variant_trains_with_fit_and_the_papers_optimizers(variant, tiny_embedder):
    game = _game(tiny_embedder, variant)
    game.compile(run_eagerly=variant != "GDNS")  # one traced step, one eager (seconds, not a minute)
    history = game.fit(_dataset(), epochs=1, verbose=0)
    assert set(history.history) == {m.name for m in game.metrics}
    assert all(np.isfinite(v[0]) for v in history.history.values())
    for name in game.players:
        assert int(game.optimizers[name].iterations) == 1, name
    assert game.optimizer is game.optimizers["generator"]
    assert game.optimizers["generator"].learning_rate.numpy() == pytest.approx(2e-4)
    assert game.optimizers["generator"].beta_1 == 0.5


def _one_step(strategy, make_embedder):
    with strategy.scope():
        semantic = make_embedder(seed=5)
        keras.utils.set_random_seed(6)
        game = build_fggan(semantic, K, SIZE, base_width=WIDTH, lam=LAM, semantic_weight=SEMANTIC_WEIGHT)
        game.compile(**{f"{p[0]}_optimizer": keras.optimizers.SGD(RATES[p]) for p in game.players},
                     run_eagerly=True)  # tracing the distributed step takes a minute on 2 cores
        history = game.fit(_dataset(), epochs=1, verbose=0)
    return history.history, _values(game.weights)


def test_mirrored_step_equals_one_device_on_the_same_global_batch(mirrored_strategy, tiny_embedder):
    # 8 pairs, 4 per replica: every batch norm of G, D and N is synchronised, S's tiny backbone
    # has none, and the losses are divided by the replicas: the step must not differ.
    expected_logs, expected = _one_step(tf.distribute.get_strategy(), tiny_embedder)
    logs, got = _one_step(mirrored_strategy, tiny_embedder)
    semantic = tiny_embedder(seed=5)
    keras.utils.set_random_seed(6)
    initial = _values(build_fggan(semantic, K, SIZE, base_width=WIDTH).weights)
    assert sum(not np.allclose(a, b) for a, b in zip(expected, initial)) > 10  # the step did something
    for name in expected_logs:
        np.testing.assert_allclose(logs[name], expected_logs[name], rtol=1e-4, err_msg=name)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-5)


def test_keras_file_round_trip_of_the_trained_game_and_its_embedder(tmp_path, tiny_embedder):
    game = _game(tiny_embedder, "GDNS", recon_layer="conv3", feature="gem")
    game.compile(run_eagerly=True)
    game.fit(_dataset(), epochs=2, verbose=0)
    images = _batch(1)["image"]
    game.save(tmp_path / "game.keras")
    restored = keras.saving.load_model(tmp_path / "game.keras")
    assert isinstance(restored, ViewNormalizingGAN) and restored.compiled
    assert (restored.variant, restored.recon_layer, restored.feature) == ("GDNS", "conv3", "gem")
    np.testing.assert_allclose(restored.predict(images, verbose=0), game.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    for a, b in zip(game.weights, restored.weights):
        np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6, err_msg=a.path)
    for name in game.players:
        original, loaded = game.optimizers[name], restored.optimizers[name]
        assert loaded.iterations.numpy() == original.iterations.numpy() == 2
        for a, b in zip(original.variables, loaded.variables):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    game.embedder.save(tmp_path / "embedder.keras")
    embedder = keras.saving.load_model(tmp_path / "embedder.keras")
    assert isinstance(embedder, CanonicalEmbedder)
    np.testing.assert_allclose(np.asarray(embedder(images)), np.asarray(game.embedder(images)), rtol=1e-5, atol=1e-6)


# --- configuration -------------------------------------------------------------------------------

def test_images_smaller_than_gs_receptive_field_are_refused():
    with pytest.raises(ValueError, match="Images of 16 px are smaller than G's receptive field \\(22 px"):
        build_generator(16, depth=3)
    with pytest.raises(ValueError, match="must be a multiple of 8. Received: image_size=36"):
        build_generator(36, depth=3)


def test_batches_of_the_wrong_shape_or_channels_are_refused(tiny_embedder):
    game = _game(tiny_embedder, "GDNS")
    game.compile()
    batch = _batch()
    gray = {**batch, "image": batch["image"][..., :1]}
    with pytest.raises(ValueError, match="Batch 'image' must be \\(batch, H, W, 3\\) RGB images. "
                                         "Received shape \\(8, 16, 16, 1\\)"):
        game.train_step(gray)
    small = {**batch, "canonical": batch["canonical"][:, :8, :8]}
    with pytest.raises(ValueError, match="Batch 'canonical' must have G's image size \\(16, 16\\)"):
        game.train_step(small)
    with pytest.raises(ValueError, match="must be a dict with 'image', 'canonical', 'label'"):
        game.train_step((batch["image"], batch["label"]))


@pytest.mark.parametrize("kwargs, message", [
    ({"variant": "GDNSX"}, "`variant` must be one of"),
    ({"num_classes": 1}, "`num_classes` must be >= 2. Received: num_classes=1"),
    ({"recon_layer": "conv5"}, "`recon_layer` must be one of"),
    ({"lam": -1.0}, "`lam` must be >= 0. Received: lam=-1.0"),
    ({"semantic_weight": -0.1}, "`semantic_weight` must be >= 0"),
    ({"positive_pair": "same"}, "`positive_pair` must be one of"),
    ({"feature": "fc"}, "`feature` must be one of"),
    ({"normalizer": None}, "Variant 'GDNS' needs a `normalizer`. Received: normalizer=None"),
    ({"discriminator": build_discriminator(32, WIDTH)}, "`discriminator` must take images of G's size \\(16, 16\\)"),
    ({"normalizer": build_discriminator(SIZE, WIDTH)}, "`normalizer` must take \\(batch, H, W, 6\\) inputs"),
    ({"discriminator": build_normalizer(SIZE, WIDTH)}, "`discriminator` must take \\(batch, H, W, 3\\) inputs"),
    ({"classifier": fg_layers.NoBiasDense(K + 1)}, "S's classifier must have num_classes=4 outputs. Received: 5"),
])
def test_bad_configurations_are_refused(kwargs, message, tiny_embedder):
    arguments = {"generator": build_generator(SIZE, WIDTH), "semantic": tiny_embedder(), "num_classes": K,
                 "discriminator": build_discriminator(SIZE, WIDTH), "normalizer": build_normalizer(SIZE, WIDTH),
                 **kwargs}
    with pytest.raises(ValueError, match=message):
        ViewNormalizingGAN(**arguments)


def test_players_need_their_own_optimizers(tiny_embedder):
    game = _game(tiny_embedder, "GD")
    shared = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="Each player needs its own optimizer instance"):
        game.compile(g_optimizer=shared, d_optimizer=shared)
    game.compile(n_optimizer=shared)  # GD has no N: ignored
    assert set(game.optimizers) == {"discriminator", "generator"}


def test_s_pretraining_is_cached_by_config_hash(tmp_path, monkeypatch):
    from fgkeras import configs, experiments

    config = configs.smoke(configs.get_config("fggan"))
    config.data.num_makes, config.data.images_per_class = 2, 6
    config.fggan.pretrain_steps, config.fggan.cache_dir = 1, str(tmp_path)
    train_set, _ = experiments.load_data(config.data)
    semantic, classifier = experiments.pretrained_semantic(config, train_set, verbose=0)
    (folder,) = list(tmp_path.iterdir())
    assert sorted(p.name for p in folder.iterdir()) == ["classifier.npy", "semantic.weights.h5"]

    def no_training(*args, **kwargs):
        raise AssertionError("S was pre-trained again instead of loaded from the cache")

    monkeypatch.setattr(fggan, "pretrain_semantic", no_training)
    again, again_classifier = experiments.pretrained_semantic(config, train_set, verbose=0)
    for a, b in zip(semantic.weights, again.weights):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    np.testing.assert_array_equal(np.asarray(classifier.kernel), np.asarray(again_classifier.kernel))
    config.train.seed = 1  # another recipe: another folder, trained anew
    with pytest.raises(AssertionError, match="pre-trained again"):
        experiments.pretrained_semantic(config, train_set, verbose=0)


def test_the_identity_warm_up_teaches_g_to_give_back_its_input():
    keras.utils.set_random_seed(3)
    generator = build_generator(SIZE, WIDTH)
    # Smooth pictures (a colour per 8×8 block), which a small autoencoder can learn; noise it cannot.
    blocks = np.random.default_rng(0).integers(0, 256, (8, 2, 2, 3)).astype("float32")
    images = np.repeat(np.repeat(blocks, SIZE // 2, axis=1), SIZE // 2, axis=2)
    pairs = tf.data.Dataset.from_tensors({"image": images, "label": np.zeros(len(images), "int32")}).repeat()

    def error():  # batch statistics: 60 steps leave the moving averages of G's batch norms far behind
        return float(np.mean(np.square((np.asarray(generator(images, training=True)) - images) / 127.5)))

    before = _values(generator.weights)
    assert fggan.pretrain_generator(generator, pairs, steps=0) is None
    for a, b in zip(before, _values(generator.weights)):
        np.testing.assert_array_equal(a, b)
    start = error()
    history = fggan.pretrain_generator(generator, pairs, steps=60, optimizer=keras.optimizers.Adam(1e-2), verbose=0)
    assert len(history.history["loss"]) == 1
    assert error() < 0.5 * start


def test_the_config_gives_s_its_own_rate_in_the_game_and_warms_g_up(tmp_path, monkeypatch):
    from fgkeras import configs, experiments

    config = configs.smoke(configs.get_config("fggan"))
    config.data.num_makes, config.data.images_per_class = 2, 6
    config.fggan.cache_dir = str(tmp_path)
    config.fggan.generator_warmup_steps, config.fggan.semantic_learning_rate = 2, 1e-5
    config.train.epochs, config.train.steps_per_epoch = 1, 1
    warmups = []
    original = fggan.pretrain_generator

    def recorded(generator, dataset, steps, **kwargs):
        warmups.append((generator, steps))
        return original(generator, dataset, steps, **kwargs)

    monkeypatch.setattr(fggan, "pretrain_generator", recorded)
    game, _ = experiments.train(config, verbose=0)
    assert [(generator is game.generator, steps) for generator, steps in warmups] == [(True, 2)]
    rates = {name: float(optimizer.learning_rate) for name, optimizer in game.optimizers.items()}
    assert rates.pop("semantic") == pytest.approx(1e-5)
    assert sorted(rates) == ["discriminator", "generator", "normalizer"]
    assert all(rate == pytest.approx(config.train.learning_rate) for rate in rates.values())
