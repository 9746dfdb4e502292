"""HTG: adversarial hard triplet generation (Zhao et al., ECCV 2018).

Three players, each stepped on every batch (Sec. 3.3 and 4.2):

- the embedder F (`Embedder`, or `KeypointEmbedder` with the KPM local branch of Sec. 4.3)
  minimises L_F = L_F,tri + μ L_D,real (eq. 9): the triplet loss on the triplets G made
  hard, and D's classification of its real features;
- the discriminator D, (K+1)-class (K identities + "generated"), minimises
  L_D = L_D,real + β L_D,fake (eq. 4);
- the generator G, a residual MLP in feature space, minimises L_G = L_G,tri + γ L_G,cls
  (eq. 8): it moves the anchor, positive and negative features so as to break the margin,
  while D still recognises their identity.

The paper's recipe, `train_htg`, first trains the basic model (no-bias softmax + triplet
loss on random triplets, `build_baseline("basic")`), adds the KPM branch if asked (its
keypoint blocks copied from the trained backbone stages they mirror), then plays the game
with learning rate 1e-3.

Design decisions where the paper is silent:

- Triplets: every image of the P×K batch is an anchor, with a uniformly random positive and
  negative of the batch ("random", the default). The paper gives G random triplets to make
  hard: HTG is the alternative to mining (Sec. 4.2, Table 1). "batch_hard" (farthest
  positive, nearest negative in F's current feature space) is available as an ablation.
- G's last layer is FC + BN without ReLU, and that BN's γ starts at 0: with a ReLU every
  offset component would be >= 0 and G could only move features towards one orthant; with γ
  = 0, G starts as the identity, so the adversarial phase starts exactly where the basic
  model ended (L_F,tri = eq. 1 at the first step).
- One forward pass per step: F, then G and D once each, in training mode; each player's
  gradient is taken from that pass, on its own loss and its own variables only (F's through
  G and D, held fixed; D's and G's with F's features as they are), then the three players
  step. So every player steps from the same state of the others (simultaneous steps), and
  every batch norm of F, G and D moves its statistics once per step. The paper's "step by
  step" order could also be read as alternating (G stepping against the D of this step):
  that needs a second training-mode pass of D (and of G for its own gradient), whose
  moving statistics would then move twice per step on one batch; with one pass, G sees D
  one step behind, as in most GAN implementations that update simultaneously.
- D always sees the real and the generated features in one batch, so that its batch
  normalisation cannot normalise away a shift between the two.
- KPM keypoint blocks (Sec. 4.3): a copy of the whole backbone stage they mirror (the same
  depth: two basic blocks in ResNet-18), with the stage's weights, minus the stage's last
  ReLU (the spatial softmax needs logits that can be negative). `train_htg` adds the branch
  after the basic model, so the copies start from the trained stages, the paper's copy of
  the pretrained ResNet-18 blocks when training starts from scratch.
- Under `tf.distribute`, the game is played on the global batch: F runs on each replica's
  shard, its features and labels are all-gathered (differentiably), and every replica forms
  the same triplets and runs the small G and D on the whole global batch. Triplet formation
  and the batch statistics of G and D are therefore those of one device on the same global
  batch, and losses divided by the number of replicas give the same update. F's feature
  batch norms (`embedding_bn`, `local_bn`) are synchronised; the batch norms inside the
  backbone and the keypoint blocks see their replica's shard, as in any distributed CNN.
"""

import logging
import os
import shutil

import keras
import tensorflow as tf
from keras import ops

from fgkeras import _files
from fgkeras import layers as fg_layers
from fgkeras import losses as fg_losses
from fgkeras.losses.triplet import pair_masks
from fgkeras.models.backbones import feature_maps
from fgkeras.models.baselines import build_baseline
from fgkeras.models.embedder import Embedder
from fgkeras.models.resume import fit_resumable
from fgkeras.models.training import BuiltBeforeFit, make_optimizer, replica_scaled, unpack_batch

logger = logging.getLogger(__name__)

KPM_LEVELS = ("P4", "P5")  # ResNet blocks 3 and 4 in the paper's numbering (Sec. 4.3)
TRIPLET_SAMPLINGS = ("random", "batch_hard")
WARMUP_TRIPLETS = ("random", "batch_hard")  # the basic model's triplets (`train_htg`)


def _before_activation(tensor):
    """The input of the activation layer that produced `tensor`, or `tensor` if none did."""
    operation, node_index, _ = tensor._keras_history
    if isinstance(operation, (keras.layers.Activation, keras.layers.ReLU)):
        return operation._inbound_nodes[node_index].input_tensors[0]
    return tensor


@keras.saving.register_keras_serializable(package="fgkeras")
class KeypointEmbedder(Embedder):
    """An `Embedder` with the keypoint-map (KPM) local branch of HTG (Sec. 4.3).

    For each level l in `levels`, a keypoint block reads the input X^(l-1) of the backbone
    stage of that level and gives keypoint maps M^l with the shape of the stage's output
    X^l, softmax-normalised over space per channel (eq. 11). The local feature is
    f^l_c = Σ_ij X^l_cij M^l_cij. The output feature is f_out = [f_global; f^l ...], with
    f_global the `Dense(global_dim)` + BN of `Embedder`; the local features pass one batch
    normalisation (`local_bn`, synchronised like `embedding_bn`; not in the paper) so that
    they enter the L2-normalised embedding on the scale of f_global rather than as
    all-positive sums of ReLU activations.

    The keypoint block of a level is a copy of the backbone stage it mirrors, the whole
    stage (two basic blocks in ResNet-18), with the stage's weights at construction time
    (the paper initialises the keypoint blocks "with the same weights as the ResNet-18
    convolution blocks", Sec. 5): `from_embedder` on a trained embedder copies the trained
    stage. The copy has its own weights (the stage stays shared with the global branch) and
    ends before the stage's last activation: the softmax needs logits that can be negative,
    and a ReLU would map every inactive position to the same value.

    Args:
        backbone: a keras-hub backbone with `pyramid_outputs` ("P2" … "P5").
        global_dim: size of the global feature f_global.
        pooling, dropout: as in `Embedder` (for the global feature).
        levels: pyramid levels that get a keypoint block; each needs the level before it.
            The paper's blocks 3 and 4 of ResNet-18 are "P4" and "P5".
        temperature: softmax temperature of the keypoint maps, > 0.

    `embedding_dim` is the size L of the output, global_dim + the channels of the levels.
    Input: `(batch, H, W, 3)` images in [0, 255]. Output: `(batch, embedding_dim)` unit vectors.
    """

    def __init__(self, backbone, global_dim=128, pooling="gap", dropout=0.0, levels=KPM_LEVELS,
                 temperature=1.0, **kwargs):
        if global_dim < 1:
            raise ValueError(f"`global_dim` must be >= 1. Received: global_dim={global_dim}")
        super().__init__(backbone, embedding_dim=global_dim, pooling=pooling, dropout=dropout, **kwargs)
        if not getattr(backbone, "pyramid_outputs", None):
            raise ValueError(
                "KPM needs a backbone with pyramid outputs (a keras-hub backbone such as ResNet). "
                f"Received: backbone {backbone.name!r} without `pyramid_outputs`"
            )
        pyramid = feature_maps(backbone)
        names = sorted(pyramid)
        levels = list(levels) if not isinstance(levels, str) else [levels]
        if not levels or len(set(levels)) != len(levels) or any(level not in names[1:] for level in levels):
            raise ValueError(
                "`levels` must be distinct pyramid levels of the backbone that follow another "
                f"level (the keypoint block of a level reads the level before it): some of {names[1:]}. "
                f"Received: levels={levels}"
            )
        self.global_dim = global_dim
        self.levels = levels
        self.temperature = temperature
        self._previous = {level: names[names.index(level) - 1] for level in levels}
        self.pyramid = keras.Model(
            backbone.inputs,
            {"output": backbone.outputs[0],
             **{name: pyramid[name] for name in (*levels, *self._previous.values())}},
            name="pyramid",
        )
        self.keypoint_blocks = []
        for level in levels:
            stage = self.stage(level)
            block = keras.models.clone_model(stage)
            block.set_weights(stage.get_weights())
            self.keypoint_blocks.append(block)
        self.keypoint_map = fg_layers.KeypointMap(temperature, name="keypoint_map")
        self.local_dim = sum(int(pyramid[level].shape[-1]) for level in levels)
        self.local_bn = keras.layers.BatchNormalization(synchronized=True, name="local_bn")
        self.embedding_dim = global_dim + self.local_dim

    def stage(self, level):
        """The backbone's stage of `level` that a keypoint block mirrors: a model
        X^(l-1) → X^l before the stage's last activation, on the backbone's own layers."""
        pyramid = feature_maps(self.backbone)
        return keras.Model(pyramid[self._previous[level]], _before_activation(pyramid[level]),
                           name=f"keypoint_block_{level}")

    @classmethod
    def from_embedder(cls, embedder, levels=KPM_LEVELS, temperature=1.0):
        """Adds the KPM branch to an `Embedder`: same backbone (shared), head weights copied,
        each keypoint block a copy of its stage as the embedder has it now (trained or not)."""
        kpm = cls(embedder.backbone, global_dim=embedder.embedding_dim, pooling=embedder.pooling,
                  dropout=embedder.dropout, levels=levels, temperature=temperature, name=embedder.name)
        if embedder.built:
            kpm.build(tuple(embedder.backbone.input_shape))
            for name in ("embedding", "embedding_bn"):
                getattr(kpm, name).set_weights(getattr(embedder, name).get_weights())
        return kpm

    def build(self, input_shape):
        self._build_global_head(input_shape, self.global_dim)
        self.local_bn.build((input_shape[0], self.local_dim))
        self.l2_normalize.build((input_shape[0], self.embedding_dim))
        self.built = True

    def _maps(self, images, training):
        """(backbone feature maps by name, keypoint maps by level)."""
        x = self.normalize_input(ops.cast(images, "float32"))
        maps = self.pyramid(x, training=training)
        keypoints = {
            level: self.keypoint_map(block(maps[self._previous[level]], training=training))
            for level, block in zip(self.levels, self.keypoint_blocks)
        }
        return maps, keypoints

    def features(self, images, training=False):
        """[f_global; f^l ...] before normalisation, `(batch, embedding_dim)` float32."""
        maps, keypoints = self._maps(images, training)
        x = self.drop(self.pool(maps["output"]), training=training)
        global_feature = ops.cast(self.embedding_bn(self.embedding(x), training=training), "float32")
        local = ops.concatenate(
            [ops.sum(ops.cast(maps[level], "float32") * ops.cast(keypoints[level], "float32"), axis=(1, 2))
             for level in self.levels],
            axis=-1,
        )
        local = ops.cast(self.local_bn(local, training=training), "float32")
        return ops.concatenate([global_feature, local], axis=-1)

    def keypoint_maps(self, images):
        """The keypoint maps M^l, `{level: (batch, h_l, w_l, C_l)}` float32, each summing to 1
        over space per channel (inference mode)."""
        _, keypoints = self._maps(images, training=False)
        return {level: ops.cast(m, "float32") for level, m in keypoints.items()}

    def get_config(self):
        config = super().get_config()
        config.pop("embedding_dim")
        return {**config, "global_dim": self.global_dim, "levels": list(self.levels),
                "temperature": self.temperature}


def build_generator(dim, name="generator"):
    """G (Sec. 4.2, Fig. 4): a residual MLP in feature space, `G(f) = f + offset(f)`.

    Four FC layers, each followed by batch normalisation: L → L/2 → L/2 (the bottleneck)
    → L → L, with ReLU after the first three. The last one has no ReLU, so the offset
    can point anywhere, and its BN scale γ starts at 0, so G starts as the identity.

    Args:
        dim: the feature size L, >= 2.
    Input: (batch, L). Output: (batch, L).
    """
    if dim < 2:
        raise ValueError(f"`dim` must be >= 2 (G halves it). Received: dim={dim}")
    inputs = keras.Input((dim,), name="features")
    x = inputs
    widths = (dim // 2, dim // 2, dim, dim)
    for i, width in enumerate(widths, start=1):
        last = i == len(widths)
        x = keras.layers.Dense(width, use_bias=False, name=f"fc{i}")(x)
        x = keras.layers.BatchNormalization(gamma_initializer="zeros" if last else "ones", name=f"bn{i}")(x)
        if not last:
            x = keras.layers.ReLU(name=f"relu{i}")(x)
    outputs = keras.layers.Add(name="offset")([inputs, x])
    return keras.Model(inputs, outputs, name=name)


def build_discriminator(dim, num_classes, hidden_dim=None, name="discriminator"):
    """D (Sec. 4.2, Fig. 4): a (K+1)-class MLP on features.

    Three FC layers of `hidden_dim` units, each with batch normalisation and ReLU, then a
    no-bias FC layer to K + 1 logits (the K identities, then the fake class).

    Args:
        dim: the feature size L.
        num_classes: K, the number of identities, >= 1.
        hidden_dim: width of the hidden layers; L by default.
    Input: (batch, L). Output: (batch, K + 1) logits.
    """
    if num_classes < 1:
        raise ValueError(f"`num_classes` must be >= 1. Received: num_classes={num_classes}")
    hidden_dim = hidden_dim or dim
    inputs = keras.Input((dim,), name="features")
    x = inputs
    for i in range(1, 4):
        x = keras.layers.Dense(hidden_dim, use_bias=False, name=f"fc{i}")(x)
        x = keras.layers.BatchNormalization(name=f"bn{i}")(x)
        x = keras.layers.ReLU(name=f"relu{i}")(x)
    outputs = fg_layers.NoBiasDense(num_classes + 1, name="logits")(x)
    return keras.Model(inputs, outputs, name=name)


def form_triplets(labels, features=None, sampling="random", seed=None):
    """One (anchor, positive, negative) triplet of batch indices per image of the batch.

    Args:
        labels: (batch,) integer labels.
        features: (batch, dim) features, needed by "batch_hard" (no gradient flows).
        sampling: "random": a uniformly random positive (same label, not the anchor) and
            negative (another label); "batch_hard": the farthest positive and the nearest
            negative in L2-normalised feature space.
        seed: a `keras.random.SeedGenerator`, an int or None (for "random").

    An anchor without any positive in the batch is its own positive; without any negative,
    its own negative (its triplet then only constrains the other pair).
    Returns: (batch, 3) int32 indices.
    """
    labels = ops.reshape(ops.cast(labels, "int32"), (-1,))
    batch = ops.shape(labels)[0]
    index = ops.arange(batch, dtype="int32")
    positives, negatives = pair_masks(labels)
    if sampling == "random":
        noise = keras.random.uniform((2, batch, batch), seed=seed)
        positive_score, negative_score = noise[0], noise[1]
    elif sampling == "batch_hard":
        normalized = ops.normalize(ops.stop_gradient(ops.cast(features, "float32")), axis=-1)
        distances = fg_losses.pairwise_squared_distances(normalized)
        positive_score, negative_score = distances, -distances
    else:
        raise ValueError(f"`sampling` must be one of {TRIPLET_SAMPLINGS}. Received: sampling={sampling!r}")

    def choose(mask, score):
        chosen = ops.cast(ops.argmax(ops.where(mask, score, float("-inf")), axis=1), "int32")
        return ops.where(ops.any(mask, axis=1), chosen, index)

    return ops.stack([index, choose(positives, positive_score), choose(negatives, negative_score)], axis=1)


def _gather(x):
    """The global batch: every replica's rows of `x` in replica order (differentiable)."""
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync == 1:
        return x
    return context.all_gather(x, axis=0)


def _feature_dims(model, name):
    try:
        return model.input_shape[-1], model.output_shape[-1]
    except (AttributeError, ValueError) as error:
        raise ValueError(
            f"`{name}` must be a built Keras model with one (batch, dim) input and one output, "
            f"e.g. from `build_{name}`. Received: {model!r}"
        ) from error


@keras.saving.register_keras_serializable(package="fgkeras")
class HardTripletGAN(BuiltBeforeFit):
    """The HTG game: embedder F, generator G and (K+1)-class discriminator D, trained by `fit`.

    Calling the model returns F's embeddings, so `predict` and the evaluation helpers work
    on it; `model.embedder` is the retrieval embedder to export.

    Args:
        embedder: F, an `Embedder` (or `KeypointEmbedder`) of output size L.
        generator: G, a model (batch, L) → (batch, L), e.g. `build_generator(L)`.
        discriminator: D, a model (batch, L) → (batch, K + 1), e.g. `build_discriminator(L, K)`.
        num_classes: K, the number of training identities, >= 2.
        margin: the triplet margin m, > 0 (0.1 in the paper).
        mu: μ, weight of D's real classification loss in F's loss (eq. 9), >= 0.
        beta: β, weight of D's fake-class loss (eq. 4), >= 0.
        gamma: γ, weight of G's label-preserving loss (eq. 8), >= 0.
        triplets: how each anchor gets its positive and negative, "random" (the paper) or
            "batch_hard" (see `form_triplets`).
        seed: seed of the random triplet sampling.

    Batches are P×K class-balanced (K >= 2 images per class), as dicts with `image` and
    `label` or `(images, labels)` tuples; labels in [0, num_classes).
    """

    def __init__(self, embedder, generator, discriminator, num_classes, margin=0.1, mu=1.0, beta=1.0,
                 gamma=1.0, triplets="random", seed=None, **kwargs):
        super().__init__(**kwargs)
        if num_classes is None or num_classes < 2:
            raise ValueError(f"`num_classes` (K) must be >= 2. Received: num_classes={num_classes}")
        if margin <= 0:
            raise ValueError(f"`margin` must be > 0. Received: margin={margin}")
        for weight, value in (("mu", mu), ("beta", beta), ("gamma", gamma)):
            if value < 0:
                raise ValueError(f"`{weight}` must be >= 0. Received: {weight}={value}")
        if triplets not in TRIPLET_SAMPLINGS:
            raise ValueError(f"`triplets` must be one of {TRIPLET_SAMPLINGS}. Received: triplets={triplets!r}")
        dim = embedder.embedding_dim
        g_in, g_out = _feature_dims(generator, "generator")
        if (g_in, g_out) != (dim, dim):
            raise ValueError(
                f"The generator must map the embedder's {dim}-d features to {dim}-d features. "
                f"Received: a generator from {g_in}-d to {g_out}-d"
            )
        d_in, d_out = _feature_dims(discriminator, "discriminator")
        if d_in != dim:
            raise ValueError(f"The discriminator must take the embedder's {dim}-d features. Received: {d_in}-d")
        if d_out != num_classes + 1:
            raise ValueError(
                f"The discriminator must output K + 1 = {num_classes + 1} logits (K = num_classes "
                f"identities + 'generated'). Received: {d_out} logits with num_classes={num_classes}"
            )
        self.embedder = embedder
        self.generator = generator
        self.discriminator = discriminator
        self.num_classes = num_classes
        self.margin = margin
        self.mu = mu
        self.beta = beta
        self.gamma = gamma
        self.triplets = triplets
        self.seed = seed
        self.seed_generator = keras.random.SeedGenerator(seed)
        self.g_optimizer = None
        self.d_optimizer = None
        self.f_loss_tracker = keras.metrics.Mean(name="f_loss")
        self.g_loss_tracker = keras.metrics.Mean(name="g_loss")
        self.d_loss_tracker = keras.metrics.Mean(name="d_loss")
        if embedder.built:
            self.built = True

    def build(self, input_shape):
        if not self.embedder.built:
            self.embedder.build(input_shape)
        self.built = True

    @property
    def f_optimizer(self):
        """F's optimizer: `model.optimizer`, so callbacks that act on it act on F."""
        return self.optimizer

    def compile(self, f_optimizer="adam", g_optimizer="adam", d_optimizer="adam", **kwargs):
        """Compiles with one optimizer per player and builds each on its player's variables.

        An optimizer built lazily inside the first distributed step fails under
        `MirroredStrategy`, so all three are built here (F's once its embedder is built).
        """
        optimizers = [keras.optimizers.get(o) for o in (f_optimizer, g_optimizer, d_optimizer)]
        if len({id(o) for o in optimizers}) < 3:
            raise ValueError("Each player needs its own optimizer instance: F, G and D got a shared one.")
        super().compile(optimizer=optimizers[0], **kwargs)
        self.g_optimizer, self.d_optimizer = optimizers[1:]
        if self.embedder.built:
            self.built = True
            self.f_optimizer.build(self.embedder.trainable_variables)
        self.g_optimizer.build(self.generator.trainable_variables)
        self.d_optimizer.build(self.discriminator.trainable_variables)

    def get_compile_config(self):
        if not self.compiled:
            return {}
        return {name: keras.saving.serialize_keras_object(getattr(self, name))
                for name in ("f_optimizer", "g_optimizer", "d_optimizer")}

    def compile_from_config(self, config):
        """Restores the compiled state of a saved game (the three optimizers)."""
        self.compile(**{name: keras.saving.deserialize_keras_object(value) for name, value in config.items()})

    @property
    def metrics(self):
        return [self.f_loss_tracker, self.g_loss_tracker, self.d_loss_tracker]

    def call(self, images, training=False):
        return self.embedder(images, training=training)

    def _play(self, features, labels, triplets, training=True):
        """G and D, once each, on a batch of real features, taken per triplet.

        Returns a dict of `real` and `generated` features (batch, 3, L), D's `real_logits` and
        `fake_logits` (batch, 3, K+1) and the `labels` (batch, 3): anchor, positive, negative
        on axis 1.
        """
        generated = self.generator(features, training=training)
        logits = ops.cast(self.discriminator(ops.concatenate([features, generated], axis=0),
                                             training=training), "float32")
        batch = ops.shape(features)[0]
        play = {"real": features, "generated": generated, "real_logits": logits[:batch],
                "fake_logits": logits[batch:], "labels": labels}
        return {name: ops.take(x, triplets, axis=0) for name, x in play.items()}

    def _embedder_loss(self, play):
        """L_F = L_F,tri (3) + μ L_D,real (5): eq. (9)."""
        generated = play["generated"]
        loss = (fg_losses.triplet_loss(generated[:, 0], generated[:, 1], generated[:, 2], margin=self.margin)
                + self.mu * fg_losses.identity_loss(play["labels"], play["real_logits"]))
        if self.embedder.losses:
            loss = loss + ops.sum(ops.stack([ops.cast(x, "float32") for x in self.embedder.losses]))
        return loss

    def _discriminator_loss(self, play):
        """L_D = L_D,real (5) + β L_D,fake (6): eq. (4)."""
        return fg_losses.discriminator_loss(play["labels"], play["real_logits"], play["fake_logits"],
                                            beta=self.beta)

    def _generator_loss(self, play):
        """L_G = L_G,tri (2) + γ L_G,cls (7): eq. (8)."""
        generated = play["generated"]
        return fg_losses.generator_loss(play["labels"], generated[:, 0], generated[:, 1], generated[:, 2],
                                        play["fake_logits"], margin=self.margin, gamma=self.gamma)

    def _triplets(self, labels, features):
        return form_triplets(labels, features, sampling=self.triplets, seed=self.seed_generator)

    def _forward(self, images, labels, training):
        """F on the images, the triplets, then G and D once: `_play` of the global batch."""
        labels = _gather(ops.reshape(ops.cast(labels, "int32"), (-1,)))
        features = _gather(self.embedder.features(images, training=training))
        return self._play(features, labels, self._triplets(labels, features), training)

    @staticmethod
    def _scaled(optimizer, loss):
        """The loss to differentiate (inside the tape): per replica, and loss-scaled if mixed."""
        return optimizer.scale_loss(replica_scaled(loss))

    @staticmethod
    def _update(optimizer, tape, scaled_loss, variables):
        """One step of `optimizer` on `variables` along the gradient of `scaled_loss`."""
        optimizer.apply(tape.gradient(scaled_loss, variables), variables)

    def _track(self, f_loss, g_loss, d_loss):
        self.f_loss_tracker.update_state(f_loss)
        self.g_loss_tracker.update_state(g_loss)
        self.d_loss_tracker.update_state(d_loss)
        return {m.name: m.result() for m in self.metrics}

    def train_step(self, data):
        """One forward pass of F, G and D, then one step of each player on its own loss."""
        images, labels = unpack_batch(data)
        with tf.GradientTape(persistent=True) as tape:
            play = self._forward(images, labels, training=True)
            f_loss, d_loss, g_loss = (self._embedder_loss(play), self._discriminator_loss(play),
                                      self._generator_loss(play))
            f_scaled = self._scaled(self.f_optimizer, f_loss)
            d_scaled = self._scaled(self.d_optimizer, d_loss)
            g_scaled = self._scaled(self.g_optimizer, g_loss)
        self._update(self.f_optimizer, tape, f_scaled, self.embedder.trainable_variables)
        self._update(self.d_optimizer, tape, d_scaled, self.discriminator.trainable_variables)
        self._update(self.g_optimizer, tape, g_scaled, self.generator.trainable_variables)
        del tape
        return self._track(f_loss, g_loss, d_loss)

    def test_step(self, data):
        images, labels = unpack_batch(data)
        play = self._forward(images, labels, training=False)
        return self._track(self._embedder_loss(play), self._generator_loss(play), self._discriminator_loss(play))

    def get_config(self):
        return {
            **super().get_config(),
            "embedder": keras.saving.serialize_keras_object(self.embedder),
            "generator": keras.saving.serialize_keras_object(self.generator),
            "discriminator": keras.saving.serialize_keras_object(self.discriminator),
            "num_classes": self.num_classes,
            "margin": self.margin,
            "mu": self.mu,
            "beta": self.beta,
            "gamma": self.gamma,
            "triplets": self.triplets,
            "seed": self.seed,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        for name in ("embedder", "generator", "discriminator"):
            config[name] = keras.saving.deserialize_keras_object(config[name])
        return cls(**config)


def build_htg(embedder, num_classes, kpm=False, kpm_levels=KPM_LEVELS, temperature=1.0, hidden_dim=None,
              margin=0.1, mu=1.0, beta=1.0, gamma=1.0, triplets="random", seed=None, name="htg"):
    """The HTG game on an embedder, with G and D of the paper (Fig. 4).

    Args:
        embedder: F, an `Embedder`; with `kpm=True` and a plain `Embedder`, the KPM branch is
            added (`KeypointEmbedder.from_embedder`, sharing the backbone).
        num_classes: K, the number of training identities.
        kpm, kpm_levels, temperature: the keypoint-map branch (Sec. 4.3).
        hidden_dim: width of D's hidden layers (L by default).
        margin, mu, beta, gamma, triplets, seed: see `HardTripletGAN`.
    """
    if kpm and not isinstance(embedder, KeypointEmbedder):
        embedder = KeypointEmbedder.from_embedder(embedder, levels=kpm_levels, temperature=temperature)
    dim = embedder.embedding_dim
    return HardTripletGAN(
        embedder, build_generator(dim), build_discriminator(dim, num_classes, hidden_dim=hidden_dim),
        num_classes=num_classes, margin=margin, mu=mu, beta=beta, gamma=gamma, triplets=triplets,
        seed=seed, name=name,
    )


def step_decay(learning_rate, epochs, steps_per_epoch, decay_epochs=5):
    """The paper's schedule: `learning_rate` divided by 10 every `decay_epochs` epochs."""
    boundaries = [e * steps_per_epoch for e in range(decay_epochs, epochs, decay_epochs)]
    if not boundaries:
        return learning_rate
    values = [learning_rate / 10**i for i in range(len(boundaries) + 1)]
    return keras.optimizers.schedules.PiecewiseConstantDecay(boundaries, values)


def _schedule(learning_rate, epochs, steps_per_epoch, decay_epochs):
    """A `LearningRateSchedule` as given; a float gets the paper's step decay."""
    if isinstance(learning_rate, keras.optimizers.schedules.LearningRateSchedule):
        return learning_rate
    return step_decay(learning_rate, epochs, steps_per_epoch, decay_epochs)


def _optimizer(optimizer, learning_rate):
    """`optimizer(learning_rate)` for a callable, else `make_optimizer(optimizer, learning_rate)`."""
    return optimizer(learning_rate) if callable(optimizer) else make_optimizer(optimizer, learning_rate)


def train_htg(embedder, dataset, num_classes, warmup_epochs=15, epochs=10, steps_per_epoch=100, *,
              warmup_dataset=None, warmup_steps_per_epoch=None, warmup_learning_rate=1e-2,
              learning_rate=1e-3, decay_epochs=5, optimizer="sgd", warmup_triplets="random",
              kpm=False, kpm_levels=KPM_LEVELS, temperature=1.0, margin=0.1, mu=1.0, beta=1.0, gamma=1.0,
              triplets="random", seed=None, verbose="auto", callbacks=None, backup_dir="", backup_every_steps=0):
    """The paper's recipe (Sec. 5): the basic model first, then the adversarial game.

    1. Basic model (Sec. 4.1): F with no-bias softmax + λ·triplet on random triplets
       (`build_baseline("basic")`; the paper's basic model samples triplets "without
       considering their hardness", Sec. 4.2) for `warmup_epochs` at `warmup_learning_rate`
       (paper: batch 128, lr 0.01, 15 epochs). `warmup_triplets="batch_hard"` is the
       ablation with batch-hard triplets ("basic_batch_hard", OHEM in the warm-up).
    2. With `kpm=True`, the KPM branch is added to the trained basic model
       (`KeypointEmbedder.from_embedder`): each keypoint block starts as a copy of the trained
       backbone stage it mirrors (the paper copies ImageNet ResNet-18 blocks, Sec. 5).
    3. Adversarial training (Sec. 4.2): `HardTripletGAN` for `epochs` at `learning_rate`
       for each player (paper: batch 64, lr 1e-3, 10 epochs, μ = β = γ = 1).
    A learning rate given as a float is divided by 10 every `decay_epochs` epochs of its
    phase, as in the paper; a `keras.optimizers.schedules.LearningRateSchedule` is used as
    given (each phase's optimizer counts its steps from 0: see `ShiftedSchedule` to continue
    one schedule across both phases).

    Create the embedder (and call this function) inside `strategy.scope()` to train
    distributed. The batch size is that of the datasets.

    Args:
        embedder: F, an `Embedder` (the KPM branch is added after the basic model when
            `kpm=True`; a `KeypointEmbedder` is trained as it is in both phases).
        dataset: infinite P×K batches (e.g. `ImageSet.class_balanced_dataset`) for the game, or a
            function `start -> dataset` giving them from batch `start` (see `fit_resumable`).
        num_classes: K.
        warmup_dataset: batches for the basic model (or a function of `start`); `dataset` by default.
        warmup_steps_per_epoch: steps per warm-up epoch; `steps_per_epoch` by default.
        optimizer: "sgd" (momentum 0.9; the paper's mini-batch SGD), "adam", "adamw", or a
            callable `learning_rate -> keras.optimizers.Optimizer` (called once per player).
        warmup_triplets: the basic model's triplets, "random" (the paper) or "batch_hard".
        kpm, kpm_levels, temperature, margin, mu, beta, gamma, triplets, seed: see `build_htg`.
        verbose, callbacks: passed to both `fit` calls.
        backup_dir, backup_every_steps: a run killed at any point and called again with the same
            arguments resumes in the phase where it stopped, at its last checkpoint
            (`fgkeras.models.fit_resumable`): each phase checkpoints in its own folder,
            `<backup_dir>/warmup` and `<backup_dir>/game`, and a finished basic model is marked
            done by F's weights in `<backup_dir>/warmup.done.weights.h5` (written atomically, after
            the phase's model selection), so it is not trained again. `backup_dir` is removed
            when the game ends. "" (the default): no checkpoints.
    Returns: the trained `HardTripletGAN`; `model.embedder` is F, and `model.history` the
    History of the adversarial phase.
    """
    if warmup_triplets not in WARMUP_TRIPLETS:
        raise ValueError(
            f"`warmup_triplets` must be one of {WARMUP_TRIPLETS}. Received: warmup_triplets={warmup_triplets!r}"
        )
    phase_backup = (lambda phase: os.path.join(backup_dir, phase)) if backup_dir else (lambda phase: "")
    warmup_done = os.path.join(backup_dir, "warmup.done.weights.h5") if backup_dir else ""
    if warmup_epochs > 0:
        warmup_steps = warmup_steps_per_epoch or steps_per_epoch
        # Built even when the phase is done: the game's players then draw the same initial weights.
        basic = build_baseline("basic", embedder, num_classes=num_classes, margin=margin, seed=seed,
                               triplet=warmup_triplets)
        basic.compile(optimizer=_optimizer(
            optimizer, _schedule(warmup_learning_rate, warmup_epochs, warmup_steps, decay_epochs)))
        if warmup_done and os.path.exists(warmup_done):
            logger.info("HTG phase 1: done before (%s)", warmup_done)
            embedder.load_weights(warmup_done)
        else:
            logger.info("HTG phase 1: basic model, %d epochs", warmup_epochs)
            fit_resumable(basic, warmup_dataset if warmup_dataset is not None else dataset, epochs=warmup_epochs,
                          steps_per_epoch=warmup_steps, verbose=verbose, callbacks=callbacks,
                          backup_dir=phase_backup("warmup"), backup_every_steps=backup_every_steps)
            if warmup_done:
                _save_weights_atomically(embedder, warmup_done)
    game = build_htg(embedder, num_classes, kpm=kpm, kpm_levels=kpm_levels, temperature=temperature,
                     margin=margin, mu=mu, beta=beta, gamma=gamma, triplets=triplets, seed=seed)
    schedule = _schedule(learning_rate, epochs, steps_per_epoch, decay_epochs)
    game.compile(f_optimizer=_optimizer(optimizer, schedule), g_optimizer=_optimizer(optimizer, schedule),
                 d_optimizer=_optimizer(optimizer, schedule))
    logger.info("HTG phase 2: adversarial training, %d epochs", epochs)
    fit_resumable(game, dataset, epochs=epochs, steps_per_epoch=steps_per_epoch, verbose=verbose,
                  callbacks=callbacks, backup_dir=phase_backup("game"), backup_every_steps=backup_every_steps)
    if backup_dir:
        shutil.rmtree(backup_dir, ignore_errors=True)
    return game


def _save_weights_atomically(model, path):
    """`model.save_weights(path)` through a temporary file renamed into place: a kill leaves no part file."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    staging = os.path.join(os.path.dirname(path), f".staging-{os.path.basename(path)}")
    model.save_weights(staging)
    with open(staging, "rb") as f:
        os.fsync(f.fileno())
    os.replace(staging, path)
    _files.fsync_dir(os.path.dirname(path))


__all__ = [
    "HardTripletGAN",
    "KPM_LEVELS",
    "KeypointEmbedder",
    "TRIPLET_SAMPLINGS",
    "WARMUP_TRIPLETS",
    "build_discriminator",
    "build_generator",
    "build_htg",
    "form_triplets",
    "step_decay",
    "train_htg",
]
