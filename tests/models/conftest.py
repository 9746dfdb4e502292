import keras
import pytest

from fgkeras.models import Embedder


@pytest.fixture(scope="session")
def tiny_embedder():
    """A factory of small, seeded, built `Embedder`s on (16, 16, 3) images.

    The backbone has no batch norm, so per-replica statistics cannot differ in the
    distribution tests (the embedder's own feature batch norm is synchronised across replicas).
    Call it as `tiny_embedder(seed=0, embedding_dim=8)`.
    """

    def make(seed=0, embedding_dim=8):
        keras.utils.set_random_seed(seed)
        backbone = keras.Sequential([
            keras.Input((16, 16, 3)),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
            keras.layers.Conv2D(8, 3, strides=2, activation="relu"),
        ], name="tiny")
        embedder = Embedder(backbone, embedding_dim=embedding_dim)
        embedder.build((None, 16, 16, 3))
        return embedder

    return make
