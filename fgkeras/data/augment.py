"""Training-time image augmentation for tf.data pipelines (stateless, seeded)."""

import dataclasses

import tensorflow as tf

_INT32_MAX = 2**31 - 1


@dataclasses.dataclass(frozen=True)
class Augment:
    """Random flip, random resized crop and colour jitter on one uint8 (H, W, 3) image.

    Every draw is a stateless op keyed by the `seed` given to `__call__`, so the same seed
    gives the same image, inside tf.data and under `tf.distribute` alike. `ImageSet`
    pipelines pass a different seed per element.

    Args:
        flip: random horizontal flip. A flip turns a left view into a right view: switch it
            off (`flip=False`) for view-labelled data used by view-aware methods
            (FGGAN, ViewGAN), whose `view` labels it would silently falsify.
        crop_scale: `(min, max)` fraction of the image area kept by a random crop, which is
            then resized back to (H, W); None for no crop.
        crop_ratio: `(min, max)` width/height ratio of the crop.
        brightness: max delta added to intensities in [0, 1]; 0 disables.
        contrast: contrast factor drawn in [1 - contrast, 1 + contrast]; 0 disables.
        saturation: saturation factor drawn in [1 - saturation, 1 + saturation]; 0 disables.
        hue: max hue shift, in [0, 0.5]; 0 disables.
    Input: uint8 (H, W, 3). Output: uint8 (H, W, 3).
    """

    flip: bool = True
    crop_scale: tuple[float, float] | None = None
    crop_ratio: tuple[float, float] = (3 / 4, 4 / 3)
    brightness: float = 0.0
    contrast: float = 0.0
    saturation: float = 0.0
    hue: float = 0.0

    def __post_init__(self):
        if self.crop_scale is not None:
            low, high = _range("crop_scale", self.crop_scale)
            if not 0 < low <= high <= 1:
                raise ValueError(
                    f"`crop_scale` must satisfy 0 < min <= max <= 1. Received crop_scale={self.crop_scale}"
                )
            object.__setattr__(self, "crop_scale", (low, high))
        low, high = _range("crop_ratio", self.crop_ratio)
        if not 0 < low <= high:
            raise ValueError(
                f"`crop_ratio` must satisfy 0 < min <= max. Received crop_ratio={self.crop_ratio}"
            )
        object.__setattr__(self, "crop_ratio", (low, high))
        for name, upper in (("brightness", 1.0), ("contrast", 1.0), ("saturation", 1.0), ("hue", 0.5)):
            value = getattr(self, name)
            if not 0 <= value <= upper:
                raise ValueError(f"`{name}` must be in [0, {upper}]. Received {name}={value}")
            object.__setattr__(self, name, float(value))
        object.__setattr__(self, "flip", bool(self.flip))

    @classmethod
    def standard(cls, flip=True):
        """Defaults for retrieval training: crop 50-100 % of the area, flip, mild colour jitter.

        Colour jitter stays mild because colour is not class-defining for the vehicles but
        can be for other fine-grained domains (birds).
        """
        return cls(flip=flip, crop_scale=(0.5, 1.0), brightness=0.2, contrast=0.2, saturation=0.2, hue=0.02)

    @classmethod
    def none(cls):
        """The identity: returns images unchanged (evaluation)."""
        return cls(flip=False)

    @property
    def is_identity(self):
        return not (self.flip or self.crop_scale or self._jitters)

    @property
    def _jitters(self):
        return self.brightness or self.contrast or self.saturation or self.hue

    def get_config(self):
        return dataclasses.asdict(self)

    @classmethod
    def from_config(cls, config):
        return cls(**config)

    def __call__(self, image, seed=None):
        """Augments one uint8 (H, W, 3) image.

        Args:
            image: uint8 tensor (H, W, 3).
            seed: shape-(2,) integer tensor keying every draw; None draws one from the
                global generator (not reproducible).
        """
        image = tf.convert_to_tensor(image)
        if image.dtype != tf.uint8:
            raise ValueError(f"`image` must be uint8. Received dtype {image.dtype.name}")
        if self.is_identity:
            return image
        if seed is None:
            seed = tf.random.uniform([2], maxval=_INT32_MAX, dtype=tf.int32)
        crop_key, flip_key, jitter_key = tf.unstack(
            tf.random.experimental.stateless_split(tf.cast(seed, tf.int64), num=3)
        )
        if self.crop_scale is not None:
            image = self._random_resized_crop(image, crop_key)
        if self.flip:
            image = tf.image.stateless_random_flip_left_right(image, flip_key)
        if self._jitters:
            image = self._colour_jitter(image, jitter_key)
        return image

    def _random_resized_crop(self, image, seed):
        shape = tf.shape(image)
        begin, size, _ = tf.image.stateless_sample_distorted_bounding_box(
            shape,
            bounding_boxes=tf.constant([[[0.0, 0.0, 1.0, 1.0]]]),
            seed=seed,
            min_object_covered=0.0,
            aspect_ratio_range=self.crop_ratio,
            area_range=self.crop_scale,
            max_attempts=10,
            use_image_if_no_bounding_boxes=True,
        )
        crop = tf.image.resize(tf.slice(image, begin, size), shape[:2], antialias=True)
        crop = tf.cast(tf.clip_by_value(tf.round(crop), 0.0, 255.0), tf.uint8)
        return tf.ensure_shape(crop, image.shape)

    def _colour_jitter(self, image, seed):
        keys = tf.unstack(tf.random.experimental.stateless_split(seed, num=4))
        pixels = tf.image.convert_image_dtype(image, tf.float32)
        if self.brightness:
            pixels = tf.image.stateless_random_brightness(pixels, self.brightness, keys[0])
        if self.contrast:
            pixels = tf.image.stateless_random_contrast(
                pixels, 1.0 - self.contrast, 1.0 + self.contrast, keys[1]
            )
        if self.saturation:
            pixels = tf.image.stateless_random_saturation(
                pixels, 1.0 - self.saturation, 1.0 + self.saturation, keys[2]
            )
        if self.hue:
            pixels = tf.image.stateless_random_hue(pixels, self.hue, keys[3])
        pixels = tf.clip_by_value(pixels, 0.0, 1.0)
        return tf.image.convert_image_dtype(pixels, tf.uint8, saturate=True)


def _range(name, value):
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"`{name}` must be a (min, max) pair. Received {name}={value!r}") from None
    return low, high
