"""The HTML report of a run: `write_report(run_dir)` → `run_dir/report/index.html`, PNGs beside it.

A run directory is what `fgkeras demo`, `fgkeras train` or `fgkeras evaluate --out` wrote:
`results.json` (the config, and the metric rows of every method, or one method's metrics), the
embedder that was exported or trained (`embedder.keras`, or the file `results.json["embedder"]`
names), and after an export `saved_models/`, `indexes/` and `tflite/`. The report reloads the test
data from the saved config (`experiments.load_data`: synthetic data renders deterministically),
embeds it once, and draws what the run has: the metrics table and curves, retrieval galleries, the
method's own pictures, an embedding projection, the growing-inventory curve, the model card and
the TFLite parity figures. A part the run does not have gets no section.

The page is self-contained: one HTML file with inline CSS, no script, images as files beside it.
What the galleries show is also written to `galleries.json` (queries, results, labels, marks), so
that a reader — or a test — can check the marks against the labels.
"""

import dataclasses
import functools
import html
import json
import logging
import os
import re
import shutil

import numpy as np

from fgkeras._files import write_atomic

logger = logging.getLogger(__name__)

REPORT_DIR = "report"
PROJECTOR_DIR = "projector"
RESULTS = "results.json"
DEFAULT_EMBEDDER = "embedder.keras"
_TABLE_METRICS = ("recall@1", "recall@2", "recall@4", "recall@8", "p@5", "p@10", "map@r")


@dataclasses.dataclass(frozen=True)
class Picture:
    """An image of the report: its file (in the report folder), alt text and a caption."""

    file: str
    alt: str
    caption: str

    def __post_init__(self):
        if not self.alt.strip() or not self.caption.strip():
            raise ValueError(f"Every picture needs alt text and a caption. Received for {self.file!r}: "
                             f"alt={self.alt!r}, caption={self.caption!r}")


@dataclasses.dataclass
class Section:
    """A titled part of the report: paragraphs and tables (HTML), then pictures."""

    title: str
    anchor: str
    blocks: list = dataclasses.field(default_factory=list)
    pictures: list = dataclasses.field(default_factory=list)


def read_results(run_dir):
    """`run_dir/results.json` as a dict; a `ValueError` that says how to make one when it is missing."""
    path = os.path.join(run_dir, RESULTS)
    if not os.path.isfile(path):
        raise ValueError(
            f"{run_dir!r} is not a run directory: it has no {RESULTS}. Make one with "
            f"`fgkeras demo --out {run_dir}`, `fgkeras train --out {run_dir}` or "
            f"`fgkeras evaluate --model MODEL.keras --out {run_dir}`")
    with open(path) as f:
        return json.load(f)


def metric_rows(results):
    """The rows of the metrics table: `results["rows"]` (a demo), or one row of `results["metrics"]`."""
    if results.get("rows"):
        return [dict(row) for row in results["rows"]]
    if results.get("metrics"):
        method = results.get("method") or (results.get("config") or {}).get("train", {}).get("method", "model")
        return [{"method": method, **results["metrics"]}]
    return []


class RunContext:
    """What the sections of a report share: the run's results, config, data, embedder and embeddings.

    Everything is loaded on first use, once: a report of a run without an embedder or a config
    never loads TensorFlow models or data.
    """

    def __init__(self, run_dir, results, out_dir, k=5, per_group=3, verbose=True, projector=False):
        self.run_dir, self.results, self.out_dir = run_dir, results, out_dir
        self.k, self.per_group, self.verbose, self.projector = k, per_group, verbose, projector
        self.galleries = {}  # what each gallery shows, for galleries.json
        self._models = {}

    @functools.cached_property
    def config(self):
        from fgkeras.configs import ExperimentConfig

        return ExperimentConfig.from_dict(self.results["config"]) if self.results.get("config") else None

    @functools.cached_property
    def data(self):
        """`(train, test)` ImageSets reloaded from the saved config, or None without one."""
        from fgkeras import experiments

        return None if self.config is None else experiments.load_data(self.config.data)

    @functools.cached_property
    def embedder(self):
        """The run's embedder (reloaded from its `.keras` file), or None when the run saved none."""
        path = locate(self.run_dir, self.results.get("embedder", DEFAULT_EMBEDDER))
        return None if path is None else self._load(path)

    @functools.cached_property
    def embedders(self):
        """`{method: model}` of every embedder the run saved (`results["embedders"]`, else its one)."""
        if self.data is None:
            return {}
        saved = self.results.get("embedders")
        if not saved:
            return {} if self.embedder is None else {metric_rows(self.results)[0]["method"]: self.embedder}
        found = {method: locate(self.run_dir, path) for method, path in saved.items()}
        return {method: self._load(path) for method, path in found.items() if path}

    def _load(self, path):
        """`load_keras(path)`, once per file."""
        key = os.path.realpath(path)
        if key not in self._models:
            self._models[key] = load_keras(path)
        return self._models[key]

    @functools.cached_property
    def test(self):
        """`embed_dataset` arrays of the test set (embeddings, label, view, year, is_stock …)."""
        return self.embed(self.data[1])

    def embed(self, imageset, embedder=None):
        from fgkeras import evaluation

        dataset = imageset.as_dataset(image_size=self.config.data.image_size, batch_size=self.config.eval.batch_size)
        return evaluation.embed_dataset(embedder or self.embedder, dataset, verbose=self.verbose)

    @property
    def can_embed(self):
        return self.data is not None and self.embedder is not None

    def images(self, imageset, indices):
        """The images of `imageset` at `indices` (any shape), as the embedder saw them (uint8)."""
        indices = np.asarray(indices)
        unique, inverse = np.unique(indices.ravel(), return_inverse=True)
        loaded = np.stack([x["image"].numpy() for x in
                           imageset.subset(unique).as_dataset(image_size=self.config.data.image_size)])
        return loaded[inverse].reshape(*indices.shape, *loaded.shape[1:])

    def path(self, name):
        return os.path.join(self.out_dir, name)


def locate(run_dir, path):
    """`path` as saved by a run, found again: as given, else the same relative path under `run_dir`
    (a run dir moved, or a report made from another working directory), else None."""
    if not path:
        return None
    candidates = [path] if os.path.isabs(path) else [os.path.join(run_dir, path), path]
    parts = os.path.normpath(path).split(os.sep)
    candidates += [os.path.join(run_dir, *parts[i:]) for i in range(1, len(parts))]
    return next((c for c in candidates if os.path.exists(c)), None)


def load_keras(path):
    """A `.keras` model saved by fgkeras: its classes are registered, since importing this module
    imported `fgkeras` first."""
    import keras

    return keras.saving.load_model(path, compile=False)


# ---------------------------------------------------------------------------------------------
# Sections: each returns a Section, or None when the run does not have that part.


def metrics_section(ctx):
    """The table of every method's figures on the test classes, the pixel and colour floors, and
    the Recall@K and P@k curves."""
    from fgkeras.viz import plots

    rows = metric_rows(ctx.results)
    if not rows:
        return None
    section = Section("Retrieval figures", "metrics")
    floors = _floors(ctx)
    section.blocks.append(
        "<p>Leave-one-out retrieval among the test images (classes never seen in training). "
        "Figures in percent. The floors are hand-made features computed by the report itself: "
        "a learned embedder below them has not learned what tells the classes apart.</p>")
    section.blocks.append(_metrics_table(rows, floors))
    curve_rows = rows + floors
    for prefix, name, what in (("recall", "Recall@K", "the share of queries with a correct result in the top K"),
                               ("p", "P@k", "the share of correct results among the top k")):
        file = f"{prefix}_curves.png"
        if plots.metric_curves(curve_rows, prefix, ctx.path(file), f"{name} on the test classes"):
            section.pictures.append(Picture(
                file, f"{name} of each method against {name[-1]}, in percent",
                f"{name}: {what}, for each method and floor. Higher is better; a method whose line "
                "stays under a floor's has learned less than raw pixels or colours tell."))
    return section


def _floors(ctx):
    if ctx.data is None:
        return []
    from fgkeras import evaluation

    floors = evaluation.handcrafted_metrics(ctx.data[1], ctx.config.data.image_size)
    return [{"method": f"floor: {name}", "floor": True, **metrics} for name, metrics in floors.items()]


def _metrics_table(rows, floors):
    keys = [key for key in _TABLE_METRICS if any(key in row for row in rows)]
    extra = ["train_seconds"] if any("train_seconds" in row for row in rows) else []
    header = "".join(f"<th>{html.escape(key)}</th>" for key in ["method", *keys, *extra])
    lines = []
    for row in rows + floors:
        cells = "".join(
            f'<td data-metric="{html.escape(key)}">{_format(key, row[key]) if key in row else ""}</td>'
            for key in [*keys, *extra])
        kind = ' class="floor"' if row.get("floor") else ""
        lines.append(f'<tr data-method="{html.escape(str(row["method"]))}"{kind}>'
                     f"<th>{html.escape(str(row['method']))}</th>{cells}</tr>")
    return f'<table id="metrics-table"><thead><tr>{header}</tr></thead><tbody>{"".join(lines)}</tbody></table>'


def _format(key, value):
    """Metric cells as `format_table` shows them (percent, one decimal); other numbers as they are."""
    if isinstance(value, float) and "@" in key:
        return "nan" if np.isnan(value) else f"{100 * value:.1f}"
    return html.escape(str(value))


def gallery_section(ctx):
    """Best, median and worst test queries (leave-one-out), each with its top-k results."""
    if not ctx.can_embed:
        return None
    from fgkeras.viz import gallery

    test_set = ctx.data[1]
    ranking = gallery.rank_queries(ctx.test["embeddings"], ctx.test["label"], k=ctx.k)
    section = Section("Retrieval galleries", "galleries")
    section.blocks.append(
        f"<p>Each row: a test query (dark frame), then its top {ctx.k} results among the other test "
        "images, framed green when of the query's class and red otherwise. Queries are ranked by "
        "their average precision over the whole ranking.</p>")
    section.pictures += _gallery_pictures(ctx, "test", ranking, test_set, np.arange(len(test_set)),
                                          test_set, np.arange(len(test_set)), "test queries")
    return section


def stock_section(ctx):
    """User photos searched against the stock (catalogue) photos, when the test set has both."""
    if not ctx.can_embed or "is_stock" not in ctx.test:
        return None
    stock = np.asarray(ctx.test["is_stock"], bool)
    if stock.all() or not stock.any():
        return None
    from fgkeras import evaluation
    from fgkeras.viz import gallery

    user_rows, stock_rows = np.flatnonzero(~stock), np.flatnonzero(stock)
    embeddings, labels = ctx.test["embeddings"], ctx.test["label"]
    metrics = evaluation.retrieval_metrics(embeddings[user_rows], labels[user_rows],
                                           embeddings[stock_rows], labels[stock_rows])
    k = min(ctx.k, len(stock_rows))
    ranking = gallery.rank_queries(embeddings[user_rows], labels[user_rows], embeddings[stock_rows],
                                   labels[stock_rows], k=k)
    section = Section("Stock photos found from user photos", "stock")
    section.blocks.append(
        f"<p>The cross-domain case: {len(user_rows)} cluttered user photos of the test classes search "
        f"the {len(stock_rows)} clean stock photos only.</p>")
    section.blocks.append(_figures_table({"user → stock": metrics}))
    test_set = ctx.data[1]
    section.pictures += _gallery_pictures(ctx, "stock", ranking, test_set, user_rows, test_set, stock_rows,
                                          "user-photo queries against stock photos")
    return section


def open_set_section(ctx):
    """Unseen-class queries in an inventory that holds the training classes too (distractors)."""
    if not ctx.can_embed:
        return None
    from fgkeras import evaluation
    from fgkeras.viz import gallery

    train_set, test_set = ctx.data
    train = ctx.embed(train_set)
    # Train labels are renumbered 0..K-1 and may collide with test labels: shift them apart.
    train_labels = train["label"].astype(np.int64) + int(ctx.test["label"].max()) + 1
    figures = evaluation.open_set(train["embeddings"], train_labels, ctx.test["embeddings"], ctx.test["label"])
    inventory = np.concatenate([ctx.test["embeddings"], train["embeddings"]])
    inventory_labels = np.concatenate([ctx.test["label"].astype(np.int64), train_labels])
    ranking = gallery.rank_queries(ctx.test["embeddings"], ctx.test["label"], inventory, inventory_labels,
                                   k=ctx.k, exclude_index=np.arange(len(test_set)))
    section = Section("Open set: unseen classes among the training classes", "open-set")
    section.blocks.append(
        "<p><em>seen</em>: leave-one-out among training-class images; <em>unseen</em>: among test-class "
        "images only; <em>mixed</em>: each test image searches test and training images together, "
        "so the training classes act as distractors.</p>")
    section.blocks.append(_figures_table(figures))
    combined = _Concatenated(test_set, train_set)
    section.pictures += _gallery_pictures(ctx, "open_set", ranking, test_set, np.arange(len(test_set)),
                                          combined, np.arange(len(inventory)), "unseen-class queries in the mixed inventory")
    return section


class _Concatenated:
    """Two ImageSets read as one for `RunContext.images` (rows of `first`, then of `second`)."""

    def __init__(self, first, second):
        self.first, self.second = first, second

    def __len__(self):
        return len(self.first) + len(self.second)


def _gallery_pictures(ctx, name, ranking, query_set, query_rows, gallery_set, gallery_rows, what):
    """Three PNGs (best, median, worst queries of `ranking`), recorded in `ctx.galleries[name]`."""
    from fgkeras.viz import gallery

    groups = gallery.pick_queries(ranking, ctx.per_group)
    pictures, record = [], {}
    for group, picked in groups.items():
        queries = ctx.images(query_set, query_rows[picked])
        results = _images_of(ctx, gallery_set, gallery_rows[ranking["top"][picked]])
        file = f"gallery_{name}_{group}.png"
        gallery.write_gallery(ctx.path(file), queries, results, ranking["correct"][picked])
        record[group] = {
            "file": file, "queries": query_rows[picked].tolist(),
            "results": gallery_rows[ranking["top"][picked]].tolist(),
            "correct": ranking["correct"][picked].tolist(),
            "average_precision": [float(a) for a in ranking["ap"][picked]],
        }
        hits = int(ranking["correct"][picked].sum())
        pictures.append(Picture(
            file, f"The {group} {what}, each followed by its top {ranking['top'].shape[1]} results framed "
                  f"green (correct) or red (wrong)",
            f"{group.capitalize()} {what} by average precision ({hits} of {ranking['correct'][picked].size} "
            f"results correct). Look at {_LOOK_FOR[group]}"))
    ctx.galleries[name] = record
    return pictures


_LOOK_FOR = {
    "best": "what the embedder gets right: the same model in other views and colours.",
    "median": "the typical query: where the first red frame appears.",
    "worst": "the failure modes: do the red results share the query's view, colour or make rather "
             "than its model?",
}


def _images_of(ctx, imageset, rows):
    if isinstance(imageset, _Concatenated):
        rows = np.asarray(rows)
        split = len(imageset.first)
        out = np.empty((*rows.shape, ctx.config.data.image_size, ctx.config.data.image_size, 3), np.uint8)
        first = rows < split
        if first.any():
            out[first] = ctx.images(imageset.first, rows[first])
        if (~first).any():
            out[~first] = ctx.images(imageset.second, rows[~first] - split)
        return out
    return ctx.images(imageset, rows)


def _figures_table(named):
    """A small table of `retrieval_metrics` dicts by name: Recall@1/2/4/8 and MAP@R, and the query count."""
    keys = [key for key in ("recall@1", "recall@2", "recall@4", "recall@8", "map@r")
            if any(key in m for m in named.values())]
    header = "".join(f"<th>{key}</th>" for key in ["", *keys, "queries"])
    lines = "".join(
        f"<tr><th>{html.escape(name)}</th>"
        + "".join(f"<td>{_format(key, float(m[key]))}</td>" for key in keys)
        + f"<td>{int(m.get('num_queries', 0))}</td></tr>"
        for name, m in named.items())
    return f"<table><thead><tr>{header}</tr></thead><tbody>{lines}</tbody></table>"


def method_pictures_section(ctx):
    """The method's own pictures: HTG's keypoint maps, FGGAN's canonical views, ViewGAN's view grid."""
    section = Section("The method's own pictures", "method")
    section.pictures += _keypoint_pictures(ctx)
    section.pictures += _canonical_pictures(ctx)
    section.pictures += _view_grid_pictures(ctx)
    return section if section.pictures else None


def _keypoint_pictures(ctx):
    from fgkeras.viz import keypoint_overlays

    pictures = []
    for method, embedder in ctx.embedders.items():
        if not hasattr(embedder, "keypoint_maps"):
            continue
        test_set = ctx.data[1]
        file = f"keypoints_{_file_name(method)}.png"
        keypoint_overlays(embedder, ctx.images(test_set, _one_per_class(test_set, 4)), ctx.path(file), cell_size=96)
        pictures.append(Picture(
            file, f"Keypoint maps of {method} on 4 test images: the image, the maximum over channels, "
                  "then the 4 strongest channel maps",
            f"Where {method}'s keypoint-map branch looks (HTG Fig. 5). The second column is the maximum "
            "response over channels; the next ones are single channels. Look for maps that sit on "
            "parts (wheels, lights, roof) rather than on the background, and that differ from each other."))
    return pictures


def _one_per_class(imageset, count):
    """The first user photo (any photo without stock flags) of each of the first `count` classes."""
    user = np.ones(len(imageset), bool) if imageset.is_stock is None else ~imageset.is_stock
    if not user.any():
        user[:] = True
    rows = np.flatnonzero(user)
    _, first = np.unique(imageset.labels[rows], return_index=True)
    return rows[first[:count]]


def _file_name(name):
    """`name` (a method, a model file's name) made safe as part of a file name."""
    return re.sub(r"[^A-Za-z0-9_-]+", "_", str(name))


def _canonical_pictures(ctx):
    from fgkeras.viz import canonical_grid, class_views

    pictures = []
    for method, embedder in ctx.embedders.items():
        generator = getattr(embedder, "generator", None)
        test_set = ctx.data[1]
        if generator is None or test_set.views is None or test_set.is_stock is None:
            continue
        canonical_view = ctx.config.fggan.canonical_view
        try:
            classes, views = _classes_and_views(test_set)
            inputs, canonical = class_views(test_set, classes, views, canonical_view=canonical_view)
        except ValueError as error:  # the test set lacks a view or stock photo the grid needs
            logger.info("report: no canonical-view grid for %s: %s", method, error)
            continue
        inputs = _resize_all(inputs, ctx.config.data.image_size)
        canonical = _resize_all(canonical, ctx.config.data.image_size)
        file = f"canonical_{_file_name(method)}.png"
        canonical_grid(generator, inputs, canonical, ctx.path(file))
        pictures.append(Picture(
            file, f"{method}: user photos of {len(classes)} test classes in {len(views)} views, "
                  "G's canonical view of each, and a real canonical stock photo",
            "Input → canonical view (FGGAN). Each row is one unseen class: its user photos, then what G "
            "makes of each, then a real stock photo in the canonical view. Look for G's images of a row "
            "to agree with each other and with the real photo, whatever the input view."))
    return pictures


def _classes_and_views(test_set):
    """Up to 4 test classes and up to 4 views in which each of them has a user photo."""
    user = ~test_set.is_stock
    classes = np.unique(test_set.labels)[:4]
    shared = None
    for label in classes:
        views = set(np.unique(test_set.views[user & (test_set.labels == label)]).tolist())
        shared = views if shared is None else shared & views
    views = sorted(shared or [])
    if not views:
        raise ValueError("no view has a user photo of every class shown")
    picked = np.unique(np.linspace(0, len(views) - 1, min(4, len(views))).round().astype(int))
    return classes, [views[i] for i in picked]


def _resize_all(images, side):
    import tensorflow as tf

    images = np.asarray(images)
    if images.shape[-3:-1] == (side, side):
        return images
    flat = images.reshape(-1, *images.shape[-3:])
    resized = tf.image.resize_with_pad(flat.astype(np.float32), side, side, antialias=True).numpy()
    return resized.reshape(*images.shape[:-3], side, side, 3)


def _view_grid_pictures(ctx):
    source = locate(ctx.run_dir, ctx.results.get("grid"))
    if source is None:
        return []
    shutil.copyfile(source, ctx.path("view_grid.png"))
    return [Picture(
        "view_grid.png", "ViewGAN: unseen instances, each in every target view; under each row the true rendering",
        "Input × target view (ViewGAN). Each input (first column) is turned to every view; the row under "
        "it is the renderer's true image of that view. Look for the identity (shape, parts, colour) to stay "
        "while the view changes.")]


def tables_section(ctx):
    """The Markdown tables a run wrote beside its results that the report does not redraw
    (ViewGAN's identity-preservation and few-shot tables, `few_shot.md`), shown as text."""
    path = os.path.join(ctx.run_dir, "few_shot.md")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        text = f.read().strip()
    section = Section("Identity preservation and few-shot classification", "few-shot")
    section.blocks.append("<p>As the run printed them (figures in percent unless named).</p>")
    section.blocks.append(f"<pre>{html.escape(text)}</pre>")
    return section


def projection_section(ctx):
    """The first two principal components of the test embeddings, coloured by class."""
    if not ctx.can_embed:
        return None
    from fgkeras.viz import plots

    labels = ctx.test["label"]
    if len(labels) < 3:
        return None
    file = "projection.png"
    _, explained = plots.embedding_projection(ctx.test["embeddings"], labels, ctx.path(file),
                                              "Test-class embeddings (PCA)")
    section = Section("Embeddings of the unseen classes", "projection")
    section.pictures.append(Picture(
        file, f"Scatter of {len(labels)} test embeddings of {len(np.unique(labels))} unseen classes on "
              "their first two principal components, one colour per class",
        f"A 2-D PCA of the test embeddings ({100 * explained:.0f}% of the variance). Look for "
        "tight clusters of one colour, apart from each other; a smear of mixed colours means the "
        "embedder does not separate classes it never saw."))
    if ctx.projector:
        log_dir = write_projector_files(ctx)
        section.blocks.append(
            f"<p>The same embeddings, with their labels and thumbnails, for TensorBoard's projector "
            f"(PCA, t-SNE or UMAP in 3-D, searchable by class): <code>tensorboard --logdir "
            f"{html.escape(log_dir)}</code>, then the <em>Projector</em> tab.</p>")
    return section


def write_projector_files(ctx):
    """The test embeddings, their per-image facts and thumbnails in `RUN_DIR/projector`."""
    from fgkeras.viz import projector

    test = ctx.test
    metadata = {key: values for key, values in test.items()
                if key != "embeddings" and np.ndim(values) == 1 and len(values) == len(test["embeddings"])}
    images = ctx.images(ctx.data[1], np.arange(len(test["embeddings"])))
    log_dir = os.path.join(ctx.run_dir, PROJECTOR_DIR)
    projector.write_projector(log_dir, test["embeddings"], metadata, images)
    return log_dir


def inventory_section(ctx):
    """The growing inventory (classes arriving by release year), when the data has years."""
    if not ctx.can_embed or "year" not in ctx.test or len(np.unique(ctx.test["year"])) < 2:
        return None
    from fgkeras import evaluation
    from fgkeras.viz import plots

    rows = evaluation.growing_inventory(ctx.test["embeddings"], ctx.test["label"], ctx.test["year"])
    file = "growing_inventory.png"
    plots.growing_inventory_curve(rows, ctx.path(file), "Growing inventory of the test classes")
    section = Section("Growing inventory", "inventory")
    section.blocks.append(
        "<p>Year by year the inventory holds every test class released so far; that year's arrivals "
        "search it, so earlier classes are more distractors every year.</p>")
    section.blocks.append(_figures_table({str(row["year"]): row for row in rows}))
    section.pictures.append(Picture(
        file, "Recall@1 and MAP@R of each year's new arrivals against the release year, with the "
              "number of classes in the inventory as grey bars",
        "The growing inventory: a curve that holds level while the bars grow means new classes are "
        "found as well in a large inventory as in a small one."))
    return section


def export_section(ctx):
    """The export: the method exported, the blessing decision, and the model card's facts."""
    exported = ctx.results.get("export")
    if not exported:
        return None
    section = Section("Export and model card", "export")
    facts = [("method exported", exported.get("method")),
             ("blessing decision", "pushed" if exported.get("pushed") else "not pushed"),
             ("reason", exported.get("reason"))]
    saved_model = locate(ctx.run_dir, exported.get("saved_model"))
    card = None
    if saved_model:
        from fgkeras.export import read_model_card

        card = read_model_card(saved_model)
    if card:
        facts += [("model name", card.get("name")), ("version", card.get("version")),
                  ("created", card.get("created"))]
        facts += [(f"card {key}", _format(key, float(value))) for key, value in sorted((card.get("metrics") or {}).items())
                  if key in ("recall@1", "map@r")]
        facts += [(f"version of {name}", version) for name, version in sorted((card.get("versions") or {}).items())]
    if exported.get("index"):
        facts.append(("index", os.path.relpath(locate(ctx.run_dir, exported["index"]) or exported["index"], ctx.run_dir)))
    section.blocks.append(_facts_table(facts, "export-facts"))
    for title, key in (("Data", "data"), ("Configuration", "config")):
        value = (card or {}).get(key) or (ctx.results.get("config") or {}).get(key)
        if value:
            section.blocks.append(f"<details><summary>{title}</summary><pre>"
                                  f"{html.escape(json.dumps(value, indent=2, sort_keys=True))}</pre></details>")
    served = ctx.results.get("served")
    if served:
        section.blocks.append(
            f"<p>Served over gRPC ({html.escape(served['address'])}): a photo of a class the inventory lacked "
            f"found <code>{html.escape(str(served['top_ids'][0]))}</code> first; after it was upserted as "
            f"<code>new-arrival</code> it found <code>{html.escape(served['top_ids_after_upsert'][0])}</code> "
            f"first (score {served['top_scores_after_upsert'][0]:.3f}).</p>")
    return section


def tflite_section(ctx):
    """The TFLite files and how close each is to the Keras embedder (`tflite/<name>/parity.json`)."""
    exported = ctx.results.get("export") or {}
    parity, files = exported.get("tflite_parity"), exported.get("tflite") or {}
    if not parity:
        found = [os.path.join(root, "parity.json") for root, _, names in
                 os.walk(os.path.join(ctx.run_dir, "tflite")) if "parity.json" in names]
        if not found:
            return None
        with open(sorted(found)[0]) as f:
            parity = json.load(f)
    modes = [mode for mode, entry in parity.items() if isinstance(entry, dict) and "max_abs_diff" in entry]
    if not modes:
        return None
    keys = ("max_abs_diff", "mean_abs_diff", "nn_agreement", "recall@1", "recall@1_drop")
    header = "".join(f"<th>{key}</th>" for key in ("mode", *keys, "size (KiB)"))
    lines = []
    for mode in modes:
        entry = parity[mode]
        path = locate(ctx.run_dir, files.get(mode))
        size = f"{os.path.getsize(path) / 1024:.0f}" if path else ""
        cells = "".join(f'<td data-key="{key}">{_parity_cell(key, entry.get(key))}</td>' for key in keys)
        lines.append(f'<tr data-mode="{html.escape(mode)}"><th>{html.escape(mode)}</th>{cells}<td>{size}</td></tr>')
    section = Section("TFLite parity", "tflite")
    reference = parity.get("reference") or {}
    section.blocks.append(
        "<p>Each TFLite embedder against the Keras embedder on a sample of test images"
        + (f" ({reference.get('num_images')} images; Keras Recall@1 "
           f"{_format('recall@1', float(reference['recall@1']))}%)" if "recall@1" in reference else "")
        + ": the largest and mean absolute difference of the embeddings, the share of images whose "
          "nearest neighbour is the same, and Recall@1 with its drop (points).</p>")
    section.blocks.append(f'<table id="tflite-table"><thead><tr>{header}</tr></thead>'
                          f"<tbody>{''.join(lines)}</tbody></table>")
    return section


def _parity_cell(key, value):
    if value is None:
        return ""
    if key in ("recall@1", "nn_agreement", "recall@1_drop"):  # shares and their drop: percent, points
        return f"{100 * value:.1f}"
    return f"{value:.2e}"


def _facts_table(facts, table_id):
    lines = "".join(f"<tr><th>{html.escape(str(name))}</th><td>{html.escape(str(value))}</td></tr>"
                    for name, value in facts if value is not None)
    return f'<table id="{table_id}"><tbody>{lines}</tbody></table>'


SECTIONS = (metrics_section, tables_section, gallery_section, stock_section, open_set_section,
            method_pictures_section, projection_section, inventory_section, export_section, tflite_section)


# ---------------------------------------------------------------------------------------------


def write_report(run_dir, k=5, per_group=3, verbose=True, projector=False):
    """Writes `run_dir/report/index.html` and its PNGs (and `galleries.json`); returns the HTML's path.

    Args:
        run_dir: a run directory with a `results.json` (see the module docstring).
        k: results shown per query in the galleries.
        per_group: queries per gallery (best, median, worst).
        verbose: progress bars while embedding.
        projector: also write the test embeddings for TensorBoard's projector in
            `run_dir/projector` (`viz.projector.write_projector`), named in the projection section.
    """
    results = read_results(run_dir)
    out_dir = os.path.join(run_dir, REPORT_DIR)
    _clear(out_dir)
    ctx = RunContext(run_dir, results, out_dir, k=k, per_group=per_group, verbose=verbose, projector=projector)
    sections = []
    for build in SECTIONS:
        section = build(ctx)
        if section is not None:
            logger.info("report: %s", section.title)
            sections.append(section)
    if ctx.galleries:
        write_atomic(os.path.join(out_dir, "galleries.json"), json.dumps(ctx.galleries, indent=2).encode())
    path = os.path.join(out_dir, "index.html")
    write_atomic(path, render_html(_title(ctx), _summary(ctx), sections).encode("utf-8"))
    return path


def _clear(out_dir):
    """Creates the report folder, removing the files an earlier report wrote there (never others)."""
    os.makedirs(out_dir, exist_ok=True)
    for name in os.listdir(out_dir):
        if name == "index.html" or name == "galleries.json" or name.endswith(".png"):
            os.remove(os.path.join(out_dir, name))


def _title(ctx):
    name = (ctx.results.get("config") or {}).get("name")
    return f"fgkeras report: {name or os.path.basename(os.path.abspath(ctx.run_dir))}"


def _summary(ctx):
    facts = [("run directory", os.path.abspath(ctx.run_dir))]
    if ctx.config is not None:
        data = ctx.config.data
        facts += [("data", f"{data.source}, {data.image_size} px; train split {data.train_split!r}, "
                           f"test split {data.test_split!r}"),
                  ("backbone", f"{ctx.config.model.backbone} (width {ctx.config.model.width}, "
                               f"{ctx.config.model.embedding_dim}-d embedding)"),
                  ("budget", f"{ctx.config.train.epochs} epochs × {ctx.config.train.steps_per_epoch} steps")]
        if ctx.data is not None:
            train, test = ctx.data
            facts += [("images", f"{len(train)} training images of {train.num_classes} classes; "
                                 f"{len(test)} test images of {test.num_classes} unseen classes")]
    return _facts_table(facts, "summary")


_CSS = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 1em 0; }
th, td { border: 1px solid #ccc; padding: 0.25em 0.6em; text-align: right; }
tbody th { text-align: left; font-weight: normal; }
tr.floor { color: #777; font-style: italic; }
figure { margin: 1.5em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.9em; color: #444; max-width: 60em; }
pre { background: #f6f6f6; padding: 0.8em; overflow-x: auto; font-size: 0.85em; }
nav a { margin-right: 1em; }
"""


def render_html(title, summary, sections):
    """The page: a title, the run's summary, a table of contents, then each section."""
    nav = "".join(f'<a href="#{s.anchor}">{html.escape(s.title)}</a>' for s in sections)
    body = "".join(_render_section(section) for section in sections)
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{html.escape(title)}</title><style>{_CSS}</style></head><body>"
            f"<h1>{html.escape(title)}</h1>{summary}<nav>{nav}</nav>{body}</body></html>\n")


def _render_section(section):
    figures = "".join(
        f'<figure><img src="{html.escape(p.file)}" alt="{html.escape(p.alt)}">'
        f"<figcaption>{html.escape(p.caption)}</figcaption></figure>" for p in section.pictures)
    return f'<section id="{section.anchor}"><h2>{html.escape(section.title)}</h2>{"".join(section.blocks)}{figures}</section>'


__all__ = ["Picture", "RunContext", "Section", "SECTIONS", "locate", "metric_rows", "read_results",
           "render_html", "write_report"]
