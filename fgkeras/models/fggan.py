"""FGGAN: a view-normalising GAN for open-set fine-grained search (Xu et al., Sec. 3, Alg. 1).

A generator G and an evaluator of three players, each stepped on every batch of pairs
(x_r, x_c): a user photo x_r in any view and a stock photo x_c of the same class in the
canonical view.

- G, a fully convolutional encoder–decoder, maps x_r to x_z = G(x_r), an image of x_r's size
  in the 0–255 range (so it can be shown and fed to S). It minimises
  L_G = -log D(x_z) + -log N({x_z, x_c}) + λ ℓ + 0.001 L_S(x_z).
- D, real vs generated (Eq. 4): "real" is x_r, a real photo in a random view; generated is
  x_z. D is no canonical-view judge: that is N's job.
- N, the normaliser (Eq. 5), a binary classifier on pairs stacked on channels (6 channels):
  positive {x_p, x_c}, negative {x_z, x_c}; its conv layer `recon_layer` gives the features of
  the reconstruction loss ℓ = ½ ‖f(x_z) − f(x_c)‖² (λ = 1), minimised by G only.
- S, the semantic embedding (Eq. 6): an `Embedder` with a no-bias softmax head over the
  training classes, trained on real and generated images.

The variants of Table 3 are configurations of the one class (`VARIANTS`): "CAE" (G alone,
reconstructing x_c in pixels), "GD" (DCGAN), "GDN*" (N without ℓ), "GDN", "GDN*S" and "GDNS"
(the full model).

Readings of the paper, and design decisions where it is silent:

- Signs. The paper writes L_G = −E (Eq. 3) and puts "−λℓ" in N's loss (Eq. 5). What each term
  is for is stated in the text: G confuses D and N, stays close to x_c in N's feature space,
  and is classified correctly by S. So G minimises the non-saturating GAN losses
  −log D(x_z) and −log N({x_z, x_c}) (DCGAN's practice, the paper's reference [29]), + λℓ,
  + 0.001 L_S(x_z); D and N minimise their binary cross-entropies; ℓ is no term of N's loss
  (its gradient is taken for G only; N's features are what it is measured on).
- The 0.001 ("we multiply the classification error of S by a factor of 0.001") weighs the S
  term of G's loss, `semantic_weight`. S's own loss, L_S(x_r) + L_S(x_z), is unweighted: it is
  S's only loss, and a constant factor only rescales its step.
- N's positive pair. The paper's "x = x_c" would pair a photo with itself, which N can
  recognise from pixel equality alone. The default, `positive_pair="same_class"`, pairs x_c
  with another stock photo x_p of the same class in the canonical view (the batch's `positive`;
  x_c itself when the class has only one). `positive_pair="identical"` is the literal reading.
- ℓ's features. f(x) is N's `recon_layer` activation (after its LeakyReLU) on the pair
  {x, x_c}: f(x_z) on the negative pair, f(x_c) on {x_c, x_c}. ℓ is zero exactly when G's
  image gives N's layer the activations of the canonical photo itself. ½‖·‖² is averaged
  over the feature's elements (the paper's "mean square error") and over the batch.
- One forward pass per step, in training mode, as in `HardTripletGAN`: G once, D once on
  [x_r; x_z], N once on [positive; negative (; {x_c, x_c})] pairs, S once on [x_r; x_z]; each
  player's gradient is taken from that pass on its own loss and its own variables, then the
  players step in the paper's order D → N → S → G. Every player therefore steps from the
  same state of the others (G sees the evaluator one step behind), and every batch norm
  moves its statistics once per step; Alg. 1's strictly alternating reading would need a
  second pass of D, N and S for G.
- D and N see their real and generated inputs in one batch, so that their batch norms
  cannot normalise away a difference between the two.
- In the variants without S ("CAE", "GD", "GDN*", "GDN"), S is the pre-trained S, frozen (in
  inference mode, never stepped): the retrieval features come from it, applied to G(x), as
  for the full model (the paper is silent on where those variants' features come from).
- Retrieval (Sec. 3.6): `model.embedder` is one Keras model, S ∘ G: gallery and queries both
  pass through G. Its `feature` is S's embedding (the `Embedder` output, L2-normalised; the
  default, the paper's "last fully-connected layer"; not the classifier, which knows only the
  training classes) or an aggregation of S's last conv map ("mac", "spoc", "crow", "scda",
  "gem"), L2-normalised.
- CAE's reconstruction is the mean squared error of G(x_r) and x_c in [-1, 1] pixels.
- Under `tf.distribute` every player runs on its replica's shard; every batch norm of G, D
  and N is synchronised (so are S's feature batch norms), losses are per-replica means
  divided by the number of replicas: a distributed step equals one device on the same global
  batch, up to the batch norms inside S's backbone, which see their shard as in any
  distributed CNN.
"""

import logging

import keras
import tensorflow as tf
from keras import ops

from fgkeras import layers as fg_layers
from fgkeras.models.embedder import Embedder
from fgkeras.models.training import BuiltBeforeFit, make_optimizer, replica_scaled

logger = logging.getLogger(__name__)

# The modules of each variant of the paper's Table 3.
VARIANTS = {
    "CAE": {"discriminator": False, "normalizer": False, "reconstruction": False, "semantic": False},
    "GD": {"discriminator": True, "normalizer": False, "reconstruction": False, "semantic": False},
    "GDN*": {"discriminator": True, "normalizer": True, "reconstruction": False, "semantic": False},
    "GDN": {"discriminator": True, "normalizer": True, "reconstruction": True, "semantic": False},
    "GDN*S": {"discriminator": True, "normalizer": True, "reconstruction": False, "semantic": True},
    "GDNS": {"discriminator": True, "normalizer": True, "reconstruction": True, "semantic": True},
}
POSITIVE_PAIRS = ("same_class", "identical")
FEATURES = ("embedding", "mac", "spoc", "crow", "scda", "gem")
RECON_LAYERS = ("conv1", "conv2", "conv3", "conv4")
PLAYERS = ("discriminator", "normalizer", "semantic", "generator")  # the update order of Alg. 1
_KERNEL = 4
_LEAK = 0.2  # the paper's LeakyReLU slope


def _to_unit(images):
    """0–255 images to [-1, 1] float32."""
    return ops.cast(images, "float32") / 127.5 - 1.0


def receptive_field(depth, kernel=_KERNEL):
    """Side in pixels of what one bottleneck unit of G's encoder sees (stride-2 convolutions)."""
    return 1 + sum((kernel - 1) * 2**i for i in range(depth))


def _check_image_size(image_size, depth):
    if not isinstance(image_size, int) or image_size < 1:
        raise ValueError(f"`image_size` must be a positive int. Received: image_size={image_size!r}")
    field = receptive_field(depth)
    if image_size < field:
        raise ValueError(
            f"Images of {image_size} px are smaller than G's receptive field ({field} px with depth={depth}): "
            f"use larger images or a smaller `depth`. Received: image_size={image_size}, depth={depth}")
    if image_size % 2**depth:
        raise ValueError(
            f"G's encoder halves the image {depth} times, so `image_size` must be a multiple of {2**depth}. "
            f"Received: image_size={image_size}")


def default_depth(image_size):
    """G's number of down-sampling steps: the largest <= 4 whose receptive field fits the image."""
    depth = 4
    while depth > 1 and receptive_field(depth) > image_size:
        depth -= 1
    return depth


def _batch_norm(name):
    # Synchronised: under tf.distribute the moments are those of the global batch.
    return keras.layers.BatchNormalization(synchronized=True, name=name)


def build_generator(image_size, base_width=32, depth=None, skips=False, residual=False, name="generator"):
    """G: a fully convolutional encoder–decoder (Sec. 3.1, DCGAN-style, Fig. 2).

    Encoder: `depth` stride-2 4×4 convolutions with LeakyReLU 0.2 (batch norm after all but the
    first), widths base_width × 1, 2, 4, 8 …; decoder: as many stride-2 transposed
    convolutions back to the input's size, batch norm and ReLU, the last to 3 channels + tanh.
    With `skips`, each decoder block but the last also takes the encoder's activation of its
    resolution (concatenated on channels, as pix2pix's U-Net): not in the paper, whose G has
    only the bottleneck; a study of G's capacity to keep what an unseen class looks like.
    With `residual`, G adds its decoder's output to its input instead: G(x) = clip(x + Δ(x)),
    the last convolution (Δ's) zero-initialised and without tanh, so that G starts the game as
    the identity exactly and S ∘ G as S (what `pretrain_generator` approximates by training);
    not in the paper either.

    Args:
        image_size: side of the square images, a multiple of 2**depth and at least G's
            receptive field (`receptive_field(depth)`).
        base_width: channels of the first convolution.
        depth: down-sampling steps; `default_depth(image_size)` by default.
        skips: U-Net connections from the encoder to the decoder (False: the paper's G).
        residual: G(x) = x + Δ(x), starting at the identity (False: the paper's G).
    Input: (batch, image_size, image_size, 3) in [0, 255]. Output: the same shape, float32 in [0, 255].
    """
    depth = default_depth(image_size) if depth is None else depth
    if not isinstance(depth, int) or depth < 1:
        raise ValueError(f"`depth` must be an int >= 1. Received: depth={depth!r}")
    if base_width < 1:
        raise ValueError(f"`base_width` must be >= 1. Received: base_width={base_width}")
    _check_image_size(image_size, depth)
    inputs = keras.Input((image_size, image_size, 3), name="images")
    x = unit_inputs = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_unit")(inputs)
    encoded = []  # the encoder's activations, finest first
    for i in range(depth):
        x = keras.layers.Conv2D(base_width * 2**i, _KERNEL, strides=2, padding="same", name=f"down{i + 1}")(x)
        if i:
            x = _batch_norm(f"down{i + 1}_bn")(x)
        x = keras.layers.LeakyReLU(_LEAK, name=f"down{i + 1}_act")(x)
        encoded.append(x)
    for i in reversed(range(depth - 1)):
        x = keras.layers.Conv2DTranspose(base_width * 2**i, _KERNEL, strides=2, padding="same",
                                         name=f"up{depth - 1 - i}")(x)
        x = _batch_norm(f"up{depth - 1 - i}_bn")(x)
        x = keras.layers.ReLU(name=f"up{depth - 1 - i}_act")(x)
        if skips:  # x is now at the resolution of the encoder's block i + 1
            x = keras.layers.Concatenate(name=f"skip{i + 1}")([x, encoded[i]])
    if residual:
        delta = keras.layers.Conv2DTranspose(3, _KERNEL, strides=2, padding="same", kernel_initializer="zeros",
                                             name=f"up{depth}")(x)
        outputs = keras.layers.Add(dtype="float32", name="residual")([unit_inputs, delta])
        outputs = keras.layers.Rescaling(127.5, offset=127.5, dtype="float32", name="to_pixels")(outputs)
        outputs = keras.layers.ReLU(max_value=255.0, dtype="float32", name="clip")(outputs)
        return keras.Model(inputs, outputs, name=name)
    x = keras.layers.Conv2DTranspose(3, _KERNEL, strides=2, padding="same", name=f"up{depth}")(x)
    outputs = keras.layers.Activation("tanh", dtype="float32", name="tanh")(x)
    outputs = keras.layers.Rescaling(127.5, offset=127.5, dtype="float32", name="to_pixels")(outputs)
    return keras.Model(inputs, outputs, name=name)


def _conv_classifier(image_size, channels, base_width, name):
    """Four named stride-2 conv blocks (conv1 … conv4, LeakyReLU 0.2, BN after the first) → 1 logit."""
    inputs = keras.Input((image_size, image_size, channels), name="images")
    x = keras.layers.Rescaling(1 / 127.5, offset=-1.0, name="to_unit")(inputs)
    for i, layer in enumerate(RECON_LAYERS):
        x = keras.layers.Conv2D(base_width * 2**i, _KERNEL, strides=2, padding="same", name=layer)(x)
        if i:
            x = _batch_norm(f"{layer}_bn")(x)
        x = keras.layers.LeakyReLU(_LEAK, name=f"{layer}_act")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    outputs = keras.layers.Dense(1, dtype="float32", name="logit")(x)
    return keras.Model(inputs, outputs, name=name)


def build_discriminator(image_size, base_width=32, name="discriminator"):
    """D: real vs generated (Sec. 3.2), a DCGAN discriminator on one image.

    Input: (batch, image_size, image_size, 3) in [0, 255]. Output: (batch, 1) logits of "real".
    """
    return _conv_classifier(image_size, 3, base_width, name)


def build_normalizer(image_size, base_width=32, name="normalizer"):
    """N: the normaliser (Sec. 3.3), a binary classifier of pairs stacked on channels.

    Its conv layers are named conv1 … conv4; `ViewNormalizingGAN` takes ℓ's features after
    the activation of the one named by `recon_layer`.
    Input: (batch, image_size, image_size, 6) pairs `make_pairs(x, x_c)` in [0, 255].
    Output: (batch, 1) logits of "x is the canonical view of x_c's class".
    """
    return _conv_classifier(image_size, 6, base_width, name)


def make_pairs(images, canonical):
    """N's input: `images` and `canonical` stacked on channels, (batch, H, W, 6), x first."""
    return ops.concatenate([ops.cast(images, "float32"), ops.cast(canonical, "float32")], axis=-1)


def reconstruction_loss(features, target_features):
    """ℓ = ½ ‖f_x − f_xc‖² as a mean square error: ½ × mean over elements and batch (Eq. 5).

    Args:
        features, target_features: (batch, ...) activations of N's reconstruction layer.
    Returns: scalar float32; 0 for identical features.
    """
    difference = ops.cast(features, "float32") - ops.cast(target_features, "float32")
    return 0.5 * ops.mean(ops.square(difference))


def _binary_loss(logits, target):
    """Mean sigmoid cross-entropy of logits against a constant label (1 real/positive, 0 not)."""
    logits = ops.cast(ops.reshape(logits, (-1,)), "float32")
    labels = ops.full(ops.shape(logits), float(target), dtype="float32")
    return ops.mean(keras.losses.binary_crossentropy(labels[:, None], logits[:, None], from_logits=True))


def _softmax_loss(labels, logits):
    return ops.mean(keras.losses.sparse_categorical_crossentropy(
        labels, ops.cast(logits, "float32"), from_logits=True))


def _pooling(feature):
    return {
        "mac": lambda: fg_layers.MACPooling2D(name="aggregate"),
        "spoc": lambda: fg_layers.SPoCPooling2D(name="aggregate"),
        "crow": lambda: fg_layers.CroWPooling2D(name="aggregate"),
        "scda": lambda: fg_layers.SCDAPooling2D(name="aggregate"),
        "gem": lambda: fg_layers.GeMPooling2D(trainable_p=False, name="aggregate"),
    }[feature]()


@keras.saving.register_keras_serializable(package="fgkeras")
class CanonicalEmbedder(keras.Model):
    """The retrieval embedder of FGGAN, S ∘ G (Sec. 3.6): images → G's canonical view → S.

    Args:
        generator: G, or None for S alone (the baselines "S" and "S + aggregation").
        semantic: S, an `Embedder`.
        feature: "embedding" (S's L2-normalised embedding, the default) or an aggregation of
            S's last conv map, L2-normalised: "mac", "spoc", "crow", "scda" or "gem" (p = 3).
    Input: (batch, H, W, 3) images in [0, 255]. Output: (batch, embedding_dim) unit vectors.
    The layers are G's and S's own (shared, not copied).
    """

    def __init__(self, generator, semantic, feature="embedding", **kwargs):
        super().__init__(**kwargs)
        if feature not in FEATURES:
            raise ValueError(f"`feature` must be one of {FEATURES}. Received: feature={feature!r}")
        if not isinstance(semantic, Embedder):
            raise ValueError(f"`semantic` (S) must be an fgkeras `Embedder`. Received: {type(semantic).__name__}")
        self.generator = generator
        self.semantic = semantic
        self.feature = feature
        self.aggregate = None if feature == "embedding" else _pooling(feature)
        self.l2_normalize = fg_layers.L2Normalize(name="l2_normalize")
        if feature == "embedding":
            self.embedding_dim = semantic.embedding_dim
        else:
            channels = semantic.backbone.compute_output_shape((None, None, None, 3))[-1]
            self.embedding_dim = int(channels) * (2 if feature == "scda" else 1)

    def build(self, input_shape):
        if not self.semantic.built:
            self.semantic.build(input_shape)
        self.built = True

    def features(self, images, training=False):
        """The descriptor before L2 normalisation, (batch, embedding_dim) float32."""
        x = images if self.generator is None else self.generator(images, training=training)
        if self.aggregate is None:
            return self.semantic.features(x, training=training)
        maps = self.semantic.backbone(self.semantic.normalize_input(ops.cast(x, "float32")), training=training)
        return ops.cast(self.aggregate(maps), "float32")

    def call(self, images, training=False):
        return self.l2_normalize(self.features(images, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "generator": None if self.generator is None else keras.saving.serialize_keras_object(self.generator),
            "semantic": keras.saving.serialize_keras_object(self.semantic),
            "feature": self.feature,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        if config.get("generator") is not None:
            config["generator"] = keras.saving.deserialize_keras_object(config["generator"])
        config["semantic"] = keras.saving.deserialize_keras_object(config["semantic"])
        return cls(**config)


def _image_shape(model, name, channels):
    try:
        shape = tuple(model.input_shape)
    except (AttributeError, ValueError) as error:
        raise ValueError(f"`{name}` must be a built Keras model with one image input, e.g. from "
                         f"`build_{name}`. Received: {model!r}") from error
    if len(shape) != 4 or shape[-1] != channels:
        raise ValueError(f"`{name}` must take (batch, H, W, {channels}) inputs. Received: input shape {shape}")
    return shape[1:3]


def default_optimizer():
    """The paper's optimizer ("following DCGAN"): Adam, learning rate 2e-4, β1 = 0.5."""
    return make_optimizer("adam", 2e-4, beta_1=0.5)


@keras.saving.register_keras_serializable(package="fgkeras")
class ViewNormalizingGAN(BuiltBeforeFit):
    """The FGGAN game: G, D, N and S (with its no-bias softmax head), trained by `fit`.

    Calling the model returns `model.embedder`'s embeddings (S ∘ G), so `predict` and the
    evaluation helpers work on it; `model.embedder` is the retrieval embedder to export.

    Args:
        generator: G, e.g. `build_generator(image_size)`: (batch, H, W, 3) → the same shape.
        semantic: S, an `Embedder` (pre-trained: see `pretrain_semantic`).
        num_classes: the number of training classes, >= 2 (S's softmax head).
        discriminator: D, e.g. `build_discriminator(image_size)`, (batch, H, W, 3) → (batch, 1);
            None if the variant has none.
        normalizer: N, e.g. `build_normalizer(image_size)`, (batch, H, W, 6) → (batch, 1), with a
            layer named `recon_layer`; None if the variant has none.
        classifier: S's head, a `fgkeras.layers.NoBiasDense(num_classes)` (e.g. the pre-trained
            `MetricLearner`'s `classifier`); a fresh one by default.
        variant: one of `VARIANTS` ("GDNS", the full model, by default).
        recon_layer: N's layer of ℓ, "conv1" … "conv4" ("conv4" by default).
        lam: λ, the weight of ℓ in G's loss, >= 0 (1 in the paper).
        semantic_weight: the weight of S's classification error in G's loss, >= 0 (0.001).
        positive_pair: N's positive pair, "same_class" ({x_p, x_c}, the default) or
            "identical" ({x_c, x_c}, the paper's literal x = x_c).
        feature: `model.embedder`'s feature (see `CanonicalEmbedder`).

    Batches are dicts with `image` (x_r, user photos in any view), `canonical` (x_c, a stock
    photo of the same class in the canonical view), `positive` (x_p, another canonical photo of
    the class; needed for N with `positive_pair="same_class"`) and `label`, all images in
    [0, 255] of G's input size (see `fgkeras.data.canonical_pairs`).
    """

    def __init__(self, generator, semantic, num_classes, discriminator=None, normalizer=None, classifier=None,
                 variant="GDNS", recon_layer="conv4", lam=1.0, semantic_weight=1e-3, positive_pair="same_class",
                 feature="embedding", **kwargs):
        super().__init__(**kwargs)
        if variant not in VARIANTS:
            raise ValueError(f"`variant` must be one of {list(VARIANTS)}. Received: variant={variant!r}")
        if num_classes is None or num_classes < 2:
            raise ValueError(f"`num_classes` must be >= 2. Received: num_classes={num_classes}")
        if recon_layer not in RECON_LAYERS:
            raise ValueError(f"`recon_layer` must be one of {RECON_LAYERS}. Received: recon_layer={recon_layer!r}")
        for weight, value in (("lam", lam), ("semantic_weight", semantic_weight)):
            if value < 0:
                raise ValueError(f"`{weight}` must be >= 0. Received: {weight}={value}")
        if positive_pair not in POSITIVE_PAIRS:
            raise ValueError(f"`positive_pair` must be one of {POSITIVE_PAIRS}. "
                             f"Received: positive_pair={positive_pair!r}")
        uses = VARIANTS[variant]
        size = _image_shape(generator, "generator", 3)
        out = tuple(generator.output_shape)
        if out[1:] != (*size, 3):
            raise ValueError(f"G must give back an image of its input's size, {(*size, 3)}. "
                             f"Received: a generator with output shape {out}")
        for name, model, channels in (("discriminator", discriminator, 3), ("normalizer", normalizer, 6)):
            if uses[name] and model is None:
                raise ValueError(f"Variant {variant!r} needs a `{name}`. Received: {name}=None")
            if model is not None and _image_shape(model, name, channels) != size:
                raise ValueError(f"`{name}` must take images of G's size {size}. "
                                 f"Received: input shape {tuple(model.input_shape)}")
        self._normalizer_play = None
        if normalizer is not None:
            try:
                layer = normalizer.get_layer(f"{recon_layer}_act")
            except ValueError:
                raise ValueError(f"`normalizer` has no conv layer {recon_layer!r} (activation "
                                 f"'{recon_layer}_act'), as `build_normalizer` makes. "
                                 f"Received: recon_layer={recon_layer!r}") from None
            self._normalizer_play = keras.Model(normalizer.inputs, [normalizer.outputs[0], layer.output],
                                                name="normalizer_play")
        if classifier is None:
            classifier = fg_layers.NoBiasDense(num_classes, name="classifier")
        if not classifier.built:
            classifier.build((None, semantic.embedding_dim))
        if classifier.units != num_classes:
            raise ValueError(f"S's classifier must have num_classes={num_classes} outputs. "
                             f"Received: {classifier.units}")
        self.generator = generator
        self.semantic = semantic
        self.discriminator = discriminator
        self.normalizer = normalizer
        self.classifier = classifier
        self.num_classes = num_classes
        self.variant = variant
        self.uses = dict(uses)
        self.recon_layer = recon_layer
        self.lam = lam
        self.semantic_weight = semantic_weight
        self.positive_pair = positive_pair
        self.feature = feature
        self.image_size = size
        self.embedder = CanonicalEmbedder(generator, semantic, feature=feature, name="canonical_embedder")
        self.optimizers = {}
        self.trackers = {name: keras.metrics.Mean(name=f"{name[0]}_loss") for name in self.players}
        if self.uses["reconstruction"]:
            self.trackers["reconstruction"] = keras.metrics.Mean(name="recon_loss")
        self.built = True

    @property
    def players(self):
        """The players the variant steps, in the update order D → N → S → G."""
        return [name for name in PLAYERS if name == "generator" or self.uses[name]]

    def player_variables(self, name):
        """The trainable variables that player `name` steps (S: its embedder and its head)."""
        if name == "semantic":
            return [*self.semantic.trainable_variables, *self.classifier.trainable_variables]
        return getattr(self, name).trainable_variables

    def compile(self, g_optimizer=None, d_optimizer=None, n_optimizer=None, s_optimizer=None, **kwargs):
        """One optimizer per player (the paper's Adam(2e-4, β1 = 0.5) for any not given), each
        built on its player's variables here (a distributed fit fails on a lazy build).
        `model.optimizer` is G's. Optimizers of players the variant lacks are ignored."""
        given = {"generator": g_optimizer, "discriminator": d_optimizer, "normalizer": n_optimizer,
                 "semantic": s_optimizer}
        optimizers = {name: keras.optimizers.get(given[name]) if given[name] is not None else default_optimizer()
                      for name in self.players}
        if len({id(o) for o in optimizers.values()}) < len(optimizers):
            raise ValueError(f"Each player needs its own optimizer instance: {self.players} got a shared one.")
        super().compile(optimizer=optimizers["generator"], **kwargs)
        self.optimizers = optimizers
        for name, optimizer in optimizers.items():
            optimizer.build(self.player_variables(name))

    def get_compile_config(self):
        if not self.compiled:
            return {}
        short = {"generator": "g", "discriminator": "d", "normalizer": "n", "semantic": "s"}
        return {f"{short[name]}_optimizer": keras.saving.serialize_keras_object(optimizer)
                for name, optimizer in self.optimizers.items()}

    def compile_from_config(self, config):
        """Restores the compiled state of a saved game (one optimizer per player)."""
        self.compile(**{name: keras.saving.deserialize_keras_object(value) for name, value in config.items()})

    @property
    def metrics(self):
        return list(self.trackers.values())

    def call(self, images, training=False):
        """`model.embedder` on images, or on the user photos (`image`) of a batch of pairs."""
        if isinstance(images, dict):  # Keras builds a distributed fit by calling the model on a batch
            images = images["image"]
        return self.embedder(images, training=training)

    def _check_batch(self, data):
        if not isinstance(data, dict) or "image" not in data or "label" not in data:
            raise ValueError("An FGGAN batch must be a dict with 'image', 'canonical', 'label' (and 'positive'), "
                             f"e.g. from `fgkeras.data.canonical_pairs`. Received: {type(data).__name__}"
                             + (f" with keys {sorted(data)}" if isinstance(data, dict) else ""))
        needed = ["canonical"]
        if self.uses["normalizer"] and self.positive_pair == "same_class":
            needed.append("positive")
        missing = [key for key in needed if key not in data]
        if missing:
            raise ValueError(f"Variant {self.variant!r} needs batch keys {missing}. Received keys {sorted(data)}")
        for key in ("image", *needed):
            shape = tuple(data[key].shape)
            if len(shape) != 4 or shape[-1] != 3:
                raise ValueError(f"Batch {key!r} must be (batch, H, W, 3) RGB images. Received shape {shape}")
            if None not in shape[1:3] and tuple(shape[1:3]) != tuple(self.image_size):
                raise ValueError(f"Batch {key!r} must have G's image size {tuple(self.image_size)}. "
                                 f"Received shape {shape}")

    def _play(self, data, training=True):
        """G once, then D, N and S once each on what they judge: a dict of every output."""
        self._check_batch(data)
        real = ops.cast(data["image"], "float32")
        canonical = ops.cast(data["canonical"], "float32")
        play = {"labels": ops.reshape(ops.cast(data["label"], "int32"), (-1,)), "real": real,
                "canonical": canonical, "generated": self.generator(real, training=training)}
        generated = play["generated"]
        batch = ops.shape(real)[0]
        if self.uses["discriminator"]:
            logits = self.discriminator(ops.concatenate([real, generated], axis=0), training=training)
            play["d_real"], play["d_fake"] = logits[:batch], logits[batch:]
        if self.uses["normalizer"]:
            positive = canonical if self.positive_pair == "identical" else ops.cast(data["positive"], "float32")
            pairs = [make_pairs(positive, canonical), make_pairs(generated, canonical)]
            target_pairs = self.uses["reconstruction"] and self.positive_pair != "identical"
            if target_pairs:
                pairs.append(make_pairs(canonical, canonical))
            logits, features = self._normalizer_play(ops.concatenate(pairs, axis=0), training=training)
            play["n_positive"], play["n_negative"] = logits[:batch], logits[batch:2 * batch]
            play["f_generated"] = features[batch:2 * batch]
            play["f_canonical"] = features[2 * batch:] if target_pairs else features[:batch]
        semantic_training = training and self.uses["semantic"]
        logits = self.classifier(self.semantic.features(ops.concatenate([real, generated], axis=0),
                                                        training=semantic_training))
        play["s_real"], play["s_fake"] = logits[:batch], logits[batch:]
        return play

    def _discriminator_loss(self, play):
        """Eq. (4): −log D(x_r) − log(1 − D(x_z))."""
        return _binary_loss(play["d_real"], 1.0) + _binary_loss(play["d_fake"], 0.0)

    def _normalizer_loss(self, play):
        """Eq. (5) for N: −log N({x_p, x_c}) − log(1 − N({x_z, x_c})); ℓ is G's alone."""
        return _binary_loss(play["n_positive"], 1.0) + _binary_loss(play["n_negative"], 0.0)

    def _semantic_loss(self, play):
        """Eq. (6) on real and generated images: L_S(x_r) + L_S(x_z)."""
        return _softmax_loss(play["labels"], play["s_real"]) + _softmax_loss(play["labels"], play["s_fake"])

    def _reconstruction_loss(self, play):
        """ℓ on N's `recon_layer`: f(x_z) on {x_z, x_c} against f(x_c) on {x_c, x_c}."""
        return reconstruction_loss(play["f_generated"], play["f_canonical"])

    def _generator_loss(self, play):
        """−log D(x_z) − log N({x_z, x_c}) + λℓ + 0.001 L_S(x_z); CAE: ‖G(x_r) − x_c‖² ([-1, 1] pixels)."""
        terms = []
        if self.uses["discriminator"]:
            terms.append(_binary_loss(play["d_fake"], 1.0))
        if self.uses["normalizer"]:
            terms.append(_binary_loss(play["n_negative"], 1.0))
        if self.uses["reconstruction"]:
            terms.append(self.lam * self._reconstruction_loss(play))
        if self.uses["semantic"]:
            terms.append(self.semantic_weight * _softmax_loss(play["labels"], play["s_fake"]))
        if not (self.uses["discriminator"] or self.uses["normalizer"]):
            terms.append(ops.mean(ops.square(_to_unit(play["generated"]) - _to_unit(play["canonical"]))))
        return ops.sum(ops.stack(terms))

    def _player_losses(self, play):
        """Each player's loss, with the regularisation losses of its own layers."""
        losses = {}
        for name in self.players:
            loss = getattr(self, f"_{name}_loss")(play)
            own = [*getattr(self, name).losses, *(self.classifier.losses if name == "semantic" else [])]
            if own:
                loss = loss + ops.sum(ops.stack([ops.cast(x, "float32") for x in own]))
            losses[name] = loss
        return losses

    def _update(self, name, tape, scaled_loss):
        variables = self.player_variables(name)
        self.optimizers[name].apply(tape.gradient(scaled_loss, variables), variables)

    def _track(self, losses, play):
        for name, loss in losses.items():
            self.trackers[name].update_state(loss)
        if "reconstruction" in self.trackers:
            self.trackers["reconstruction"].update_state(self._reconstruction_loss(play))
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        """One pass of G, D, N and S, then one step of each player on its own loss, D → N → S → G."""
        with tf.GradientTape(persistent=True) as tape:
            play = self._play(data, training=True)
            losses = self._player_losses(play)
            scaled = {name: self.optimizers[name].scale_loss(replica_scaled(loss)) for name, loss in losses.items()}
        for name in self.players:
            self._update(name, tape, scaled[name])
        del tape
        return self._track(losses, play)

    def test_step(self, data):
        play = self._play(data, training=False)
        return self._track(self._player_losses(play), play)

    def get_config(self):
        def serialize(model):
            return None if model is None else keras.saving.serialize_keras_object(model)

        return {
            **super().get_config(),
            "generator": serialize(self.generator),
            "semantic": serialize(self.semantic),
            "discriminator": serialize(self.discriminator),
            "normalizer": serialize(self.normalizer),
            "classifier": serialize(self.classifier),
            "num_classes": self.num_classes,
            "variant": self.variant,
            "recon_layer": self.recon_layer,
            "lam": self.lam,
            "semantic_weight": self.semantic_weight,
            "positive_pair": self.positive_pair,
            "feature": self.feature,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("generator", "semantic", "discriminator", "normalizer", "classifier"):
            if config.get(name) is not None:
                config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def build_fggan(semantic, num_classes, image_size, variant="GDNS", base_width=32, depth=None, skips=False,
                residual=False, classifier=None, recon_layer="conv4", lam=1.0, semantic_weight=1e-3, positive_pair="same_class",
                feature="embedding", name="fggan"):
    """The FGGAN game on S with the paper's G, D and N, only the players `variant` uses.

    Args:
        semantic: S, an `Embedder` (pre-trained: `pretrain_semantic`).
        num_classes: the number of training classes.
        image_size: side of the square images (G's input and output).
        variant: one of `VARIANTS`.
        base_width: channels of the first convolution of G, D and N (the width of each).
        depth: G's down-sampling steps (`default_depth(image_size)` by default).
        skips: G's U-Net connections (see `build_generator`; False, the paper's G).
        residual: G starts as the identity, G(x) = x + Δ(x) (see `build_generator`; False, the paper's G).
        classifier, recon_layer, lam, semantic_weight, positive_pair, feature: see `ViewNormalizingGAN`.
    """
    if variant not in VARIANTS:
        raise ValueError(f"`variant` must be one of {list(VARIANTS)}. Received: variant={variant!r}")
    uses = VARIANTS[variant]
    return ViewNormalizingGAN(
        build_generator(image_size, base_width, depth, skips=skips, residual=residual), semantic, num_classes,
        discriminator=build_discriminator(image_size, base_width) if uses["discriminator"] else None,
        normalizer=build_normalizer(image_size, base_width) if uses["normalizer"] else None,
        classifier=classifier, variant=variant, recon_layer=recon_layer, lam=lam,
        semantic_weight=semantic_weight, positive_pair=positive_pair, feature=feature, name=name,
    )


class _IdentityWarmup(BuiltBeforeFit):
    """G trained by `fit` to give back its input: the model of `pretrain_generator`.

    Loss: the pixel MSE of G(x) and x in [-1, 1], a per-replica mean divided by the replicas. A
    trainer of its own, built with its optimizer before `fit` (not a functional model compiled
    with that loss): under `MultiWorkerMirroredStrategy` Keras's symbolic build of a plain model
    fails on the first distributed batch (see `BuiltBeforeFit`).
    """

    def __init__(self, generator, **kwargs):
        super().__init__(**kwargs)
        self.generator = generator
        self.loss_tracker = keras.metrics.Mean(name="loss")
        self.built = True

    def compile(self, optimizer, **kwargs):
        super().compile(optimizer=optimizer, **kwargs)
        self.optimizer.build(self.generator.trainable_variables)

    @property
    def metrics(self):
        return [self.loss_tracker]

    def call(self, images, training=False):
        return self.generator(images, training=training)

    def train_step(self, data):
        images = ops.cast(data["image"], "float32")
        variables = self.generator.trainable_variables
        with tf.GradientTape() as tape:
            loss = ops.mean(ops.square(_to_unit(self.generator(images, training=True)) - _to_unit(images)))
            scaled = self.optimizer.scale_loss(replica_scaled(loss))
        self.optimizer.apply(tape.gradient(scaled, variables), variables)
        self.loss_tracker.update_state(loss)
        return {"loss": self.loss_tracker.result()}


def pretrain_generator(generator, dataset, steps, optimizer=None, verbose="auto"):
    """G's warm-up before the game: `steps` steps of reproducing its input (pixel MSE in [-1, 1]).

    Not in the paper, whose G starts from random weights. At retrieval every image passes
    through G, so a G that starts the game as a blurred constant (what the first hundreds of
    adversarial steps give here, benchmarks/results/fggan_synthetic.md) starts S ∘ G far below S;
    a G that starts as the identity starts S ∘ G at S, and the game then turns its views. (The
    paper's CAE, reconstructing x_c, would start it at the class's mean canonical photo.)

    Args:
        generator: G, trained in place.
        dataset: batches of dicts with `image` (x_r, 0–255), e.g. `fgkeras.data.canonical_pairs`.
        steps: the number of steps (0: G stays as it is).
        optimizer: an optimizer; the paper's Adam(2e-4, β1 = 0.5) by default.
    Returns: the Keras `History` of the warm-up, or None for 0 steps.
    """
    if steps <= 0:
        return None
    warmup = _IdentityWarmup(generator, name="generator_warmup")
    warmup.compile(optimizer=optimizer or default_optimizer())
    logger.info("FGGAN: G's identity warm-up for %d steps", steps)
    images = dataset.map(lambda batch: {"image": batch["image"]})
    return warmup.fit(images, epochs=1, steps_per_epoch=steps, verbose=verbose, shuffle=False)


def pretrain_semantic(semantic, dataset, num_classes, steps, optimizer=None, verbose="auto"):
    """S's pre-training (the paper starts S from ImageNet): no-bias softmax on real images.

    Args:
        semantic: S, an `Embedder`, trained in place.
        dataset: batches of real training images, dicts with `image` and `label` (e.g. P×K).
        num_classes: the number of training classes.
        steps: the number of steps (0: S stays as it is, with a fresh head).
        optimizer: an optimizer; Adam(1e-3) by default.
    Returns: S's classifier, a trained `NoBiasDense(num_classes)`, to give the game.
    """
    from fgkeras.models.baselines import MetricLearner

    learner = MetricLearner(semantic, num_classes=num_classes, softmax="no_bias", triplet="none",
                            name="semantic_pretraining")
    if steps > 0:
        learner.compile(optimizer=optimizer or make_optimizer("adam", 1e-3))
        logger.info("FGGAN: pre-training S for %d steps", steps)
        learner.fit(dataset, epochs=1, steps_per_epoch=steps, verbose=verbose, shuffle=False)
    return learner.classifier


__all__ = [
    "CanonicalEmbedder",
    "FEATURES",
    "POSITIVE_PAIRS",
    "RECON_LAYERS",
    "VARIANTS",
    "ViewNormalizingGAN",
    "build_discriminator",
    "build_fggan",
    "build_generator",
    "build_normalizer",
    "default_depth",
    "make_pairs",
    "pretrain_generator",
    "pretrain_semantic",
    "receptive_field",
    "reconstruction_loss",
]
