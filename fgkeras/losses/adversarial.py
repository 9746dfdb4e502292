"""The losses of adversarial hard triplet generation (HTG, Sec. 3, eqs. 2 and 4–8).

The players are an embedder F, a feature-space generator G and a (K+1)-class
discriminator D. With d the squared distance between L2-normalised vectors and m the margin:

    L_G,tri  = [d(G(a), G(n)) - d(G(a), G(p)) + m]_+                   (2)  G's triplet loss
    L_F,tri  = [d(G(a), G(p)) - d(G(a), G(n)) + m]_+                   (3)  eq. (1) on G's output
    L_D      = L_D,real + β L_D,fake                                   (4)
    L_D,real = softmax loss of D(F(x)) against the identity of x       (5)  over a, p and n
    L_D,fake = softmax loss of D(G(F(x))) against the fake class K     (6)
    L_G,cls  = softmax loss of D(G(F(x))) against the identity of x    (7)
    L_G      = L_G,tri + γ L_G,cls                                     (8)

Eq. (3) is `fgkeras.losses.triplet_loss` applied to generated features. The softmax losses
take labels of any shape `(...)` with logits `(..., K+1)`, e.g. `(batch, 3)` labels of the
anchor, positive and negative of each triplet, and average over every element: the 1/3
(·a + ·p + ·n) of eqs. (5)–(7) averaged over the batch. D's last logit is the fake class.
Computation is in float32 whatever the input dtype.
"""

import numbers

import keras
from keras import ops

from fgkeras.losses.softmax import softmax_cross_entropy
from fgkeras.losses.triplet import _check_margin
from fgkeras.losses.triplet import _triplet_vector


def _check_non_negative(name, value):
    if isinstance(value, numbers.Real) and value < 0:
        raise ValueError(f"`{name}` must be >= 0. Received: {name}={value}")


def _flat_logits(logits):
    logits = ops.cast(logits, "float32")
    return ops.reshape(logits, (-1, ops.shape(logits)[-1]))


def adversarial_triplet_loss(anchor, positive, negative, margin=0.1):
    """G's triplet loss, eq. (2): mean of [d(a, n) - d(a, p) + margin]_+.

    The mirror image of eq. (1): minimising it pulls the negative towards the anchor and
    pushes the positive away until the triplet violates the margin by m.

    Args:
        anchor, positive, negative: (batch, dim) features (generated ones in HTG);
            each L2-normalised here.
        margin: the margin m, > 0.
    Returns: scalar float32 loss.
    """
    _check_margin(margin)
    return ops.mean(_triplet_vector(anchor, negative, positive, margin))


def identity_loss(labels, logits):
    """Softmax loss of (K+1)-class logits against identities in [0, K): eqs. (5) and (7).

    On D's logits for real features it is L_D,real (5); for generated features, G's
    label-preserving loss L_G,cls (7).

    Args:
        labels: (...) integer identities in [0, K).
        logits: (..., K+1) discriminator logits.
    Returns: scalar float32 loss, the mean over all elements of `labels`.
    """
    return softmax_cross_entropy(ops.reshape(labels, (-1,)), _flat_logits(logits))


def fake_loss(logits):
    """Softmax loss of (K+1)-class logits against the fake class K (the last one): eq. (6).

    Args:
        logits: (..., K+1) discriminator logits for generated features.
    Returns: scalar float32 loss.
    """
    flat = _flat_logits(logits)
    fake_labels = ops.full((ops.shape(flat)[0],), ops.shape(flat)[-1] - 1, dtype="int32")
    return softmax_cross_entropy(fake_labels, flat)


def discriminator_loss(labels, real_logits, fake_logits, beta=1.0):
    """D's loss, eq. (4): L_D,real (5) + β L_D,fake (6).

    Args:
        labels: (...) integer identities in [0, K) of the real features.
        real_logits: (..., K+1) D's logits for the real features.
        fake_logits: (..., K+1) D's logits for the generated features.
        beta: β, the weight of the fake-class term, >= 0.
    Returns: scalar float32 loss.
    """
    _check_non_negative("beta", beta)
    return identity_loss(labels, real_logits) + beta * fake_loss(fake_logits)


def generator_loss(labels, anchor, positive, negative, fake_logits, margin=0.1, gamma=1.0):
    """G's loss, eq. (8): L_G,tri (2) + γ L_G,cls (7).

    Args:
        labels: (batch, 3) identities of the anchor, positive and negative.
        anchor, positive, negative: (batch, dim) generated features G(F(·)).
        fake_logits: (batch, 3, K+1) D's logits for the generated anchor, positive, negative.
        margin: the margin m, > 0.
        gamma: γ, the weight of the label-preserving term, >= 0.
    Returns: scalar float32 loss.
    """
    _check_non_negative("gamma", gamma)
    return (adversarial_triplet_loss(anchor, positive, negative, margin=margin)
            + gamma * identity_loss(labels, fake_logits))


@keras.saving.register_keras_serializable(package="fgkeras")
class AdversarialTripletLoss(keras.losses.Loss):
    """`adversarial_triplet_loss` (eq. 2) as a Keras loss for a model that outputs triplets.

    Args:
        margin: the margin m, > 0.
    y_true: ignored (pass any (batch,) array). y_pred: (batch, 3, dim) = [anchor, positive,
    negative] along axis 1. Output: scalar (per-triplet vector before reduction).
    """

    def __init__(self, margin=0.1, name="adversarial_triplet_loss", **kwargs):
        super().__init__(name=name, **kwargs)
        _check_margin(margin)
        self.margin = margin

    def call(self, y_true, y_pred):
        return _triplet_vector(y_pred[:, 0], y_pred[:, 2], y_pred[:, 1], self.margin)

    def get_config(self):
        return {**super().get_config(), "margin": self.margin}
