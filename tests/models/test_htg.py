import os
import subprocess
import sys

import keras
import keras_hub
import numpy as np
import pytest
import tensorflow as tf

from fgkeras._files import preview
from fgkeras.models import Embedder
from fgkeras.models.htg import (
    HardTripletGAN,
    KeypointEmbedder,
    build_discriminator,
    build_generator,
    build_htg,
    form_triplets,
    step_decay,
    train_htg,
)

K = 4  # identities in every toy problem


def _pyramid_backbone(seed=0, size=32, blocks=(1, 1, 1, 1)):
    """A tiny keras-hub ResNet (`blocks` per stage) with pyramid outputs P2..P5 (stride 4..32)."""
    keras.utils.set_random_seed(seed)
    return keras_hub.models.ResNetBackbone(
        input_conv_filters=[64], input_conv_kernel_sizes=[3], stackwise_num_filters=[64, 8, 16, 16],
        stackwise_num_blocks=list(blocks), stackwise_num_strides=[1, 2, 2, 2], block_type="basic_block",
        use_pre_activation=False, image_shape=(size, size, 3),
    )


def _kpm_embedder(seed=0, levels=("P3", "P4")):
    embedder = Embedder(_pyramid_backbone(seed), embedding_dim=8)
    embedder.build((None, 32, 32, 3))
    return KeypointEmbedder.from_embedder(embedder, levels=levels)


def _batch(per_class=4, size=16, seed=0):
    """K classes × per_class images, ordered class by class like the P×K datasets."""
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (K * per_class, size, size, 3)).astype("float32")
    labels = np.repeat(np.arange(K), per_class).astype("int32")
    return images, labels


def _toy_problem(batches=4, seed=0):
    """Each identity is a colour; `batches` P×K batches of noisy images of the 4 colours."""
    rng = np.random.default_rng(seed)
    colours = np.array([[220, 40, 40], [40, 220, 40], [40, 40, 220], [220, 220, 40]], "float32")
    labels = np.tile(np.repeat(np.arange(K), 4), batches).astype("int32")
    images = colours[labels][:, None, None, :] + rng.normal(0, 40, (len(labels), 16, 16, 3))
    return np.clip(images, 0, 255).astype("float32"), labels


def _compile(game, learning_rate=1e-2, optimizer=keras.optimizers.Adam):
    game.compile(f_optimizer=optimizer(learning_rate), g_optimizer=optimizer(learning_rate),
                 d_optimizer=optimizer(learning_rate))
    return game


def _values(variables):
    return [np.array(v) for v in variables]


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


@pytest.fixture(scope="module")
def toy_game(tiny_embedder):
    """A game trained briefly on the colour toy problem (shared by the tests that need one)."""
    images, labels = _toy_problem()
    game = _compile(build_htg(tiny_embedder(seed=1), K, seed=0))
    history = game.fit(images, labels, batch_size=16, epochs=15, shuffle=False, verbose=0)
    return game, images, labels, history


# --- G and D -------------------------------------------------------------------------------------

def test_generator_keeps_the_shape_and_starts_as_the_identity(rng):
    generator = build_generator(8)
    features = rng.normal(size=(6, 8)).astype("float32")
    out = _numpy(generator(features, training=True))
    assert out.shape == features.shape
    np.testing.assert_allclose(out, features, atol=1e-6)
    assert [generator.get_layer(f"fc{i}").units for i in range(1, 5)] == [4, 4, 8, 8]


def test_generator_offsets_can_point_both_ways(rng):
    generator = build_generator(8)
    generator.get_layer("bn4").gamma.assign(np.ones(8, "float32"))
    features = rng.normal(size=(32, 8)).astype("float32")
    offsets = _numpy(generator(features, training=True)) - features
    assert (offsets < -0.1).any() and (offsets > 0.1).any()  # no ReLU after the last layer


def test_discriminator_has_k_plus_one_classes_and_a_no_bias_softmax(rng):
    discriminator = build_discriminator(8, num_classes=5, hidden_dim=6)
    assert discriminator.output_shape == (None, 6)
    assert [w.name for w in discriminator.get_layer("logits").weights] == ["kernel"]
    assert _numpy(discriminator(rng.normal(size=(3, 8)).astype("float32"))).shape == (3, 6)


# --- triplets ------------------------------------------------------------------------------------

def test_random_triplets_are_valid_and_seeded():
    labels = np.repeat(np.arange(4), 3)
    triplets = _numpy(form_triplets(labels, sampling="random", seed=1))
    assert triplets.shape == (12, 3)
    np.testing.assert_array_equal(triplets[:, 0], np.arange(12))
    assert np.all(labels[triplets[:, 1]] == labels) and np.all(triplets[:, 1] != triplets[:, 0])
    assert np.all(labels[triplets[:, 2]] != labels)
    np.testing.assert_array_equal(_numpy(form_triplets(labels, seed=1)), triplets)
    draws = {tuple(_numpy(form_triplets(labels, seed=s))[:, 2]) for s in range(5)}
    assert len(draws) > 1


def test_batch_hard_triplets_are_the_farthest_positive_and_nearest_negative(rng):
    labels = np.repeat(np.arange(3), 3)
    features = rng.normal(size=(9, 4)).astype("float32") * rng.uniform(0.5, 3, (9, 1)).astype("float32")
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    distances = ((unit[:, None] - unit[None]) ** 2).sum(-1)
    same = labels[:, None] == labels[None]
    hardest_positive = np.where(same & ~np.eye(9, dtype=bool), distances, -1).argmax(1)
    hardest_negative = np.where(~same, distances, np.inf).argmin(1)
    triplets = _numpy(form_triplets(labels, features, sampling="batch_hard"))
    np.testing.assert_array_equal(triplets[:, 1], hardest_positive)
    np.testing.assert_array_equal(triplets[:, 2], hardest_negative)


def test_anchors_without_positive_or_negative_fall_back_to_themselves():
    triplets = _numpy(form_triplets(np.array([0, 1, 1]), seed=0))
    np.testing.assert_array_equal(triplets[0], [0, 0, triplets[0, 2]])  # class 0 has one image
    assert triplets[0, 2] in (1, 2)
    np.testing.assert_array_equal(_numpy(form_triplets(np.array([3, 3]), seed=0)), [[0, 1, 0], [1, 0, 1]])
    with pytest.raises(ValueError, match="`sampling` must be one of"):
        form_triplets(np.array([0, 1]), sampling="semi_hard")


# --- the players' updates ------------------------------------------------------------------------
#
# The reference below writes eqs. (2)-(9) out from the paper with plain TensorFlow ops (not
# fgkeras.losses), on one training-mode pass of F, G and D (D on real and generated features in
# one batch, the module's design decision). One `train_step` with SGD must move each player by
# exactly -lr × the gradient of its own loss: any mis-wired loss term, sign, weight, label,
# feature, optimizer or variable list changes some player's step. See MUTATIONS.md.

MU, BETA, GAMMA = 0.5, 2.0, 3.0  # not 1, so that a weight left out changes the step
RATES = {"embedder": 0.1, "generator": 0.2, "discriminator": 0.3}  # distinct: a swapped optimizer shows


def _distance(x, y):
    """d of Sec. 3: squared distance between the l2-normalised vectors."""
    return tf.reduce_sum(tf.square(tf.math.l2_normalize(x, -1) - tf.math.l2_normalize(y, -1)), -1)


def _softmax_loss(labels, logits):
    labels = tf.reshape(labels, (-1,))
    logits = tf.reshape(logits, (-1, logits.shape[-1]))
    return tf.reduce_mean(tf.nn.sparse_softmax_cross_entropy_with_logits(labels, logits))


def _paper_losses(game, images, labels, triplets, training=True):
    """L_F (9), L_D (4) and L_G (8) of the paper, and the pieces they are made of."""
    labels = tf.constant(labels, "int32")
    features = game.embedder.features(images, training=training)
    generated = game.generator(features, training=training)
    logits = game.discriminator(tf.concat([features, generated], 0), training=training)
    real_logits, fake_logits = tf.gather(logits[:len(images)], triplets), tf.gather(logits[len(images):], triplets)
    ga, gp, gn = (tf.gather(generated, triplets[:, i]) for i in range(3))
    ids = tf.gather(labels, triplets)
    parts = {
        "F,tri": tf.reduce_mean(tf.nn.relu(_distance(ga, gp) - _distance(ga, gn) + game.margin)),  # (3)
        "G,tri": tf.reduce_mean(tf.nn.relu(_distance(ga, gn) - _distance(ga, gp) + game.margin)),  # (2)
        "D,real": _softmax_loss(ids, real_logits),  # (5)
        "D,fake": _softmax_loss(tf.fill(tf.shape(ids), K), fake_logits),  # (6): the last class is fake
        "G,cls": _softmax_loss(ids, fake_logits),  # (7)
    }
    return {
        "embedder": parts["F,tri"] + game.mu * parts["D,real"],
        "discriminator": parts["D,real"] + game.beta * parts["D,fake"],
        "generator": parts["G,tri"] + game.gamma * parts["G,cls"],
        **parts,
    }


def _sgd_game(embedder, rates=None, **kwargs):
    """A game compiled with plain SGD at `RATES` (or `rates`) per player, G off the identity."""
    rates = {**RATES, **(rates or {})}
    game = build_htg(embedder, K, **{"mu": MU, "beta": BETA, "gamma": GAMMA, "seed": 3, **kwargs})
    game.compile(f_optimizer=keras.optimizers.SGD(rates["embedder"]),
                 g_optimizer=keras.optimizers.SGD(rates["generator"]),
                 d_optimizer=keras.optimizers.SGD(rates["discriminator"]))
    game.generator.get_layer("bn4").gamma.assign(np.full(game.embedder.embedding_dim, 0.5, "float32"))
    return game


def _first_triplets(game, labels):
    """The triplets of the game's first step: the first draw of its seed."""
    return form_triplets(labels, sampling="random", seed=keras.random.SeedGenerator(game.seed))


def _players(game):
    return {name: getattr(game, name) for name in ("embedder", "generator", "discriminator")}


def _expected_sgd_step(game, images, labels, triplets):
    """(losses, {player: weights after one SGD step on its own paper loss})."""
    players = _players(game)
    with tf.GradientTape(persistent=True) as tape:
        losses = _paper_losses(game, images, labels, triplets)
    expected = {}
    for name, model in players.items():
        gradients = tape.gradient(losses[name], model.trainable_variables)
        expected[name] = [np.array(v) - RATES[name] * (0 if g is None else np.array(g))
                          for v, g in zip(model.trainable_variables, gradients)]
    return {name: float(v) for name, v in losses.items()}, expected


def test_one_train_step_is_sgd_on_each_players_loss_of_the_paper(tiny_embedder):
    images, labels = _batch()
    game = _sgd_game(tiny_embedder())
    losses, expected = _expected_sgd_step(game, images, labels, _first_triplets(game, labels))
    logs = game.train_step((images, labels))
    for name, model in _players(game).items():
        after = _values(model.trainable_variables)
        for variable, got, want in zip(model.trainable_variables, after, expected[name]):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-6, err_msg=f"{name}: {variable.path}")
    for log, player in (("f_loss", "embedder"), ("g_loss", "generator"), ("d_loss", "discriminator")):
        np.testing.assert_allclose(float(logs[log]), losses[player], rtol=1e-5, err_msg=log)


def test_every_player_moves_and_only_along_its_own_loss(tiny_embedder):
    # Independent of the step sizes: a player whose loss has no gradient for a weight must not
    # move it, and each player moves by a multiple of its own gradient.
    images, labels = _batch()
    game = _sgd_game(tiny_embedder())
    before = {name: _values(model.trainable_variables) for name, model in _players(game).items()}
    _, expected = _expected_sgd_step(game, images, labels, _first_triplets(game, labels))
    game.train_step((images, labels))
    for name, model in _players(game).items():
        moved = [not np.array_equal(b, a) for b, a in zip(before[name], _values(model.trainable_variables))]
        should = [not np.array_equal(b, e) for b, e in zip(before[name], expected[name])]
        assert moved == should, name
        assert sum(moved) >= len(moved) - 2, f"{name}: {moved}"  # (G's bn4 β/γ aside, every weight has a gradient)


def test_the_first_triplets_are_the_seeded_random_draw(tiny_embedder):
    # `_first_triplets` is what the step tests above assume: check it against the game's own draw.
    _, labels = _batch()
    game = _sgd_game(tiny_embedder())
    np.testing.assert_array_equal(_numpy(game._triplets(labels, None)), _numpy(_first_triplets(game, labels)))
    assert game.triplets == "random"


def _generated_margins(game, images, labels, triplets):
    """Per triplet d(G(a), G(p)) - d(G(a), G(n)), the margin that G raises and F lowers."""
    features = game.embedder.features(images, training=True)
    generated = game.generator(features, training=True)
    ga, gp, gn = (tf.gather(generated, triplets[:, i]) for i in range(3))
    return _numpy(_distance(ga, gp) - _distance(ga, gn))


@pytest.mark.parametrize("player, harder", [("generator", True), ("embedder", False)])
def test_g_makes_the_triplets_harder_and_f_makes_them_easier(player, harder, tiny_embedder):
    # One step of one player alone (the others at rate 0), on the triplet terms alone (μ = γ = 0):
    # G's step raises d(G(a),G(p)) - d(G(a),G(n)) on the same batch and lowers its eq. (2);
    # F's step lowers that margin and its eq. (3).
    images, labels = _batch()
    rates = {name: (0.1 if name == player else 0.0) for name in RATES}
    game = _sgd_game(tiny_embedder(), rates=rates, mu=0.0, gamma=0.0)
    triplets = _first_triplets(game, labels)
    term = "G,tri" if player == "generator" else "F,tri"
    before = _generated_margins(game, images, labels, triplets), float(_paper_losses(game, images, labels, triplets)[term])
    game.train_step((images, labels))
    after = _generated_margins(game, images, labels, triplets), float(_paper_losses(game, images, labels, triplets)[term])
    assert (after[0].mean() > before[0].mean()) == harder, (before[0], after[0])
    assert after[1] < before[1], (term, before[1], after[1])


def test_fs_step_depends_on_g(tiny_embedder):
    # μ = 0: F learns only from G's triplets (eq. 3). Another G gives another F step.
    images, labels = _batch()
    steps = []
    for scale in (0.5, 1.5):
        game = _sgd_game(tiny_embedder(), mu=0.0)
        game.generator.get_layer("bn4").gamma.assign(np.full(8, scale, "float32"))
        before = _values(game.embedder.trainable_variables)
        game.train_step((images, labels))
        steps.append([a - b for a, b in zip(_values(game.embedder.trainable_variables), before)])
    assert any(not np.allclose(a, b, atol=1e-7) for a, b in zip(*steps))


def _batch_norms(model):
    return [layer for layer in model._flatten_layers(include_self=False)
            if isinstance(layer, keras.layers.BatchNormalization)]


@pytest.mark.parametrize("make", ["plain", "kpm"])
def test_every_batch_norm_moves_its_statistics_once_per_step(make, tiny_embedder):
    # Momentum 0.5 from statistics of 1000: one update leaves 500 + (batch moment) / 2, two
    # would leave about 250, three about 125 (the batch moments here are far below 100).
    if make == "plain":
        images, labels = _batch()
        game = _sgd_game(tiny_embedder())
    else:
        images, labels = _batch(size=32)
        game = _sgd_game(_kpm_embedder())
    norms = {f"{name}/{bn.name}": bn for name, model in _players(game).items() for bn in _batch_norms(model)}
    assert sum(name.startswith("generator/") for name in norms) == 4
    assert sum(name.startswith("discriminator/") for name in norms) == 3
    for bn in norms.values():
        bn.momentum = 0.5
        for statistic in (bn.moving_mean, bn.moving_variance):
            statistic.assign(np.full(statistic.shape, 1000.0, "float32"))
    game.train_step((images, labels))
    for name, bn in norms.items():
        for statistic in (bn.moving_mean, bn.moving_variance):
            values = np.array(statistic)
            assert np.all((values > 450) & (values < 550)), f"{name}/{statistic.name}: {preview(values.ravel().round(1).tolist())}"


def test_evaluate_reports_the_paper_losses_in_inference_mode(tiny_embedder):
    images, labels = _batch()
    game = _sgd_game(tiny_embedder())
    losses = _paper_losses(game, images, labels, _first_triplets(game, labels), training=False)
    logs = game.evaluate(images, labels, batch_size=len(images), verbose=0, return_dict=True)
    for log, player in (("f_loss", "embedder"), ("g_loss", "generator"), ("d_loss", "discriminator")):
        np.testing.assert_allclose(logs[log], float(losses[player]), rtol=1e-5, err_msg=log)


def test_train_step_reports_three_losses_and_steps_each_optimizer_once(tiny_embedder):
    images, labels = _batch()
    game = _compile(build_htg(tiny_embedder(), K, seed=0))
    logs = game.train_step({"image": images, "label": labels})
    assert sorted(logs) == ["d_loss", "f_loss", "g_loss"]
    assert all(np.isfinite(_numpy(v)) for v in logs.values())
    assert [o.iterations.numpy() for o in (game.f_optimizer, game.g_optimizer, game.d_optimizer)] == [1, 1, 1]


def test_fake_features_are_classified_as_the_extra_class(rng, tiny_embedder):
    labels = np.repeat(np.arange(K), 4)
    centres = rng.normal(size=(K, 8)).astype("float32") * 3
    features = centres[labels] + rng.normal(size=(16, 8)).astype("float32") * 0.3
    game = _compile(build_htg(tiny_embedder(), K, seed=0), learning_rate=3e-2)
    game.generator.get_layer("bn4").gamma.assign(np.ones(8, "float32"))  # fakes differ from reals
    triplets = form_triplets(labels, seed=0)

    def predictions():
        play = game._play(features, labels, triplets)
        return _numpy(play["real_logits"][:, 0]).argmax(-1), _numpy(play["fake_logits"][:, 0]).argmax(-1)

    @tf.function
    def update():  # D alone on the game's L_D
        with tf.GradientTape() as tape:
            loss = game._discriminator_loss(game._play(features, labels, triplets))
        game._update(game.d_optimizer, tape, loss, game.discriminator.trainable_variables)

    assert np.mean(predictions()[1] == K) < 0.5
    for _ in range(40):
        update()
    real, fake = predictions()
    assert np.mean(fake == K) > 0.8  # class K + 1 (index K) is "generated"
    assert np.mean(real == labels) > 0.8


def test_generated_features_keep_their_identity_after_a_short_game(toy_game):
    game, images, labels, history = toy_game
    assert history.history["f_loss"][-1] < history.history["f_loss"][0]
    # Played as in a training step: batch statistics, D sees real and generated features together.
    features = game.embedder.features(images, training=True)
    play = game._play(features, labels, form_triplets(labels, seed=0))
    generated, fake_logits = play["generated"], play["fake_logits"]
    offsets = np.linalg.norm(_numpy(generated[:, 0]) - _numpy(features), axis=1)
    assert offsets.mean() > 0.1 * np.linalg.norm(_numpy(features), axis=1).mean()  # G moved the features ...
    identity = _numpy(fake_logits[:, 0, :K]).argmax(-1)
    assert np.mean(identity == labels) > 0.6  # ... yet D still recognises their source (chance 0.25)


# --- KPM -----------------------------------------------------------------------------------------

def test_keypoint_embedder_concatenates_global_and_local_features(rng):
    embedder = Embedder(_pyramid_backbone(), embedding_dim=8)
    embedder.build((None, 32, 32, 3))
    kpm = KeypointEmbedder.from_embedder(embedder, levels=("P3", "P4"))
    assert isinstance(kpm, Embedder) and kpm.backbone is embedder.backbone
    assert (kpm.global_dim, kpm.local_dim, kpm.embedding_dim) == (8, 8 + 16, 32)
    images = rng.integers(0, 256, (3, 32, 32, 3)).astype("uint8")
    features = _numpy(kpm.features(images))
    assert features.shape == (3, 32)
    np.testing.assert_allclose(features[:, :8], _numpy(embedder.features(images)), rtol=1e-5, atol=1e-5)
    out = _numpy(kpm(images))
    np.testing.assert_allclose(np.linalg.norm(out, axis=1), 1.0, rtol=1e-5)
    assert kpm.compute_output_shape((None, 32, 32, 3)) == (None, 32)


def test_local_features_are_feature_maps_pooled_with_keypoint_maps(rng):
    kpm = _kpm_embedder()
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    maps = kpm.keypoint_maps(images)
    pyramid = kpm.pyramid(kpm.normalize_input(images))
    pooled = [(_numpy(pyramid[level]) * _numpy(maps[level])).sum(axis=(1, 2)) for level in kpm.levels]
    bn = kpm.local_bn
    expected = (np.concatenate(pooled, -1) - _numpy(bn.moving_mean)) / np.sqrt(_numpy(bn.moving_variance) + bn.epsilon)
    np.testing.assert_allclose(_numpy(kpm.features(images))[:, 8:], expected, rtol=1e-4, atol=1e-4)


def test_keypoint_maps_sum_to_one_over_space_per_channel(rng):
    kpm = _kpm_embedder()
    maps = kpm.keypoint_maps(rng.integers(0, 256, (2, 32, 32, 3)).astype("uint8"))
    assert sorted(maps) == ["P3", "P4"]
    assert _numpy(maps["P3"]).shape == (2, 4, 4, 8) and _numpy(maps["P4"]).shape == (2, 2, 2, 16)
    for m in maps.values():
        np.testing.assert_allclose(_numpy(m).sum(axis=(1, 2)), 1.0, rtol=1e-5)


def test_keypoint_maps_match_odd_feature_map_sizes(rng):
    kpm = KeypointEmbedder(_pyramid_backbone(size=48), global_dim=8, levels=("P4", "P5"))  # P4 3×3, P5 2×2
    kpm.build((None, 48, 48, 3))
    images = rng.integers(0, 256, (2, 48, 48, 3)).astype("float32")
    assert [_numpy(m).shape[1:3] for m in kpm.keypoint_maps(images).values()] == [(3, 3), (2, 2)]
    assert _numpy(kpm(images)).shape == (2, 8 + 16 + 16)


def test_keypoint_blocks_are_copies_of_the_stages_they_mirror(rng):
    embedder = Embedder(_pyramid_backbone(blocks=(1, 1, 2, 1)), embedding_dim=8)  # P4: two basic blocks
    embedder.build((None, 32, 32, 3))
    for variable in embedder.backbone.weights:  # "trained": not the initial weights
        noise = rng.normal(0, 0.1, variable.shape)
        variable.assign((np.abs(noise) if "variance" in variable.path else noise) + np.asarray(variable))
    kpm = KeypointEmbedder.from_embedder(embedder, levels=("P3", "P4"))
    pyramid = keras.Model(embedder.backbone.input, embedder.backbone.pyramid_outputs)
    for level, previous, convs in (("P3", "P2", 3), ("P4", "P3", 5)):  # 2 convs a block + the shortcut
        block, stage = kpm.keypoint_blocks[kpm.levels.index(level)], kpm.stage(level)
        assert sum(isinstance(layer, keras.layers.Conv2D) for layer in block.layers) == convs
        assert len(block.weights) == len(stage.weights) > 0
        for copy, original in zip(block.weights, stage.weights):
            assert copy is not original
            np.testing.assert_array_equal(np.asarray(copy), np.asarray(original), err_msg=original.path)
        x = _numpy(pyramid(rng.uniform(-1, 1, (2, 32, 32, 3)).astype("float32"))[previous])
        logits = _numpy(block(x))
        assert (logits < 0).any()  # the stage's last ReLU is left out, the rest is the stage itself
        full_stage = keras.Model(embedder.backbone.pyramid_outputs[previous], embedder.backbone.pyramid_outputs[level])
        np.testing.assert_allclose(np.maximum(logits, 0), _numpy(full_stage(x)), rtol=1e-5, atol=1e-5)
    stage_weight = kpm.stage("P4").weights[0]
    stage_weight.assign(np.zeros(stage_weight.shape, "float32"))
    assert np.abs(np.asarray(kpm.keypoint_blocks[1].weights[0])).sum() > 0  # own variables


def test_keypoint_embedder_keras_file_round_trip_alone_and_in_a_game(tmp_path, rng):
    images = rng.integers(0, 256, (4, 32, 32, 3)).astype("float32")
    game = build_htg(_kpm_embedder(), K, kpm=True)
    _batch_norms(game.embedder.keypoint_blocks[0])[-1].moving_mean.assign(np.linspace(-1, 1, 8).astype("float32"))
    expected = _numpy(game.embedder(images))
    game.embedder.save(tmp_path / "embedder.keras")
    restored = keras.saving.load_model(tmp_path / "embedder.keras")
    assert isinstance(restored, KeypointEmbedder) and restored.levels == ["P3", "P4"]
    np.testing.assert_allclose(_numpy(restored(images)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_numpy(restored.keypoint_maps(images)["P3"]),
                               _numpy(game.embedder.keypoint_maps(images)["P3"]), rtol=1e-5, atol=1e-7)
    game.save(tmp_path / "game.keras")
    np.testing.assert_allclose(_numpy(keras.saving.load_model(tmp_path / "game.keras")(images)), expected,
                               rtol=1e-5, atol=1e-6)


def test_bad_keypoint_configurations(tiny_embedder):
    with pytest.raises(ValueError, match="`levels` must be distinct pyramid levels .* Received: levels=\\['P2'\\]"):
        KeypointEmbedder(_pyramid_backbone(), levels=("P2",))  # P2 has no level before it
    with pytest.raises(ValueError, match="`levels` must be"):
        KeypointEmbedder(_pyramid_backbone(), levels=("P4", "P4"))
    with pytest.raises(ValueError, match="KPM needs a backbone with pyramid outputs"):
        KeypointEmbedder(tiny_embedder().backbone)
    with pytest.raises(ValueError, match="`global_dim` must be >= 1"):
        KeypointEmbedder(_pyramid_backbone(), global_dim=0)


# --- serialization -------------------------------------------------------------------------------

def test_config_round_trip(tiny_embedder):
    game = build_htg(tiny_embedder(), K, margin=0.2, mu=0.5, beta=2.0, gamma=0.0, triplets="batch_hard", seed=7)
    clone = HardTripletGAN.from_config(game.get_config())
    for name in ("num_classes", "margin", "mu", "beta", "gamma", "triplets", "seed"):
        assert getattr(clone, name) == getattr(game, name)
    assert clone.discriminator.output_shape == (None, K + 1)
    assert clone.generator.output_shape == (None, 8)
    assert clone.embedder.embedding_dim == 8


def test_keras_file_round_trip_of_the_trained_game_and_its_embedder(toy_game, tmp_path):
    game, images, _, _ = toy_game
    game.save(tmp_path / "game.keras")
    restored = keras.saving.load_model(tmp_path / "game.keras")
    assert isinstance(restored, HardTripletGAN) and restored.compiled
    np.testing.assert_allclose(restored.predict(images, verbose=0), game.predict(images, verbose=0),
                               rtol=1e-5, atol=1e-6)
    features = game.embedder.features(images)
    for name in ("generator", "discriminator"):
        np.testing.assert_allclose(_numpy(getattr(restored, name)(features)), _numpy(getattr(game, name)(features)),
                                   rtol=1e-5, atol=1e-5)
    for name in ("f_optimizer", "g_optimizer", "d_optimizer"):
        original, loaded = getattr(game, name), getattr(restored, name)
        assert loaded.iterations.numpy() == original.iterations.numpy() > 0
        for a, b in zip(original.variables, loaded.variables):
            np.testing.assert_allclose(np.asarray(b), np.asarray(a), rtol=1e-6)
    game.embedder.save(tmp_path / "embedder.keras")
    embedder = keras.saving.load_model(tmp_path / "embedder.keras")
    np.testing.assert_allclose(_numpy(embedder(images)), _numpy(game.embedder(images)), rtol=1e-5, atol=1e-6)


# --- distribution --------------------------------------------------------------------------------

def _one_step(strategy, make_embedder, images, labels, triplets):
    with strategy.scope():
        game = _compile(build_htg(make_embedder(seed=5), K, triplets=triplets, seed=3),
                        learning_rate=0.2, optimizer=keras.optimizers.SGD)
        game.generator.get_layer("bn4").gamma.assign(np.full(8, 0.5, "float32"))
        history = game.fit(images, labels, batch_size=len(images), epochs=1, shuffle=False, verbose=0)
    return history.history, _values(game.weights)


@pytest.mark.parametrize("triplets", ["random", "batch_hard"])
def test_mirrored_step_equals_one_device_on_the_same_global_batch(mirrored_strategy, triplets, tiny_embedder):
    # 16 images, 2 whole classes per replica: each replica alone would form other triplets
    # (the hardest negative or the random draw may lie in the other shard) and see other
    # batch statistics in G and D; the game gathers the global batch, so it must not differ.
    images, labels = _batch()
    expected_logs, expected = _one_step(tf.distribute.get_strategy(), tiny_embedder, images, labels, triplets)
    logs, got = _one_step(mirrored_strategy, tiny_embedder, images, labels, triplets)
    initial = _values(_compile(build_htg(tiny_embedder(seed=5), K, seed=3)).weights)
    assert sum(not np.allclose(a, b) for a, b in zip(expected, initial)) > 10  # the step did something
    for name in ("f_loss", "g_loss", "d_loss"):
        np.testing.assert_allclose(logs[name], expected_logs[name], rtol=1e-5)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)


# --- configuration -------------------------------------------------------------------------------

@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 1}, "`num_classes` \\(K\\) must be >= 2. Received: num_classes=1"),
    ({"margin": 0.0}, "`margin` must be > 0. Received: margin=0.0"),
    ({"mu": -1.0}, "`mu` must be >= 0. Received: mu=-1.0"),
    ({"beta": -0.1}, "`beta` must be >= 0"),
    ({"gamma": -2}, "`gamma` must be >= 0"),
    ({"triplets": "hardest"}, "`triplets` must be one of"),
    ({"discriminator": build_discriminator(8, K + 1)}, "must output K \\+ 1 = 5 logits .* Received: 6 logits"),
    ({"discriminator": build_discriminator(6, K)}, "must take the embedder's 8-d features"),
    ({"generator": build_generator(6)}, "generator must map the embedder's 8-d features"),
    ({"generator": keras.layers.Dense(8)}, "`generator` must be a built Keras model"),
])
def test_bad_configurations_are_refused(kwargs, message, tiny_embedder):
    arguments = {"embedder": tiny_embedder(), "generator": build_generator(8),
                 "discriminator": build_discriminator(8, K), "num_classes": K, **kwargs}
    with pytest.raises(ValueError, match=message):
        HardTripletGAN(**arguments)


def test_players_need_their_own_optimizers(tiny_embedder):
    game = build_htg(tiny_embedder(), K)
    shared = keras.optimizers.Adam()
    with pytest.raises(ValueError, match="its own optimizer"):
        game.compile(f_optimizer=shared, g_optimizer=shared, d_optimizer=keras.optimizers.Adam())


# --- the recipe ----------------------------------------------------------------------------------

def test_step_decay_divides_by_ten_every_decay_epochs():
    assert step_decay(1e-3, epochs=5, steps_per_epoch=10) == 1e-3
    schedule = step_decay(1e-2, epochs=15, steps_per_epoch=10, decay_epochs=5)
    np.testing.assert_allclose([float(schedule(s)) for s in (0, 49, 51, 101)], [1e-2, 1e-2, 1e-3, 1e-4], rtol=1e-6)


def _pk_dataset(rng, size=32):
    images = rng.integers(0, 256, (16, size, size, 3)).astype("uint8")
    labels = np.repeat(np.arange(K), 4).astype("int32")
    return tf.data.Dataset.from_tensors({"image": images, "label": labels}).repeat()


def test_train_htg_adds_the_kpm_branch_after_the_basic_model_copying_its_trained_stages(rng, monkeypatch):
    embedder = Embedder(_pyramid_backbone(blocks=(1, 1, 2, 1)), embedding_dim=8)
    embedder.build((None, 32, 32, 3))
    initial = {v.path: np.array(v) for v in embedder.backbone.weights}
    played = []  # the game as its `fit` starts (neither phase trains here: the wiring is checked)
    monkeypatch.setattr(HardTripletGAN, "fit", lambda game, *args, **kwargs: played.append(
        (game, {level: (_values(block.weights), _values(game.embedder.stage(level).weights))
                for level, block in zip(game.embedder.levels, game.embedder.keypoint_blocks)})))
    basics = []

    def warm_up(model, *args, **kwargs):  # the basic model's "training": new backbone weights
        basics.append(type(model.embedder).__name__)
        for variable in model.embedder.backbone.weights:
            noise = rng.normal(0, 0.1, variable.shape)
            variable.assign((np.abs(noise) if "variance" in variable.path else noise) + np.asarray(variable))

    monkeypatch.setattr(keras.Model, "fit", warm_up)
    game = train_htg(embedder, _pk_dataset(rng), K, warmup_epochs=1, epochs=1, steps_per_epoch=2, kpm=True,
                     kpm_levels=("P4",), temperature=0.5, optimizer="adam", seed=0, verbose=0)
    assert basics == ["Embedder"]  # the basic model trained the plain embedder ...
    (started, copies), = played
    assert started is game and isinstance(game.embedder, KeypointEmbedder)  # ... then the branch was added
    assert game.embedder.backbone is embedder.backbone
    assert game.embedder.levels == ["P4"] and game.embedder.keypoint_map.temperature == 0.5
    block, stage = copies["P4"]
    for copy, original in zip(block, stage):  # the keypoint block is the stage as the warm-up left it ...
        np.testing.assert_array_equal(copy, original)
    paths = [v.path for v in game.embedder.stage("P4").weights]
    assert any(not np.array_equal(s, initial[path]) for s, path in zip(stage, paths))  # ... trained


def test_train_htg_warm_up_triplets_are_a_named_option(rng, tiny_embedder, monkeypatch):
    fitted = []  # (model, epochs): the wiring only, without training
    monkeypatch.setattr(keras.Model, "fit", lambda model, *args, **kwargs: fitted.append((model, kwargs["epochs"])))
    dataset = _pk_dataset(rng, size=16)
    game = train_htg(tiny_embedder(), dataset, K, warmup_epochs=2, epochs=3, steps_per_epoch=1,
                     warmup_triplets="batch_hard", triplets="batch_hard", optimizer="adam", seed=0)
    (basic, warmup_epochs), (played, epochs) = fitted
    assert (basic.softmax, basic.triplet, warmup_epochs) == ("no_bias", "batch_hard", 2)
    assert played is game and (game.triplets, epochs) == ("batch_hard", 3)
    fitted.clear()
    train_htg(tiny_embedder(), dataset, K, warmup_epochs=1, epochs=1, steps_per_epoch=1, optimizer="adam")
    assert fitted[0][0].triplet == "random" and fitted[1][0].triplets == "random"  # the paper's defaults
    with pytest.raises(ValueError, match="`warmup_triplets` must be one of .* Received: warmup_triplets='hardest'"):
        train_htg(tiny_embedder(), dataset, K, warmup_epochs=1, epochs=1, steps_per_epoch=1,
                  warmup_triplets="hardest")
    with pytest.raises(ValueError, match="`optimizer` must be one of"):
        train_htg(tiny_embedder(), dataset, K, warmup_epochs=1, epochs=1, steps_per_epoch=1, optimizer="lion")


# --- loading -------------------------------------------------------------------------------------

def test_embedder_keras_files_load_after_importing_fgkeras_alone(tmp_path, rng):
    # A fresh interpreter that imports nothing of fgkeras but the package: the classes an
    # embedder file names (fgkeras>Embedder, fgkeras>KeypointEmbedder, fgkeras layers) must be
    # registered by `import fgkeras` itself.
    images = rng.integers(0, 256, (2, 32, 32, 3)).astype("float32")
    plain = Embedder(_pyramid_backbone(), embedding_dim=8, pooling="gem")
    plain.build((None, 32, 32, 3))
    kpm = KeypointEmbedder.from_embedder(plain, levels=("P4",))
    for name, model in (("plain", plain), ("kpm", kpm)):
        model.save(tmp_path / f"{name}.keras")
        np.save(tmp_path / f"{name}.npy", _numpy(model(images)))
    np.save(tmp_path / "images.npy", images)
    script = (
        "import sys, fgkeras\nimport numpy as np, keras\n"
        "root = sys.argv[1]\n"
        "for name in ('plain', 'kpm'):\n"
        "    model = keras.saving.load_model(f'{root}/{name}.keras')\n"
        "    np.save(f'{root}/{name}_loaded.npy', keras.ops.convert_to_numpy(model(np.load(f'{root}/images.npy'))))\n"
    )
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "3", "CUDA_VISIBLE_DEVICES": ""}
    result = subprocess.run([sys.executable, "-c", script, str(tmp_path)], capture_output=True, text=True,
                            env=env, timeout=300, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    for name in ("plain", "kpm"):
        np.testing.assert_allclose(np.load(tmp_path / f"{name}_loaded.npy"), np.load(tmp_path / f"{name}.npy"),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.slow
def test_train_htg_fits_both_phases_with_kpm(rng):
    # The real `fit` of both phases with the KPM branch (graph mode, the persistent tape).
    embedder = Embedder(_pyramid_backbone(), embedding_dim=8)
    embedder.build((None, 32, 32, 3))
    game = train_htg(embedder, _pk_dataset(rng), K, warmup_epochs=1, epochs=1, steps_per_epoch=1, kpm=True,
                     kpm_levels=("P4",), optimizer="adam", seed=0, verbose=0)
    assert sorted(game.history.history) == ["d_loss", "f_loss", "g_loss"]
    assert all(np.isfinite(v[0]) for v in game.history.history.values())
    block = _values(game.embedder.keypoint_blocks[0].trainable_weights)
    stage = _values(game.embedder.stage("P4").trainable_weights)
    assert any(not np.array_equal(b, s) for b, s in zip(block, stage))  # the copy trained on its own
