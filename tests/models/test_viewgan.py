import keras
import numpy as np
import pytest
import tensorflow as tf

from fgkeras import layers as fg_layers
from fgkeras.models.viewgan import (
    VARIANTS,
    ViewTransformGAN,
    build_view_discriminator,
    build_view_generator,
    build_viewgan,
    view_codes,
)

N_ID, N_VIEWS, SIZE = 4, 5, 32
SMALL = {"width": 8, "id_dim": 16, "noise_dim": 8}


def _numpy(x):
    return keras.ops.convert_to_numpy(x)


def _values(variables):
    return [np.array(v) for v in variables]


def _batch(batch=8, seed=0, targets=True):
    rng = np.random.default_rng(seed)
    data = {"image": rng.integers(0, 256, (batch, SIZE, SIZE, 3)).astype("float32"),
            "label": np.repeat(np.arange(N_ID), batch // N_ID).astype("int32"),
            "view": rng.integers(0, N_VIEWS, batch).astype("int32")}
    if targets:
        data["target_view"] = rng.integers(0, N_VIEWS, batch).astype("int32")
    return data


def _game(variant="full", seed=0, optimizer=None, **kwargs):
    keras.utils.set_random_seed(seed)
    game = build_viewgan(N_ID, N_VIEWS, SIZE, variant=variant, seed=seed, **SMALL, **kwargs)
    if optimizer is not None:
        game.compile(g_optimizer=optimizer(), d_optimizer=optimizer())
    else:
        game.compile()
    return game


def _cross_entropy(labels, logits):
    """Mean softmax cross-entropy, written here independently of fgkeras.losses."""
    log_p = tf.nn.log_softmax(tf.cast(logits, "float32"), axis=-1)
    return -tf.reduce_mean(tf.gather(log_p, labels, axis=1, batch_dims=1))


def _paper_losses(play, weight):
    """Eq. (6) and eq. (7) as the paper writes them (D: real ids, fake class N_id, real views)."""
    fake_class = tf.fill(tf.shape(play["labels"]), N_ID)
    d_loss = (_cross_entropy(play["labels"], play["real_identity"]) + _cross_entropy(fake_class, play["fake_identity"])
              + weight * _cross_entropy(play["views"], play["real_view"]))
    g_loss = (_cross_entropy(play["labels"], play["fake_identity"])
              + weight * _cross_entropy(play["targets"], play["fake_view"]))
    return d_loss, g_loss


# --- G and D -------------------------------------------------------------------------------------

def test_discriminator_has_n_id_plus_one_identity_and_n_views_view_outputs():
    d = build_view_discriminator(SIZE, N_ID, N_VIEWS, width=8)
    out = d(np.zeros((2, SIZE, SIZE, 3), "float32"))
    assert out["identity"].shape == (2, N_ID + 1) and out["view"].shape == (2, N_VIEWS)


def test_full_generator_has_cnc_at_an_eighth_and_aim_in_every_decoder_block():
    g = build_view_generator(SIZE, N_VIEWS, **SMALL)
    cnc = [layer for layer in g.layers if isinstance(layer, fg_layers.ConstrainedNonalignment)]
    assert len(cnc) == 1 and tuple(cnc[0].input[0].shape[1:3]) == (SIZE // 8, SIZE // 8)
    assert tuple(cnc[0].input[1].shape[1:3]) == (SIZE // 8, SIZE // 8)  # the symmetric encoder block
    assert cnc[0].input[1] is g.get_layer(f"enc{SIZE // 8}_act").output
    assert cnc[0].effective_radius == 1  # a quarter of the 4×4 map
    decoder_convs = [layer for layer in g.layers if layer.name.startswith("dec") and layer.name.endswith("_conv")]
    aims = [layer for layer in g.layers if isinstance(layer, fg_layers.AdaptiveIdentityModulation)]
    assert len(aims) == len(decoder_convs) == 3
    assert all(aim.input[1] is g.get_layer("f_id").output for aim in aims)
    f_l = g.get_layer("f_l")
    assert [t.shape[-1] for t in f_l.input] == [16, 8, N_VIEWS]  # [f_id, z, C]


@pytest.mark.parametrize("variant, layer_type, count", [
    ("vanilla", None, 0), ("global_nc_8", fg_layers.GlobalNonalignment, 1), ("cnc_4", fg_layers.ConstrainedNonalignment, 1),
    ("cnc_im", fg_layers.IdentityModulation, 3), ("unet", keras.layers.Concatenate, 3 + 1),  # + f_l
])
def test_variants_are_the_configurations_of_table_2(variant, layer_type, count):
    g = _game(variant).generator
    connections = [layer for layer in g.layers if isinstance(layer, (fg_layers.ConstrainedNonalignment,
                                                                     fg_layers.GlobalNonalignment))]
    if layer_type is None:
        assert not connections and not any(isinstance(layer, fg_layers.ConditionalBatchNormalization) for layer in g.layers)
    else:
        assert sum(type(layer) is layer_type for layer in g.layers) == count
    if variant == "cnc_4":
        assert tuple(connections[0].input[0].shape[1:3]) == (SIZE // 4, SIZE // 4)


@pytest.mark.parametrize("variant", sorted(VARIANTS))
def test_every_variant_builds_and_trains_one_step(variant):
    game = _game(variant)
    before = {name: _values(m.trainable_variables) for name, m in (("g", game.generator), ("d", game.discriminator))}
    logs = game.train_step(_batch())
    assert np.isfinite(float(logs["g_loss"])) and np.isfinite(float(logs["d_loss"]))
    for name, model in (("g", game.generator), ("d", game.discriminator)):
        moved = [not np.array_equal(b, a) for b, a in zip(before[name], _values(model.trainable_variables))]
        assert sum(moved) >= len(moved) - 1, f"{variant} {name}: {moved}"
    out = game.transform(_batch()["image"][:2], [0, 4])
    assert out.shape == (2, SIZE, SIZE, 3) and out.min() >= 0 and out.max() <= 255


# --- the losses and the step ---------------------------------------------------------------------

def test_losses_are_eqs_6_and_7():
    game = _game()
    data = _batch()
    play = game._play(data["image"], data["label"], data["view"], data["target_view"], training=True)
    d_loss, g_loss = _paper_losses(play, game.view_weight)
    np.testing.assert_allclose(float(game._discriminator_loss(play)), float(d_loss), rtol=1e-5)
    np.testing.assert_allclose(float(game._generator_loss(play)), float(g_loss), rtol=1e-5)
    np.testing.assert_array_equal(_numpy(play["targets"]), data["target_view"])


def test_d_logits_are_split_into_the_real_and_the_generated_half():
    game = _game()
    data = _batch()
    play = game._play(data["image"], data["label"], data["view"], data["target_view"], training=False)
    real = game.discriminator(data["image"], training=False)
    fake = game.discriminator(play["generated"], training=False)
    for half, out in (("real", real), ("fake", fake)):
        np.testing.assert_allclose(_numpy(play[f"{half}_identity"]), _numpy(out["identity"]), rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(_numpy(play[f"{half}_view"]), _numpy(out["view"]), rtol=1e-4, atol=1e-5)
    assert not np.allclose(_numpy(real["identity"]), _numpy(fake["identity"]), atol=1e-3)


def test_g_is_conditioned_on_the_target_view_code():
    game = _game()
    data = _batch()
    seen = {}
    original = game.generator.call

    def spy(inputs, *args, **kwargs):
        seen["code"] = _numpy(inputs[1])
        return original(inputs, *args, **kwargs)

    game.generator.call = spy
    game._play(data["image"], data["label"], data["view"], data["target_view"])
    np.testing.assert_array_equal(seen["code"], np.eye(N_VIEWS)[data["target_view"]])


def test_one_step_is_sgd_on_each_players_own_loss():
    lr = 0.05
    data = _batch()
    reference = _game(optimizer=lambda: keras.optimizers.SGD(lr))
    game = _game(optimizer=lambda: keras.optimizers.SGD(lr))
    with tf.GradientTape(persistent=True) as tape:
        play = reference._play(data["image"], data["label"], data["view"], data["target_view"], training=True)
        d_loss, g_loss = _paper_losses(play, reference.view_weight)
    expected = {
        "generator": [v - lr * g for v, g in zip(_values(reference.generator.trainable_variables),
                                                  tape.gradient(g_loss, reference.generator.trainable_variables))],
        "discriminator": [v - lr * g for v, g in zip(_values(reference.discriminator.trainable_variables),
                                                      tape.gradient(d_loss, reference.discriminator.trainable_variables))],
    }
    logs = game.train_step(data)
    np.testing.assert_allclose(float(logs["d_loss"]), float(d_loss), rtol=1e-5)
    np.testing.assert_allclose(float(logs["g_loss"]), float(g_loss), rtol=1e-5)
    for name in expected:
        model = getattr(game, name)
        for variable, want in zip(model.trainable_variables, expected[name]):
            np.testing.assert_allclose(np.array(variable), want, rtol=1e-4, atol=1e-6, err_msg=f"{name}: {variable.path}")


def test_players_update_only_their_own_variables():
    game = _game(optimizer=lambda: keras.optimizers.SGD(0.05))
    data = _batch()
    d_before = _values(game.discriminator.trainable_variables)
    with tf.GradientTape(persistent=True) as tape:
        play = game._play(data["image"], data["label"], data["view"], data["target_view"])
        g_loss, d_loss = game._generator_loss(play), game._discriminator_loss(play)
    g_before = _values(game.generator.trainable_variables)
    game._update_generator(tape, g_loss)
    assert all(np.array_equal(a, b) for a, b in zip(d_before, _values(game.discriminator.trainable_variables)))
    assert any(not np.array_equal(a, b) for a, b in zip(g_before, _values(game.generator.trainable_variables)))
    g_now = _values(game.generator.trainable_variables)
    game._update_discriminator(tape, d_loss)
    assert all(np.array_equal(a, b) for a, b in zip(g_now, _values(game.generator.trainable_variables)))


def test_generator_steps_take_more_g_steps_per_batch():
    counts = {}
    for steps in (1, 3):
        game = _game(optimizer=lambda: keras.optimizers.SGD(0.01), generator_steps=steps)
        game.train_step(_batch(targets=False))
        counts[steps] = (int(game.g_optimizer.iterations), int(game.d_optimizer.iterations))
    assert counts == {1: (1, 1), 3: (3, 1)}


def test_target_views_are_drawn_when_the_batch_has_none():
    game = _game()
    data = _batch(targets=False)
    _, _, _, targets = game._unpack(data)
    targets = _numpy(targets)
    assert targets.shape == (8,) and targets.min() >= 0 and targets.max() < N_VIEWS
    assert len(set(_numpy(game._unpack(data)[3]).tolist() + targets.tolist())) > 1


# --- users' surface ------------------------------------------------------------------------------

def test_transform_accepts_ids_and_soft_codes():
    game = _game()
    images = _batch()["image"][:3]
    by_id = game.transform(images, 2)
    np.testing.assert_allclose(game.transform(images, np.eye(N_VIEWS)[2]), by_id, rtol=1e-5, atol=1e-3)
    soft = game.transform(images, [0.5, 0.5, 0, 0, 0])
    assert soft.shape == (3, SIZE, SIZE, 3) and not np.allclose(soft, by_id)
    assert game.transform(images[0], [1]).shape == (SIZE, SIZE, 3)


@pytest.mark.parametrize("views, message", [
    ([0.5, 0.5, 0.0], "must have length 5"),
    ([1.5, -0.5, 0.0, 0.0, 0.0], "must be non-negative \\(no negative mass\\)"),
    ([0.5, 0.2, 0.0, 0.0, 0.0], "must sum to 1. Received: a code summing to 0.7"),
    ([7], "View ids must be in \\[0, 5\\). Received: \\[7\\]"),
    ([0, 1], "one view per image or one for all: 3 images. Received: 2 views"),
    (["front"], "must be view ids or view codes"),
])
def test_malformed_codes_are_refused_with_a_clear_error(views, message):
    with pytest.raises(ValueError, match=message):
        view_codes(views, N_VIEWS, batch=3)


@pytest.mark.parametrize("kwargs, message", [
    ({"num_classes": 1}, "`num_classes` must be an int >= 2. Received: num_classes=1"),
    ({"view_weight": -1.0}, "`view_weight` \\(λ\\) must be >= 0"),
    ({"generator_steps": 0}, "`generator_steps` must be an int >= 1"),
    ({"discriminator": build_view_discriminator(SIZE, N_ID + 1, N_VIEWS, width=8)},
     "must output N_id \\+ 1 = 5 identity logits. Received: 6 logits"),
    ({"discriminator": build_view_discriminator(SIZE, N_ID, N_VIEWS + 1, width=8)}, "generator's 5 view logits"),
    ({"generator": keras.layers.Dense(3)}, "`generator` must be a built Keras model"),
])
def test_bad_configurations_are_refused(kwargs, message):
    arguments = {"generator": build_view_generator(SIZE, N_VIEWS, **SMALL),
                 "discriminator": build_view_discriminator(SIZE, N_ID, N_VIEWS, width=8), "num_classes": N_ID, **kwargs}
    with pytest.raises(ValueError, match=message):
        ViewTransformGAN(**arguments)


@pytest.mark.parametrize("kwargs, message", [
    ({"image_size": 48}, "`image_size` must be 4·2\\^d"),
    ({"connection_scale": 16}, "`connection_scale` must give one of the encoder's map sizes"),
    ({"connection": "deformable"}, "`connection` must be one of"),
    ({"modulation": "adain"}, "`modulation` must be one of"),
])
def test_bad_generators_are_refused(kwargs, message):
    with pytest.raises(ValueError, match=message):
        build_view_generator(**{"image_size": SIZE, "num_views": N_VIEWS, **kwargs})


def test_keras_file_round_trip_of_the_game_and_of_g_alone(tmp_path):
    game = _game()
    game.train_step(_batch())
    images = _batch(seed=1)["image"][:3]
    expected = game.transform(images, [0, 2, 4])
    game.save(tmp_path / "game.keras")
    restored = keras.saving.load_model(tmp_path / "game.keras")
    assert isinstance(restored, ViewTransformGAN) and restored.get_config()["view_weight"] == 5.0
    np.testing.assert_allclose(restored.transform(images, [0, 2, 4]), expected, rtol=1e-5, atol=1e-3)
    assert int(restored.g_optimizer.iterations) == 1 and restored.d_optimizer is not restored.g_optimizer
    restored.train_step(_batch())  # the restored game trains on
    game.generator.save(tmp_path / "generator.keras")
    generator = keras.saving.load_model(tmp_path / "generator.keras")
    inputs = [images, view_codes([0, 2, 4], N_VIEWS), np.zeros((3, 8), "float32")]
    np.testing.assert_allclose(_numpy(generator(inputs)), _numpy(game.generator(inputs)), rtol=1e-5, atol=1e-3)


# --- distribution --------------------------------------------------------------------------------

def _fit_one_step(strategy, data):
    with strategy.scope():
        game = _game(optimizer=lambda: keras.optimizers.SGD(0.05))
        dataset = tf.data.Dataset.from_tensor_slices(data).batch(len(data["image"]))
        history = game.fit(dataset, epochs=1, verbose=0)
    return history.history, _values(game.weights)


@pytest.mark.parametrize("targets", [pytest.param(True, marks=pytest.mark.slow), False])
def test_mirrored_step_equals_one_device_on_the_same_global_batch(mirrored_strategy, targets):
    # Each replica sees 4 of the 8 images: batch norms unsynchronised, or noise / target views
    # drawn per replica, would give another step than one device on the whole batch.
    data = _batch(targets=targets)
    expected_logs, expected = _fit_one_step(tf.distribute.get_strategy(), data)
    logs, got = _fit_one_step(mirrored_strategy, data)
    initial = _values(_game().weights)
    assert sum(not np.allclose(a, b) for a, b in zip(expected, initial)) > 10
    for name in ("g_loss", "d_loss"):
        np.testing.assert_allclose(logs[name], expected_logs[name], rtol=1e-4)
    for a, b in zip(expected, got):
        np.testing.assert_allclose(b, a, rtol=1e-3, atol=1e-5)


def test_augment_spreads_views_then_interpolates_neighbouring_views():
    game = _game()
    images = _batch()["image"][:2]
    generated, source, codes = game.augment(images, per_image=7, views=[0, 2, 4], seed=0)
    assert generated.shape == (14, SIZE, SIZE, 3) and source.tolist() == [0] * 7 + [1] * 7
    np.testing.assert_array_equal(codes[:3], np.eye(N_VIEWS)[[0, 2, 4]])
    soft = codes[3:7]
    np.testing.assert_allclose(soft.sum(axis=1), 1, rtol=1e-6)
    assert np.all(soft[:, [1, 3]] == 0) and np.all((soft > 0).sum(axis=1) <= 2)
    with pytest.raises(ValueError, match="View ids must be in"):
        game.augment(images, views=[9])


def test_fgkeras_augment_writes_per_image_views_for_a_folder(tmp_path, capsys):
    from PIL import Image

    from fgkeras import cli

    game = _game()
    game.save(tmp_path / "game.keras")
    (tmp_path / "shots" / "classA").mkdir(parents=True)
    for i, image in enumerate(_batch()["image"][:2].astype("uint8")):
        Image.fromarray(image).save(tmp_path / "shots" / "classA" / f"img{i}.png")
    code = cli.main(["augment", "--model", str(tmp_path / "game.keras"), "--input", str(tmp_path / "shots"),
                     "--output", str(tmp_path / "out"), "--views", "0,4", "--per-image", "3"])
    assert code == 0
    written = sorted(p.name for p in (tmp_path / "out" / "classA").iterdir())
    assert written == [f"img{i}_view{j:02d}.png" for i in range(2) for j in range(3)]
    assert np.asarray(Image.open(tmp_path / "out" / "classA" / written[0])).shape == (SIZE, SIZE, 3)
    assert "Wrote 6 generated images for 2 inputs" in capsys.readouterr().out
