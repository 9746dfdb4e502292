"""The retrieval embedder: backbone → pooling → embedding → L2 normalisation."""

import keras
from keras import ops

from fgkeras import layers as fg_layers
from fgkeras.models.backbones import build_backbone

# ImageNet statistics in the 0–255 range: the convention of keras-hub's image converters,
# so pretrained presets see the inputs they were trained on.
IMAGENET_MEAN = (0.485 * 255, 0.456 * 255, 0.406 * 255)
IMAGENET_STD = (0.229 * 255, 0.224 * 255, 0.225 * 255)

POOLINGS = {
    "gap": keras.layers.GlobalAveragePooling2D,
    "mac": fg_layers.MACPooling2D,
    "spoc": fg_layers.SPoCPooling2D,
    "gem": fg_layers.GeMPooling2D,
}


@keras.saving.register_keras_serializable(package="fgkeras")
class Embedder(keras.Model):
    """Maps images to L2-normalised embeddings for retrieval.

    The network is backbone → global pooling → `Dense(embedding_dim)` →
    `BatchNormalization` (the *feature*, on which classifier heads act) →
    `L2Normalize` (the *embedding*, on which distances are measured), as in the
    basic model of HTG (Fig. 3). The batch norm centres the features before they
    are projected on the sphere: without it, a randomly initialised network puts
    every image in one narrow cone and a triplet loss trained from scratch
    collapses to a single point (measured: loss stuck at the margin, Recall@1 at
    chance).

    Args:
        backbone: a Keras model mapping normalised images to a feature map
            `(batch, h, w, C)`, e.g. from `fgkeras.models.build_backbone`.
        embedding_dim: size L of the embedding.
        pooling: "gap" (global average), "mac", "spoc" or "gem".
        dropout: dropout rate before the embedding layer.

    Input: `(batch, H, W, 3)` images with values in [0, 255] (uint8 or float).
    Output: `(batch, embedding_dim)` float32 unit vectors.
    """

    def __init__(self, backbone, embedding_dim=128, pooling="gap", dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if embedding_dim < 1:
            raise ValueError(f"`embedding_dim` must be >= 1. Received: embedding_dim={embedding_dim}")
        if pooling not in POOLINGS:
            raise ValueError(f"`pooling` must be one of {sorted(POOLINGS)}. Received: pooling={pooling!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"`dropout` must be in [0, 1). Received: dropout={dropout}")
        self.backbone = backbone
        self.embedding_dim = embedding_dim
        self.pooling = pooling
        self.dropout = dropout
        self.normalize_input = keras.layers.Normalization(
            mean=IMAGENET_MEAN, variance=[s**2 for s in IMAGENET_STD], name="normalize_input"
        )
        self.pool = POOLINGS[pooling](name="pool")
        self.drop = keras.layers.Dropout(dropout, name="dropout")
        self.embedding = keras.layers.Dense(embedding_dim, name="embedding")
        # Synchronised: under tf.distribute the moments are those of the global batch.
        self.embedding_bn = keras.layers.BatchNormalization(synchronized=True, name="embedding_bn")
        self.l2_normalize = fg_layers.L2Normalize(name="l2_normalize")

    def build(self, input_shape):
        self._build_global_head(input_shape, self.embedding_dim)
        self.l2_normalize.build((input_shape[0], self.embedding_dim))
        self.built = True

    def _build_global_head(self, input_shape, dim):
        """Builds the layers from the input to the `dim`-wide global feature."""
        self.normalize_input.build(input_shape)
        self.backbone.build(input_shape)
        feature_map_shape = self.backbone.compute_output_shape(input_shape)
        self.pool.build(feature_map_shape)
        pooled_shape = self.pool.compute_output_shape(feature_map_shape)
        self.drop.build(pooled_shape)
        self.embedding.build(pooled_shape)
        self.embedding_bn.build((input_shape[0], dim))

    def features(self, images, training=False):
        """The embedding before normalisation, `(batch, embedding_dim)` float32."""
        x = self.normalize_input(ops.cast(images, "float32"))
        x = self.backbone(x, training=training)
        x = self.pool(x)
        x = self.drop(x, training=training)
        x = self.embedding_bn(self.embedding(x), training=training)
        return ops.cast(x, "float32")

    def normalize(self, features):
        """L2-normalises features: the last step of `call`."""
        return self.l2_normalize(features)

    def call(self, images, training=False):
        return self.normalize(self.features(images, training=training))

    def compute_output_shape(self, input_shape):
        return (input_shape[0], self.embedding_dim)

    def get_config(self):
        return {
            **super().get_config(),
            "backbone": keras.saving.serialize_keras_object(self.backbone),
            "embedding_dim": self.embedding_dim,
            "pooling": self.pooling,
            "dropout": self.dropout,
        }

    @classmethod
    def from_config(cls, config):
        config = dict(config)
        config["backbone"] = keras.saving.deserialize_keras_object(config["backbone"])
        return cls(**config)


def build_embedder(backbone="resnet18", width=1.0, embedding_dim=128, pooling="gap",
                   image_size=None, preset=None, dropout=0.0):
    """Builds an `Embedder` on a named backbone (see `fgkeras.models.build_backbone`)."""
    net = build_backbone(backbone, width=width, image_size=image_size, preset=preset)
    embedder = Embedder(net, embedding_dim=embedding_dim, pooling=pooling, dropout=dropout, name="embedder")
    embedder.build((None, image_size, image_size, 3))
    return embedder
