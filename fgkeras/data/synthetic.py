"""`SyntheticVehicles`: the embedded multi-view, fine-grained, open-set data set.

Parametric 3-D vehicles rendered with numpy and Pillow (see `fgkeras/data/_render.py`):
makes share a body style, the models of a make differ only in small parts, colour varies per
instance, every photo is a genuine projection from one of `num_views` azimuths (view 0 = front,
the canonical view). Stock photos are clean views at `stock_view` (front by default); user photos have any view, a
cluttered background, pose/light jitter and sometimes an occluder.
"""

import csv
import math
import os

import numpy as np
from PIL import Image
from tqdm.auto import tqdm

from fgkeras.data import _render

SPLITS = ("train", "unseen")
IMAGE_FORMATS = ("png", "jpg", "jpeg")
CSV_HEADER = ("path", "class_id", "class_name", "split", "view", "year", "is_stock")

# Independent random streams: every quantity is drawn from default_rng([seed, stream, ...]), so
# any image can be rendered alone from (seed, split, index).
_STYLES, _MAKE, _MODELS, _VIEWS, _YEARS, _INSTANCE, _PHOTO = range(1, 8)
_PROGRESS_MIN_IMAGES = 300
_STOCK_ELEVATION = math.radians(12.0)
_STOCK_FIT = 0.84


def _check(ok, name, rule, value):
    if not ok:
        raise ValueError(f"`{name}` must be {rule}. Received: {name}={value!r}")


def _is_int(value):
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_number(value):
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, bool)


class SyntheticVehicles:
    """Procedural multi-view vehicles for fine-grained retrieval (the embedded default data set).

    Classes are (make, model) pairs. A make fixes the body style and proportions; the models of
    a make differ only in small parts (wheel size, spokes, rim colour, cabin length and height,
    headlights, grille pattern, spoiler, roof rack, side stripe, windows, mirrors, tail lights).
    Paint colour and a slight shape jitter vary per instance and never define the class
    (instance i has the same paint in every class).

    Within each make, models alternate between the "train" and "unseen" splits. Train classes
    have ids `0 .. K_train - 1`, unseen classes `K_train .. K - 1`. Each class has a release
    year in `[first_year, first_year + num_years)`, spread evenly over the classes of a split.
    Each class has `images_per_class` images: the first `round(stock_fraction * images_per_class)`
    are stock photos (view `stock_view`, 0 by default; plain background, no jitter), the others
    user photos with views balanced over `[0, num_views)`.

    Args:
        seed: non-negative int; the same seed gives byte-identical images.
        image_size: side of the square images, in [32, 224].
        num_makes: number of makes (>= 1); body styles cycle through
            sedan, hatchback, suv, wagon, coupe, van, pickup, sports in a seeded order.
        models_per_make: number of models per make (>= 1).
        images_per_class: images per class (>= 1).
        num_views: number of azimuths, evenly spaced (>= 8); view 0 = front.
        unseen_fraction: fraction of the models of each make in the "unseen" split, in [0, 1).
        stock_fraction: fraction of the images of a class that are stock photos, in [0, 1].
        first_year, num_years: release years of the classes.
        part_changes: difficulty knob; number of parts in which each model deviates from its
            make's base design (>= 1). Fewer changes = more similar models = harder.
        min_part_differences: difficulty knob; any two models of a make differ in at least this
            many parts (one of them visible from the front), in [1, 2 * part_changes].
        part_scale: difficulty knob; size of the continuous part differences (wheel size, cabin
            length and height; 1.0 = about 9-12 % per step), > 0.
        shape_jitter: per-instance relative jitter of length, width, height, cabin height and
            cabin length (uniform +-shape_jitter), in [0, 0.2). Keep it below the steps above.
        pose_jitter: scale of the user photos' azimuth, elevation, scale, translation and
            lighting jitter, >= 0 (0 = every user photo framed like a stock photo).
        clutter: amount of background clutter and sensor noise in user photos, >= 0.
        occlusion_prob: probability that a user photo has an occluder over the vehicle, in [0, 1].
        supersample: anti-aliasing factor (render at `supersample * image_size`, then box-filter
            down), in [1, 4].
        stock_view: the azimuth of the stock photos, in [0, num_views) (0 = front; FGGAN's
            canonical-view study renders them at another one).

    Calibration: the defaults of `pose_jitter`, `clutter` and `occlusion_prob` were chosen so
    that a batch-hard triplet ResNet-18 (width 0.5, 64 px, 1,000 steps of 16×4, from scratch)
    reaches about 33 % Recall@1 on the unseen classes, leaving room above for better methods;
    with pose_jitter=1, clutter=1, occlusion_prob=0.25 the same run reached 17.5 %.
    """

    def __init__(self, seed=0, image_size=64, num_makes=8, models_per_make=6,
                 images_per_class=40, num_views=8, unseen_fraction=0.5, stock_fraction=0.2,
                 first_year=2015, num_years=6, part_changes=3, min_part_differences=2,
                 part_scale=1.0, shape_jitter=0.03, pose_jitter=0.5, clutter=0.3,
                 occlusion_prob=0.05, supersample=2, stock_view=0):
        _check(_is_int(seed) and seed >= 0, "seed", "a non-negative int", seed)
        _check(_is_int(image_size) and 32 <= image_size <= 224, "image_size", "in [32, 224]",
               image_size)
        for name, value in (("num_makes", num_makes), ("models_per_make", models_per_make),
                            ("images_per_class", images_per_class), ("num_years", num_years),
                            ("part_changes", part_changes),
                            ("min_part_differences", min_part_differences)):
            _check(_is_int(value) and value >= 1, name, "an int >= 1", value)
        _check(_is_int(num_views) and num_views >= 8, "num_views", "an int >= 8", num_views)
        _check(_is_int(first_year), "first_year", "an int", first_year)
        _check(_is_number(unseen_fraction) and 0 <= unseen_fraction < 1, "unseen_fraction",
               "in [0, 1)", unseen_fraction)
        for name, value in (("stock_fraction", stock_fraction),
                            ("occlusion_prob", occlusion_prob)):
            _check(_is_number(value) and 0 <= value <= 1, name, "in [0, 1]", value)
        _check(part_changes <= len(_render.PARTS), "part_changes",
               f"<= the number of parts ({len(_render.PARTS)})", part_changes)
        _check(min_part_differences <= 2 * part_changes, "min_part_differences",
               f"<= 2 * part_changes ({2 * part_changes})", min_part_differences)
        _check(_is_number(part_scale) and part_scale > 0, "part_scale", "> 0", part_scale)
        _check(_is_number(shape_jitter) and 0 <= shape_jitter < 0.2, "shape_jitter", "in [0, 0.2)",
               shape_jitter)
        for name, value in (("pose_jitter", pose_jitter), ("clutter", clutter)):
            _check(_is_number(value) and value >= 0, name, ">= 0", value)
        _check(_is_int(supersample) and 1 <= supersample <= 4, "supersample", "an int in [1, 4]",
               supersample)
        _check(_is_int(stock_view) and 0 <= stock_view < num_views, "stock_view",
               f"an int in [0, num_views={num_views})", stock_view)

        self.seed = int(seed)
        self.image_size = int(image_size)
        self.num_makes = int(num_makes)
        self.models_per_make = int(models_per_make)
        self.images_per_class = int(images_per_class)
        self.num_views = int(num_views)
        self.unseen_fraction = float(unseen_fraction)
        self.stock_fraction = float(stock_fraction)
        self.first_year = int(first_year)
        self.num_years = int(num_years)
        self.part_changes = int(part_changes)
        self.min_part_differences = int(min_part_differences)
        self.part_scale = float(part_scale)
        self.shape_jitter = float(shape_jitter)
        self.pose_jitter = float(pose_jitter)
        self.clutter = float(clutter)
        self.occlusion_prob = float(occlusion_prob)
        self.supersample = int(supersample)
        self.stock_view = int(stock_view)
        self.num_stock = int(round(self.stock_fraction * self.images_per_class))

        self._design()
        self._meshes = {}
        self._arrays = {}

    # ----------------------------------------------------------------------------------------
    # Classes

    def _rng(self, *stream):
        return np.random.default_rng([self.seed, *stream])

    def _design(self):
        order = self._rng(_STYLES).permutation(len(_render.BODY_STYLES))
        self._makes, self._models = [], []
        for make in range(self.num_makes):
            style = _render.BODY_STYLES[order[make % len(order)]]
            design = _render.make_design(self._rng(_MAKE, make), style)
            self._makes.append(design)
            self._models.append(_render.model_parts(
                self._rng(_MODELS, make), design["parts"], self.models_per_make,
                self.part_changes, self.min_part_differences))

        # Spread the unseen models evenly among each make's models (alternating at 0.5).
        m = self.models_per_make
        n_unseen = min(int(round(m * self.unseen_fraction)), m - 1)
        unseen = [(k + 1) * n_unseen // m > k * n_unseen // m for k in range(m)]
        pairs = {split: [(a, k) for a in range(self.num_makes) for k in range(m)
                         if unseen[k] == (split == "unseen")] for split in SPLITS}
        self._pairs = pairs["train"] + pairs["unseen"]
        self._split_ids = {
            "train": np.arange(len(pairs["train"]), dtype=np.int32),
            "unseen": np.arange(len(pairs["train"]), len(self._pairs), dtype=np.int32),
        }
        self.class_make = np.array([a for a, _ in self._pairs], dtype=np.int32)
        self.class_year = np.zeros(len(self._pairs), dtype=np.int32)
        for i, split in enumerate(SPLITS):
            ids = self._split_ids[split]
            spread = self._rng(_YEARS, i).permutation(len(ids)) % self.num_years
            self.class_year[ids] = self.first_year + spread
        self.class_names = [f"Make{a} Model{k}" for a, k in self._pairs]

    @property
    def num_classes(self):
        return len(self._pairs)

    def _check_split(self, split):
        if split not in SPLITS:
            raise ValueError(f"`split` must be one of {SPLITS}. Received: split={split!r}")

    def classes(self, split):
        """Class ids of `split` ("train" or "unseen"), as an int32 array."""
        self._check_split(split)
        return self._split_ids[split].copy()

    def num_classes_in(self, split):
        self._check_split(split)
        return len(self._split_ids[split])

    def num_images(self, split):
        return self.num_classes_in(split) * self.images_per_class

    def parts(self, class_id):
        """The body style and part choices of a class (a dict; for inspection)."""
        make, model = self._pairs[class_id]
        return {"style": self._makes[make]["style"], **self._models[make][model]}

    # ----------------------------------------------------------------------------------------
    # Rendering

    def _mesh(self, class_id):
        if class_id not in self._meshes:
            make, model = self._pairs[class_id]
            self._meshes[class_id] = _render.build_vehicle(
                self._makes[make], self._models[make][model], self.part_scale)
        return self._meshes[class_id]

    def render(self, class_id, view, instance, stock=False):
        """One photo of instance `instance` of class `class_id` seen from azimuth `view`.

        `stock=True` gives a studio photo: plain background, centred, no pose or light jitter
        (the data set's stock photos are these at `stock_view`). Otherwise a user photo.
        An instance has the same paint and shape jitter in every view and every class, so
        colour carries no class information and classes can be compared pixel for pixel.
        Returns a uint8 array (image_size, image_size, 3)."""
        _check(_is_int(class_id) and 0 <= class_id < self.num_classes, "class_id",
               f"an int in [0, {self.num_classes})", class_id)
        _check(_is_int(view) and 0 <= view < self.num_views, "view",
               f"an int in [0, {self.num_views})", view)
        _check(_is_int(instance) and instance >= 0, "instance", "a non-negative int", instance)
        class_id, view, instance, stock = int(class_id), int(view), int(instance), bool(stock)

        own = self._rng(_INSTANCE, instance)
        paint = _render.paint_colour(own)
        jitter = 1 + self.shape_jitter * own.uniform(-1, 1, size=5)
        shape = (jitter[:3], jitter[3], jitter[4])

        rng = self._rng(_PHOTO, class_id, instance, view, int(stock))
        size = self.image_size * self.supersample
        azimuth = 2 * math.pi * view / self.num_views
        if stock:
            photo = _render.Photo(azimuth=azimuth, elevation=_STOCK_ELEVATION, fit=_STOCK_FIT)
            image = _render.plain_background(size)
        else:
            photo = self._user_photo(rng, azimuth)
            image = _render.cluttered_background(rng, size, self.clutter)
        box = _render.draw_vehicle(image, self._mesh(class_id), paint, shape, photo)
        if not stock and rng.random() < self.occlusion_prob:
            _render.occlude(rng, image, box)
        if self.supersample > 1:
            image = image.reduce(self.supersample)
        pixels = np.array(image)
        if not stock and self.clutter > 0:
            noise = rng.standard_normal(pixels.shape, dtype=np.float32) * (4.0 * self.clutter)
            pixels = np.clip(pixels + noise, 0, 255).astype(np.uint8)
        return pixels

    def _user_photo(self, rng, azimuth):
        j = self.pose_jitter
        u = rng.uniform(-1, 1, size=9)
        elevation = np.clip(15 + 9 * j * u[1], 7, 35)
        return _render.Photo(
            azimuth=azimuth + j * 0.2 * (2 * math.pi / self.num_views) * u[0],
            elevation=math.radians(elevation),
            fit=float(np.clip(_STOCK_FIT * math.exp(0.15 * j * u[2]), 0.5, 1.0)),
            shift=(0.08 * j * u[3], 0.08 * j * u[4]),
            light_azimuth=0.6 + 1.2 * j * u[5],
            light_elevation=0.9 + 0.4 * j * u[6],
            ambient=0.42 + 0.1 * j * u[7],
            diffuse=0.62 * (1 + 0.3 * j * u[8]),
        )

    # ----------------------------------------------------------------------------------------
    # Data set

    def _views(self, class_id):
        """Views of the user photos of a class: balanced over [0, num_views), shuffled."""
        n_user = self.images_per_class - self.num_stock
        return self._rng(_VIEWS, class_id).permutation(np.arange(n_user) % self.num_views)

    def _record(self, split, index):
        """(class_id, view, instance, is_stock) of image `index` of `split`."""
        ids = self._split_ids[split]
        class_id, instance = int(ids[index // self.images_per_class]), index % self.images_per_class
        if instance < self.num_stock:
            return class_id, self.stock_view, instance, True
        return class_id, int(self._views(class_id)[instance - self.num_stock]), instance, False

    def item(self, split, index):
        """Image `index` of `split` alone: a dict image, label, view, year, is_stock."""
        self._check_split(split)
        n = self.num_images(split)
        _check(_is_int(index) and 0 <= index < n, "index", f"an int in [0, {n})", index)
        class_id, view, instance, stock = self._record(split, int(index))
        return {
            "image": self.render(class_id, view, instance, stock),
            "label": class_id,
            "view": view,
            "year": int(self.class_year[class_id]),
            "is_stock": stock,
        }

    def _progress(self, iterable, total, desc):
        return tqdm(iterable, total=total, desc=desc, leave=False,
                    disable=True if total <= _PROGRESS_MIN_IMAGES else None)

    def arrays(self, split):
        """All images of `split` as numpy arrays (cached): image (N, S, S, 3) uint8, label,
        view, year (N,) int32, is_stock (N,) bool. Ordered by class, stock photos first."""
        self._check_split(split)
        if split not in self._arrays:
            n, s = self.num_images(split), self.image_size
            records = [self._record(split, i) for i in range(n)]
            images = np.empty((n, s, s, 3), dtype=np.uint8)
            for i, record in self._progress(enumerate(records), n, f"rendering {split}"):
                images[i] = self.render(*record)
            labels = np.array([r[0] for r in records], dtype=np.int32)
            self._arrays[split] = {
                "image": images,
                "label": labels,
                "view": np.array([r[1] for r in records], dtype=np.int32),
                "year": self.class_year[labels],
                "is_stock": np.array([r[3] for r in records], dtype=bool),
            }
        return self._arrays[split]

    def imageset(self, split):
        """The split as a `fgkeras.data.core.ImageSet`."""
        from fgkeras.data.core import ImageSet

        a = self.arrays(split)
        return ImageSet(labels=a["label"], images=a["image"], views=a["view"], years=a["year"],
                        is_stock=a["is_stock"], class_names=list(self.class_names))

    def as_dataset(self, split, **kwargs):
        """The split as a tf.data.Dataset of dicts image (S, S, 3) uint8, label, view, year
        int32, is_stock bool; `kwargs` go to `ImageSet.as_dataset` (batch_size, shuffle...)."""
        return self.imageset(split).as_dataset(**kwargs)

    def write_image_folder(self, root, splits=SPLITS, image_format="png"):
        """Write root/images/<class_id:03d>/<split>_<index:05d>.<image_format> and
        root/labels.csv (path relative to root, class_id, class_name, split, view, year,
        is_stock as 0/1). Returns the path of labels.csv."""
        _check(image_format in IMAGE_FORMATS, "image_format", f"one of {IMAGE_FORMATS}",
               image_format)
        splits = (splits,) if isinstance(splits, str) else tuple(splits)
        for split in splits:
            self._check_split(split)
        rows = []
        for split in splits:
            n = self.num_images(split)
            for index in self._progress(range(n), n, f"writing {split}"):
                if split in self._arrays:
                    a = self._arrays[split]
                    item = {key: a[key][index] for key in a}
                else:
                    item = self.item(split, index)
                label = int(item["label"])
                path = f"images/{label:03d}/{split}_{index:05d}.{image_format}"
                os.makedirs(os.path.join(root, "images", f"{label:03d}"), exist_ok=True)
                Image.fromarray(item["image"]).save(os.path.join(root, *path.split("/")))
                rows.append((path, label, self.class_names[label], split, int(item["view"]),
                             int(item["year"]), int(bool(item["is_stock"]))))
        labels_csv = os.path.join(root, "labels.csv")
        with open(labels_csv, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(CSV_HEADER)
            writer.writerows(rows)
        return labels_csv
