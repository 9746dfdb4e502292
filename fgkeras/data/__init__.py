"""Everything that yields tf.data: image sets, readers, P×K batches, augmentation."""

from fgkeras.data.augment import Augment
from fgkeras.data.core import (
    CorruptImage,
    ImageDecodeError,
    ImageSet,
    decode_image,
    resize_and_pad,
    to_supervised,
)
from fgkeras.data.pairs import canonical_pairs, canonical_rows
from fgkeras.data.sources import IMAGE_EXTENSIONS, image_folder, read_csv, tfds_images
from fgkeras.data.synthetic import SyntheticVehicles
from fgkeras.data.views import front_views, render_views, view_pairs
