"""ViewGAN: identity-preserving view transformation (Xiong et al., ICCV 2019).

Two players, each stepped on every batch (Sec. 3):

- the generator G, an encoder–decoder: f_id = Enc(I), the decoder starts from
  f_l = [f_id, z, C] (z: noise, C: the target-view code) and gives I_f = Dec(f_l). A
  nonalignment connection (`ConstrainedNonalignment`, CNC, or `GlobalNonalignment`) links one
  encoder block to the symmetric decoder block; every decoder block is modulated by f_id (AIM,
  `AdaptiveIdentityModulation`, eqs. 4–5; IM, eq. 3, or plain BN in the ablations).
  G maximises eq. (7): D's identity y_i and target view y_a^t for G(I);
- the discriminator D: conv blocks, then D^i with N_id + 1 identity logits (the last one for
  generated images) and D^a with N_views view logits. D maximises eq. (6): y_i for real
  images, N_id + 1 for generated ones, and λ × the view y_a of real images only.

The ablations of Table 2 are named configurations of `build_viewgan` (`VARIANTS`): vanilla
encoder–decoder, + Global-NC or + CNC at 1/8 or 1/4 of the input, + CNC + IM, + CNC + AIM (the
full model), and the U-Net variant (skip connections at every scale) that Fig. 8 shows
copying the input instead of turning it.

Design decisions where the paper is silent:

- Architecture: 4×4 stride-2 convolutions + BN + LeakyReLU(0.2) in the encoder and in D, from
  `width` channels doubling per block (at most `max_width`), down to a 4×4 map; f_id is a
  Dense of the flattened 4×4 map (`id_dim`). The decoder is a Dense to 4×4, then one block per
  size (nearest ×2 upsampling, 3×3 conv, modulation, ReLU) up to half the input size, a last
  ×2 upsampling and 3×3 conv to RGB with tanh. Images are [0, 255] in and out. The input side
  must be 4·2^d (16, 32, 64, 128 …); the paper's 224 is not supported.
- The connection at scale k sits after the decoder block of size S/k: its output [Y, Z] is
  the next block's input. The radius defaults to a quarter of that map (the paper's r = 7 at
  28×28); the U-Net variant concatenates X instead of attending, at every size.
- γ = 1 + MLP(·) in IM and AIM, so that zero MLPs are plain BN (see `fgkeras.layers.modulation`).
- Adam(2e-4, β1 = 0.5): the paper gives the learning rate; β1 = 0.5 is the usual GAN value.
- One forward pass per step: G once, D once on [real; generated] (so D's batch norm always
  sees both halves, as in HTG), then each player steps on its own loss and its own variables
  from that pass (simultaneous steps). `generator_steps` > 1 (the paper's 4:1 on Multi-PIE)
  adds G-only passes after it (new noise and target views), `discriminator_steps` > 1 D-only
  passes.
- Target views: a batch may carry them (`target_view`), else they are drawn uniformly, per
  image, from the model's `keras.random.SeedGenerator`, like the noise z ~ N(0, 1).
- Under `tf.distribute` every batch norm of G and D is synchronised, the noise and the target
  views are drawn for the global batch (the same draw on every replica, seeded alike) and each
  replica takes its own rows, and the per-replica mean losses are divided by the number of
  replicas: a distributed step is that of one device on the same global batch.
- Soft view codes (interpolations for the few-shot augmentation) must be non-negative and sum
  to 1 (within 1e-3); G is trained on one-hot codes only, as in the paper.
"""

import logging
import math

import keras
import numpy as np
import tensorflow as tf
from keras import ops

from fgkeras import layers as fg_layers
from fgkeras import losses as fg_losses
from fgkeras.losses.softmax import softmax_cross_entropy
from fgkeras.models.training import BuiltBeforeFit, make_optimizer, replica_scaled

logger = logging.getLogger(__name__)

CONNECTIONS = (None, "cnc", "global", "skip")
MODULATIONS = ("bn", "im", "aim")
VARIANTS = {
    "vanilla": {"connection": None, "connection_scale": 8, "modulation": "bn"},
    "global_nc_8": {"connection": "global", "connection_scale": 8, "modulation": "bn"},
    "global_nc_4": {"connection": "global", "connection_scale": 4, "modulation": "bn"},
    "cnc_8": {"connection": "cnc", "connection_scale": 8, "modulation": "bn"},
    "cnc_4": {"connection": "cnc", "connection_scale": 4, "modulation": "bn"},
    "cnc_im": {"connection": "cnc", "connection_scale": 8, "modulation": "im"},
    "full": {"connection": "cnc", "connection_scale": 8, "modulation": "aim"},
    "unet": {"connection": "skip", "connection_scale": 8, "modulation": "aim"},
}
BOTTOM = 4  # side of the encoder's last map and of the decoder's first
CODE_TOLERANCE = 1e-3


def _check_int(name, value, minimum):
    if not isinstance(value, (int, np.integer)) or isinstance(value, bool) or value < minimum:
        raise ValueError(f"`{name}` must be an int >= {minimum}. Received: {name}={value!r}")


def _depth(image_size):
    """d with image_size = 4·2^d, d >= 2."""
    _check_int("image_size", image_size, 16)
    depth = int(round(math.log2(image_size / BOTTOM)))
    if BOTTOM * 2**depth != image_size:
        raise ValueError(f"`image_size` must be 4·2^d (16, 32, 64, 128 …). Received: image_size={image_size}")
    return depth


def _widths(image_size, width, max_width):
    """Channels of the block at each map size (S/2 … 4), doubling as the map halves."""
    return {image_size // 2**(i + 1): min(width * 2**i, max_width) for i in range(_depth(image_size))}


def _bn(name):
    return keras.layers.BatchNormalization(synchronized=True, name=name)


def build_view_generator(image_size, num_views, id_dim=128, noise_dim=128, width=32, max_width=256,
                         connection="cnc", connection_scale=8, radius=None, modulation="aim",
                         name="generator"):
    """G of ViewGAN (Sec. 3.1, Fig. 1): an encoder–decoder on [f_id, z, C].

    Args:
        image_size: S, the side of the square input and output, 4·2^d (16, 32, 64 …).
        num_views: N_views, the length of the view code C.
        id_dim: size of the identity feature f_id.
        noise_dim: size of the noise z (the paper: 128).
        width, max_width: channels of the first encoder block, and the cap as they double.
        connection: None (vanilla), "cnc" (`ConstrainedNonalignment`), "global"
            (`GlobalNonalignment`) or "skip" (U-Net: X concatenated at every size).
        connection_scale: k: the CNC / Global-NC links the blocks of size S/k (8: the paper's
            best, 28×28 of 224).
        radius: r of the CNC; None: a quarter of the linked map.
        modulation: "aim" (eqs. 4–5), "im" (eq. 3) or "bn" (plain batch normalisation).
    Inputs: [image (batch, S, S, 3) in [0, 255], code (batch, N_views), noise (batch, noise_dim)].
    Output: (batch, S, S, 3) float in [0, 255].
    """
    widths = _widths(image_size, width, max_width)
    _check_int("num_views", num_views, 2)
    _check_int("id_dim", id_dim, 1)
    _check_int("noise_dim", noise_dim, 0)
    if connection not in CONNECTIONS:
        raise ValueError(f"`connection` must be one of {CONNECTIONS}. Received: connection={connection!r}")
    if modulation not in MODULATIONS:
        raise ValueError(f"`modulation` must be one of {MODULATIONS}. Received: modulation={modulation!r}")
    linked = None
    if connection in ("cnc", "global"):
        _check_int("connection_scale", connection_scale, 2)
        linked = image_size // connection_scale
        if linked * connection_scale != image_size or linked not in widths:
            raise ValueError(
                f"`connection_scale` must give one of the encoder's map sizes {sorted(widths)} at "
                f"image_size={image_size} (k in {sorted(image_size // s for s in widths)}). "
                f"Received: connection_scale={connection_scale}")

    image = keras.Input((image_size, image_size, 3), name="image")
    code = keras.Input((num_views,), name="code")
    noise = keras.Input((noise_dim,), name="noise")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(image)
    encoded = {}
    for size, channels in widths.items():
        x = keras.layers.Conv2D(channels, 4, strides=2, padding="same", use_bias=False, name=f"enc{size}_conv")(x)
        x = _bn(f"enc{size}_bn")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"enc{size}_act")(x)
        encoded[size] = x
    f_id = keras.layers.Dense(id_dim, name="f_id")(keras.layers.Flatten(name="enc_flatten")(x))
    latent = keras.layers.Concatenate(name="f_l")([f_id, noise, code])
    y = keras.layers.Dense(BOTTOM * BOTTOM * widths[BOTTOM], name="dec_dense")(latent)
    y = keras.layers.Reshape((BOTTOM, BOTTOM, widths[BOTTOM]), name="dec_reshape")(y)
    for size in sorted(widths):
        if size > BOTTOM:
            y = keras.layers.UpSampling2D(2, name=f"dec{size}_up")(y)
        y = keras.layers.Conv2D(widths[size], 3, padding="same", use_bias=False, name=f"dec{size}_conv")(y)
        if modulation == "aim":
            y = fg_layers.AdaptiveIdentityModulation(name=f"dec{size}_aim")([y, f_id])
        elif modulation == "im":
            y = fg_layers.IdentityModulation(name=f"dec{size}_im")([y, f_id])
        else:
            y = _bn(f"dec{size}_bn")(y)
        y = keras.layers.ReLU(name=f"dec{size}_act")(y)
        if connection == "skip":
            y = keras.layers.Concatenate(name=f"skip{size}")([y, encoded[size]])
        elif size == linked:
            layer = (fg_layers.ConstrainedNonalignment(radius=radius, name="cnc") if connection == "cnc"
                     else fg_layers.GlobalNonalignment(name="global_nc"))
            y = layer([y, encoded[size]])
    y = keras.layers.UpSampling2D(2, name="out_up")(y)
    y = keras.layers.Conv2D(3, 3, padding="same", activation="tanh", name="out_conv")(y)
    output = keras.layers.Rescaling(127.5, offset=127.5, name="to_pixels")(y)
    return keras.Model([image, code, noise], output, name=name)


def build_view_discriminator(image_size, num_classes, num_views, width=32, max_width=256, name="discriminator"):
    """D of ViewGAN (Sec. 3.2): conv blocks, then D^i (N_id + 1 logits) and D^a (N_views logits).

    Args:
        image_size: S, 4·2^d.
        num_classes: N_id, the training identities; D^i has one more, the generated class.
        num_views: N_views.
        width, max_width: channels of the first block, and the cap as they double.
    Input: (batch, S, S, 3) in [0, 255]. Output: a dict `identity` (batch, N_id + 1) and
    `view` (batch, N_views) logits.
    """
    widths = _widths(image_size, width, max_width)
    _check_int("num_classes", num_classes, 2)
    _check_int("num_views", num_views, 2)
    image = keras.Input((image_size, image_size, 3), name="image")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="rescale")(image)
    for size, channels in widths.items():
        x = keras.layers.Conv2D(channels, 4, strides=2, padding="same", use_bias=False, name=f"d{size}_conv")(x)
        x = _bn(f"d{size}_bn")(x)
        x = keras.layers.LeakyReLU(0.2, name=f"d{size}_act")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = {"identity": keras.layers.Dense(num_classes + 1, name="identity")(x),
               "view": keras.layers.Dense(num_views, name="view")(x)}
    return keras.Model(image, outputs, name=name)


def view_codes(views, num_views, batch=None):
    """Target-view codes C, (batch, num_views) float32, from view ids or code vectors.

    Args:
        views: an int view id, a sequence of `batch` ids, one code vector (num_views,) or
            `batch` code vectors (batch, num_views). A code must be non-negative and sum to 1
            (soft codes interpolate views).
        num_views: N_views.
        batch: the number of images; one id or one code is repeated for each.
    """
    array = np.asarray(views)
    if array.dtype == bool or not (np.issubdtype(array.dtype, np.integer) or np.issubdtype(array.dtype, np.floating)):
        raise ValueError(f"`views` must be view ids or view codes. Received: {array.dtype} values")
    if np.issubdtype(array.dtype, np.integer):
        if array.ndim > 1:
            raise ValueError(f"View ids must be an int or a 1-D sequence. Received: shape {array.shape}")
        if np.any((array < 0) | (array >= num_views)):
            raise ValueError(f"View ids must be in [0, {num_views}). Received: {np.unique(array)[:5].tolist()}")
        codes = np.eye(num_views, dtype="float32")[np.atleast_1d(array)]
    else:
        codes = np.atleast_2d(array).astype("float32")
        if array.ndim > 2 or codes.shape[-1] != num_views:
            raise ValueError(f"A view code must have length {num_views} (the model's views). "
                             f"Received: codes of shape {array.shape}")
        if np.any(codes < 0):
            raise ValueError(f"A view code must be non-negative (no negative mass). Received: {codes[np.any(codes < 0, axis=1)][0].tolist()}")
        sums = codes.sum(axis=1)
        if np.any(np.abs(sums - 1) > CODE_TOLERANCE):
            raise ValueError(f"A view code must sum to 1. Received: a code summing to {sums[np.abs(sums - 1) > CODE_TOLERANCE][0]:.4g}")
    if batch is not None and len(codes) != batch:
        if len(codes) != 1:
            raise ValueError(f"`views` must give one view per image or one for all: {batch} images. "
                             f"Received: {len(codes)} views")
        codes = np.repeat(codes, batch, axis=0)
    return codes


def _global_rows(draw, local_batch):
    """`draw(global_batch)` on every replica (the same seeded draw), this replica's rows of it."""
    replicas = tf.distribute.get_strategy().num_replicas_in_sync
    if replicas == 1:
        return draw(local_batch)
    replica = tf.distribute.get_replica_context().replica_id_in_sync_group
    rows = draw(local_batch * replicas)
    return rows[replica * local_batch:(replica + 1) * local_batch]


@keras.saving.register_keras_serializable(package="fgkeras")
class ViewTransformGAN(BuiltBeforeFit):
    """The ViewGAN game (Sec. 3): G turns an image to a target view keeping its identity, D classifies.

    Train with plain `fit` on batches of dicts `image` (batch, S, S, 3) in [0, 255], `label`
    (identities in [0, N_id)), `view` (the image's view in [0, N_views)) and optionally
    `target_view` (drawn uniformly otherwise), e.g. `fgkeras.data.view_pairs`.

    Args:
        generator: G, a built model [image, code, noise] → image (`build_view_generator`).
        discriminator: D, a built model image → {"identity": N_id + 1, "view": N_views} logits.
        num_classes: N_id, >= 2.
        view_weight: λ of eqs. (6)–(7), >= 0 (the paper: 5 on CompCars, 1 on Multi-PIE).
        generator_steps, discriminator_steps: the G:D steps per batch (1:1; the paper's 4:1 on Multi-PIE).
        seed: seeds the noise and the drawn target views.
    """

    def __init__(self, generator, discriminator, num_classes, view_weight=5.0, generator_steps=1,
                 discriminator_steps=1, seed=None, **kwargs):
        super().__init__(**kwargs)
        _check_int("num_classes", num_classes, 2)
        if view_weight < 0:
            raise ValueError(f"`view_weight` (λ) must be >= 0. Received: view_weight={view_weight}")
        _check_int("generator_steps", generator_steps, 1)
        _check_int("discriminator_steps", discriminator_steps, 1)
        for name, model in (("generator", generator), ("discriminator", discriminator)):
            if not isinstance(model, keras.Model) or not model.built:
                raise ValueError(f"`{name}` must be a built Keras model. Received: {type(model).__name__}")
        if len(generator.inputs) != 3:
            raise ValueError("`generator` must take [image, code, noise]. "
                             f"Received: a model with {len(generator.inputs)} inputs")
        image_shape = tuple(generator.inputs[0].shape[1:])
        if tuple(generator.outputs[0].shape[1:]) != image_shape:
            raise ValueError(f"`generator` must output images of its input's shape {image_shape}. "
                             f"Received: {tuple(generator.outputs[0].shape[1:])}")
        outputs = discriminator.output
        if not isinstance(outputs, dict) or set(outputs) != {"identity", "view"}:
            raise ValueError("`discriminator` must output a dict with `identity` and `view` logits. "
                             f"Received: {type(outputs).__name__}")
        num_views = int(generator.inputs[1].shape[-1])
        if int(outputs["identity"].shape[-1]) != num_classes + 1:
            raise ValueError(f"`discriminator` must output N_id + 1 = {num_classes + 1} identity logits. "
                             f"Received: {int(outputs['identity'].shape[-1])} logits")
        if int(outputs["view"].shape[-1]) != num_views:
            raise ValueError(f"`discriminator` must output the generator's {num_views} view logits. "
                             f"Received: {int(outputs['view'].shape[-1])} logits")
        self.generator = generator
        self.discriminator = discriminator
        self.num_classes = int(num_classes)
        self.num_views = num_views
        self.noise_dim = int(generator.inputs[2].shape[-1])
        self.image_shape = image_shape
        self.view_weight = float(view_weight)
        self.generator_steps = int(generator_steps)
        self.discriminator_steps = int(discriminator_steps)
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.d_optimizer = None
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        self.built = True

    @property
    def g_optimizer(self):
        """G's optimizer: `model.optimizer`, so callbacks that act on it act on G."""
        return self.optimizer

    def compile(self, g_optimizer=None, d_optimizer=None, **kwargs):
        """Compiles with one optimizer per player (Adam(2e-4, β1 = 0.5) each by default) and
        builds each on its player's variables (a lazy build fails under `MirroredStrategy`)."""
        g_optimizer = keras.optimizers.get(g_optimizer or make_optimizer("adam", 2e-4, beta_1=0.5))
        d_optimizer = keras.optimizers.get(d_optimizer or make_optimizer("adam", 2e-4, beta_1=0.5))
        if g_optimizer is d_optimizer:
            raise ValueError("Each player needs its own optimizer instance: G and D got a shared one.")
        super().compile(optimizer=g_optimizer, **kwargs)
        self.d_optimizer = d_optimizer
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def get_compile_config(self):
        if not self.compiled:
            return {}
        return {name: keras.saving.serialize_keras_object(getattr(self, name))
                for name in ("g_optimizer", "d_optimizer")}

    def compile_from_config(self, config):
        """Restores the compiled state of a saved game (the two optimizers)."""
        self.compile(**{name: keras.saving.deserialize_keras_object(value) for name, value in config.items()})

    @property
    def metrics(self):
        return [self.g_loss_tracker, self.d_loss_tracker]

    def call(self, inputs, training=False):
        """G on [image, code, noise]."""
        return self.generator(inputs, training=training)

    # --- the game ----------------------------------------------------------------------------

    def _unpack(self, data):
        if isinstance(data, (tuple, list)) and len(data) == 1:
            data = data[0]
        if not isinstance(data, dict) or not {"image", "label", "view"} <= set(data):
            raise ValueError("A ViewGAN batch must be a dict with keys 'image', 'label', 'view' "
                             f"(and optionally 'target_view'). Received: {type(data).__name__}"
                             f"{' with keys ' + str(sorted(data)) if isinstance(data, dict) else ''}")
        images = ops.cast(data["image"], "float32")
        labels = ops.reshape(ops.cast(data["label"], "int32"), (-1,))
        views = ops.reshape(ops.cast(data["view"], "int32"), (-1,))
        targets = data.get("target_view")
        targets = (self._draw_targets(ops.shape(images)[0]) if targets is None
                   else ops.reshape(ops.cast(targets, "int32"), (-1,)))
        return images, labels, views, targets

    def _draw_targets(self, batch):
        return _global_rows(lambda n: keras.random.randint((n,), 0, self.num_views, seed=self.seed_generator,
                                                           dtype="int32"), batch)

    def _draw_noise(self, batch):
        return _global_rows(lambda n: keras.random.normal((n, self.noise_dim), seed=self.seed_generator), batch)

    def _play(self, images, labels, views, targets, training=True):
        """G once on (images, one-hot targets, fresh noise), D once on [real; generated]."""
        images = ops.cast(images, "float32")
        labels, views, targets = (ops.reshape(ops.cast(x, "int32"), (-1,)) for x in (labels, views, targets))
        batch = ops.shape(images)[0]
        codes = ops.one_hot(targets, self.num_views)
        generated = self.generator([images, codes, self._draw_noise(batch)], training=training)
        logits = self.discriminator(ops.concatenate([images, ops.cast(generated, images.dtype)], axis=0),
                                    training=training)
        identity, view = (ops.cast(logits[name], "float32") for name in ("identity", "view"))
        return {"generated": generated, "labels": labels, "views": views, "targets": targets,
                "real_identity": identity[:batch], "fake_identity": identity[batch:],
                "real_view": view[:batch], "fake_view": view[batch:]}

    def _discriminator_loss(self, play):
        """−J of eq. (6): identity of real images, N_id + 1 for generated ones, λ × real views."""
        return (fg_losses.discriminator_loss(play["labels"], play["real_identity"], play["fake_identity"])
                + self.view_weight * softmax_cross_entropy(play["views"], play["real_view"]))

    def _generator_loss(self, play):
        """−J of eq. (7): the input's identity and λ × the target view for generated images."""
        return (fg_losses.identity_loss(play["labels"], play["fake_identity"])
                + self.view_weight * softmax_cross_entropy(play["targets"], play["fake_view"]))

    @staticmethod
    def _update(optimizer, tape, loss, variables):
        """One step of `optimizer` on `variables` along the gradient of `loss` (per-replica scaled)."""
        optimizer.apply(tape.gradient(loss, variables), variables)

    def _update_discriminator(self, tape, loss):
        self._update(self.d_optimizer, tape, loss, self.discriminator.trainable_variables)

    def _update_generator(self, tape, loss):
        self._update(self.g_optimizer, tape, loss, self.generator.trainable_variables)

    @staticmethod
    def _scaled(optimizer, loss):
        return optimizer.scale_loss(replica_scaled(loss))

    def _extra_step(self, player, images, labels, views):
        """One more pass for one player alone (G:D steps other than 1:1), new noise and targets."""
        targets = self._draw_targets(ops.shape(images)[0])
        with tf.GradientTape() as tape:
            play = self._play(images, labels, views, targets, training=True)
            loss = self._generator_loss(play) if player == "generator" else self._discriminator_loss(play)
            scaled = self._scaled(self.g_optimizer if player == "generator" else self.d_optimizer, loss)
        (self._update_generator if player == "generator" else self._update_discriminator)(tape, scaled)
        return loss

    def train_step(self, data):
        """One forward pass of G and D, then one step of each on its own loss (+ extra steps)."""
        images, labels, views, targets = self._unpack(data)
        with tf.GradientTape(persistent=True) as tape:
            play = self._play(images, labels, views, targets, training=True)
            d_loss, g_loss = self._discriminator_loss(play), self._generator_loss(play)
            d_scaled = self._scaled(self.d_optimizer, d_loss)
            g_scaled = self._scaled(self.g_optimizer, g_loss)
        self._update_discriminator(tape, d_scaled)
        self._update_generator(tape, g_scaled)
        del tape
        for _ in range(self.discriminator_steps - 1):
            d_loss = self._extra_step("discriminator", images, labels, views)
        for _ in range(self.generator_steps - 1):
            g_loss = self._extra_step("generator", images, labels, views)
        return self._track(g_loss, d_loss)

    def test_step(self, data):
        images, labels, views, targets = self._unpack(data)
        play = self._play(images, labels, views, targets, training=False)
        return self._track(self._generator_loss(play), self._discriminator_loss(play))

    def _track(self, g_loss, d_loss):
        self.g_loss_tracker.update_state(g_loss)
        self.d_loss_tracker.update_state(d_loss)
        return {m.name: m.result() for m in self.metrics}

    # --- users' surface ----------------------------------------------------------------------

    def transform(self, images, views, seed=0, batch_size=64):
        """G's images of `images` in the target `views` (inference mode).

        Args:
            images: (batch, S, S, 3) or one (S, S, 3) image, in [0, 255].
            views: target view ids or (soft) view codes, one per image or one for all (see
                `view_codes`): an int, `batch` ints, a code (N_views,) or codes (batch, N_views).
            seed: seeds the noise z ~ N(0, 1); None for fresh noise.
            batch_size: images per call of G.
        Returns: (batch, S, S, 3) float32 in [0, 255] (no batch axis for one image).
        """
        array = np.asarray(images, dtype="float32")
        single = array.ndim == 3
        if single:
            array = array[None]
        if array.ndim != 4 or tuple(array.shape[1:]) != self.image_shape:
            raise ValueError(f"`images` must be (batch, *{self.image_shape}). Received: shape {np.shape(images)}")
        codes = view_codes(views, self.num_views, batch=len(array))
        noise = np.random.default_rng(seed).standard_normal((len(array), self.noise_dim)).astype("float32")
        out = [keras.ops.convert_to_numpy(self.generator(
            [array[i:i + batch_size], codes[i:i + batch_size], noise[i:i + batch_size]], training=False))
            for i in range(0, len(array), batch_size)]
        result = np.concatenate(out, axis=0) if out else np.zeros((0, *self.image_shape), "float32")
        return result[0] if single else result

    def augment(self, images, per_image=20, views=None, seed=0, batch_size=64):
        """`per_image` generated views of each image, for few-shot augmentation (Sec. 4.3).

        The codes are spread over `views` (the first `len(views)` images of each input are
        one-hot views) and, beyond those, interpolations `(1 - t)·C_a + t·C_b` between two
        neighbouring views of `views` (in the order given), t ~ U(0, 1).

        Args:
            images: (batch, S, S, 3) in [0, 255].
            per_image: images generated per input, >= 1 (the paper: 20).
            views: target view ids; all of the model's (0 … N_views - 1) by default.
            seed: seeds the codes, the interpolation weights and the noise.
        Returns: `(generated, source, codes)`: (batch·per_image, S, S, 3) float32 in [0, 255],
        the index of each one's input image, and its (batch·per_image, N_views) code.
        """
        _check_int("per_image", per_image, 1)
        views = list(range(self.num_views)) if views is None else [int(v) for v in np.atleast_1d(views)]
        view_codes(np.asarray(views, dtype=np.int64), self.num_views)  # validates the ids
        array = np.asarray(images, dtype="float32")
        rng = np.random.default_rng(seed)
        eye = np.eye(self.num_views, dtype="float32")
        codes = []
        for _ in range(len(array)):
            for k in range(per_image):
                if k < len(views) or len(views) == 1:
                    codes.append(eye[views[k % len(views)]])
                else:
                    a = int(rng.integers(len(views) - 1))
                    t = float(rng.uniform())
                    codes.append((1 - t) * eye[views[a]] + t * eye[views[a + 1]])
        codes = np.stack(codes) if codes else np.zeros((0, self.num_views), "float32")
        source = np.repeat(np.arange(len(array)), per_image)
        generated = self.transform(array[source], codes, seed=int(rng.integers(2**31)), batch_size=batch_size)
        return generated, source, codes

    def get_config(self):
        return {
            **super().get_config(),
            "generator": keras.saving.serialize_keras_object(self.generator),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "num_classes": self.num_classes,
            "view_weight": self.view_weight,
            "generator_steps": self.generator_steps,
            "discriminator_steps": self.discriminator_steps,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("generator", "discriminator"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def build_viewgan(num_classes, num_views=5, image_size=64, variant="full", connection_scale=None, radius=None,
                  id_dim=128, noise_dim=128, width=32, max_width=256, view_weight=5.0, generator_steps=1,
                  discriminator_steps=1, seed=None, name="viewgan"):
    """A ViewGAN game of a named variant of Table 2 (`VARIANTS`).

    Args:
        num_classes: N_id, the training identities.
        num_views: N_views (the paper: 5 views of CompCars).
        image_size: S, 4·2^d.
        variant: one of `VARIANTS`: "vanilla", "global_nc_8", "global_nc_4", "cnc_8", "cnc_4",
            "cnc_im", "full" (CNC at 1/8 + AIM) or "unet".
        connection_scale: overrides the variant's scale k of the CNC / Global-NC (e.g. 4 at 64 px,
            where 1/8 is an 8×8 map that a radius of 2 nearly covers).
        radius, id_dim, noise_dim, width, max_width: see `build_view_generator`.
        view_weight, generator_steps, discriminator_steps, seed: see `ViewTransformGAN`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {sorted(VARIANTS)}. Received: variant={variant!r}")
    settings = dict(VARIANTS[variant])
    if connection_scale is not None:
        settings["connection_scale"] = connection_scale
    generator = build_view_generator(image_size, num_views, id_dim=id_dim, noise_dim=noise_dim, width=width,
                                     max_width=max_width, radius=radius, **settings)
    discriminator = build_view_discriminator(image_size, num_classes, num_views, width=width, max_width=max_width)
    return ViewTransformGAN(generator, discriminator, num_classes=num_classes, view_weight=view_weight,
                            generator_steps=generator_steps, discriminator_steps=discriminator_steps,
                            seed=seed, name=name)


__all__ = [
    "CONNECTIONS",
    "MODULATIONS",
    "VARIANTS",
    "ViewTransformGAN",
    "build_view_discriminator",
    "build_view_generator",
    "build_viewgan",
    "view_codes",
]
