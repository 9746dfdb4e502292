import html.parser
import json
import os

import numpy as np
import pytest
from PIL import Image

from fgkeras import cli, configs, experiments
from fgkeras.viz import gallery, write_report

CHROMIUM, CHROMEDRIVER = "/usr/bin/chromium", "/usr/bin/chromedriver"


@pytest.fixture(scope="module")
def exported_run(tmp_path_factory):
    """A smoke demo (batch-hard and HTG with keypoint maps), exported, and its report."""
    run_dir = str(tmp_path_factory.mktemp("run") / "demo")
    config = configs.override(configs.smoke(configs.get_config("demo")), ["model.kpm=true", "train.steps_per_epoch=2"])
    experiments.run_demo(config, run_dir, methods=("triplet_batch_hard", "htg"), export=True, verbose=0)
    return run_dir, write_report(run_dir, verbose=False)


@pytest.fixture(scope="module")
def evaluated_run(exported_run, tmp_path_factory):
    """`fgkeras evaluate --out` of the demo's HTG embedder: a run directory without an export."""
    source, _ = exported_run
    run_dir = str(tmp_path_factory.mktemp("evaluated") / "run")
    assert cli.main(["evaluate", "--config", "demo", "--smoke", "--set", "model.kpm=true", "--model",
                     os.path.join(source, "embedders", "htg.keras"), "--out", run_dir]) == 0
    return run_dir


class _Page(html.parser.HTMLParser):
    """The report's images (src, alt, the caption of their figure), links, sections and table cells."""

    def __init__(self, text):
        super().__init__()
        self.images, self.links, self.sections, self.cells = [], [], [], {}
        self._figure, self._caption, self._row, self._cell = None, None, None, None
        self.feed(text)

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "figure":
            self._figure = {"images": [], "caption": ""}
        elif tag == "img":
            image = {"src": attrs.get("src"), "alt": attrs.get("alt") or "", "in_figure": self._figure is not None}
            self.images.append(image)
            if self._figure is not None:
                self._figure["images"].append(image)
        elif tag == "figcaption":
            self._caption = []
        elif tag in ("a", "link", "script") and (attrs.get("href") or attrs.get("src")):
            self.links.append(attrs.get("href") or attrs.get("src"))
        elif tag == "section":
            self.sections.append(attrs.get("id"))
        elif tag == "tr" and "data-method" in attrs:
            self._row = attrs["data-method"]
        elif tag == "td" and self._row and "data-metric" in attrs:
            self._cell = attrs["data-metric"]
            self.cells.setdefault(self._row, {})[self._cell] = ""

    def handle_endtag(self, tag):
        if tag == "figcaption":
            self._figure["caption"] = "".join(self._caption).strip()
            self._caption = None
        elif tag == "figure":
            for image in self._figure["images"]:
                image["caption"] = self._figure["caption"]
            self._figure = None
        elif tag == "td":
            self._cell = None
        elif tag == "tr":
            self._row = None

    def handle_data(self, data):
        if self._caption is not None:
            self._caption.append(data)
        if self._cell is not None:
            self.cells[self._row][self._cell] += data.strip()


def _page(path):
    with open(path, encoding="utf-8") as f:
        return _Page(f.read())


def _assert_self_contained(path):
    page = _page(path)
    folder = os.path.dirname(path)
    assert page.images, "the report has no picture"
    for image in page.images:
        assert image["in_figure"] and image["alt"].strip() and image["caption"], image
        assert "://" not in image["src"] and os.path.isfile(os.path.join(folder, image["src"])), image["src"]
        with Image.open(os.path.join(folder, image["src"])) as picture:
            assert picture.width > 0 and picture.height > 0
    for link in page.links:
        assert link.startswith("#"), f"the report links outside itself: {link}"
    return page


def test_report_of_an_exported_run_has_every_part_and_only_existing_files(exported_run):
    _, path = exported_run
    page = _assert_self_contained(path)
    assert page.sections == ["metrics", "galleries", "stock", "open-set", "method", "projection", "inventory",
                             "export", "tflite"]
    sources = {image["src"] for image in page.images}
    assert {"recall_curves.png", "p_curves.png", "projection.png", "growing_inventory.png",
            "keypoints_htg.png"} <= sources
    assert "keypoints_triplet_batch_hard.png" not in sources  # no KPM branch: no keypoint picture


def test_metrics_table_shows_the_figures_of_results_json(exported_run):
    run_dir, path = exported_run
    with open(os.path.join(run_dir, "results.json")) as f:
        rows = json.load(f)["rows"]
    cells = _page(path).cells
    for row in rows:
        for metric in ("recall@1", "recall@2", "recall@8", "map@r"):
            assert cells[row["method"]][metric] == f"{100 * row[metric]:.1f}", (row["method"], metric)
    assert {"floor: pixels", "floor: colour histogram"} <= set(cells)


def test_gallery_marks_agree_with_the_test_labels(exported_run):
    run_dir, path = exported_run
    with open(os.path.join(run_dir, "results.json")) as f:
        config = configs.ExperimentConfig.from_dict(json.load(f)["config"])
    labels = experiments.load_data(config.data)[1].labels  # the truth, reloaded independently
    with open(os.path.join(os.path.dirname(path), "galleries.json")) as f:
        galleries = json.load(f)
    cell = gallery.default_cell_size(config.data.image_size)
    checked = 0
    for name in ("test", "stock"):  # both index the test set
        for group in galleries[name].values():
            with Image.open(os.path.join(os.path.dirname(path), group["file"])) as picture:
                pixels = np.asarray(picture.convert("RGB"))
            for row, (query, results, marks) in enumerate(zip(group["queries"], group["results"], group["correct"])):
                assert query not in results or name != "test"  # leave-one-out never finds the query
                for column, (result, mark) in enumerate(zip(results, marks)):
                    assert mark == (labels[result] == labels[query])
                    y, x = gallery.cell_origin(row, column + 1, cell)
                    assert tuple(pixels[y + 1, x + 1]) == (gallery.CORRECT if mark else gallery.INCORRECT)
                    checked += 1
        assert min(galleries[name]["best"]["average_precision"]) >= max(galleries[name]["worst"]["average_precision"])
    assert checked >= 2 * 3 * 3


def test_evaluate_out_saves_a_run_whose_report_has_no_export_section(evaluated_run, capsys):
    with open(os.path.join(evaluated_run, "results.json")) as f:
        results = json.load(f)
    assert results["method"] == "htg" and os.path.isfile(os.path.join(evaluated_run, results["embedder"]))
    assert cli.main(["report", evaluated_run, "--projector"]) == 0  # `fgkeras report RUN_DIR` rebuilds it
    path = os.path.join(evaluated_run, "report", "index.html")
    out = capsys.readouterr().out
    assert path in out and f"tensorboard --logdir {os.path.join(evaluated_run, 'projector')}" in out
    page = _assert_self_contained(path)
    assert "export" not in page.sections and "tflite" not in page.sections
    assert {"metrics", "galleries", "method"} <= set(page.sections)
    assert page.cells["htg"]["recall@1"] == f"{100 * results['metrics']['recall@1']:.1f}"
    _assert_projector_holds_the_test_embeddings(evaluated_run, results)


def _assert_projector_holds_the_test_embeddings(run_dir, results):
    import keras
    import tensorflow as tf
    from fgkeras import evaluation

    config = configs.ExperimentConfig.from_dict(results["config"])
    test_set = experiments.load_data(config.data)[1]
    embedder = keras.saving.load_model(os.path.join(run_dir, results["embedder"]), compile=False)
    expected = evaluation.embed_dataset(embedder, test_set.as_dataset(image_size=config.data.image_size,
                                                                      batch_size=32), verbose=0)
    log_dir = os.path.join(run_dir, "projector")
    reader = tf.train.load_checkpoint(tf.train.latest_checkpoint(log_dir))
    np.testing.assert_allclose(reader.get_tensor("embeddings/.ATTRIBUTES/VARIABLE_VALUE"), expected["embeddings"],
                               atol=1e-5)
    header, *rows = open(os.path.join(log_dir, "metadata.tsv")).read().splitlines()
    labels = [int(row.split("\t")[header.split("\t").index("label")]) for row in rows]
    assert labels == list(test_set.labels)
    assert os.path.isfile(os.path.join(log_dir, "sprite.png"))


def test_report_of_an_fggan_run_shows_gs_canonical_views(tmp_path):
    from fgkeras.models import fggan

    config = configs.smoke(configs.get_config("fggan_demo"))
    embedder = fggan.CanonicalEmbedder(fggan.build_generator(config.data.image_size, base_width=4),
                                       experiments.build_embedder(config))
    embedder(np.zeros((1, config.data.image_size, config.data.image_size, 3), np.float32))
    run_dir = str(tmp_path / "fggan")
    saved = experiments.save_embedder(embedder, run_dir)  # untrained: the report draws, whatever G makes
    with open(os.path.join(run_dir, "results.json"), "w") as f:
        json.dump({"config": config.to_dict(), "method": "fggan", "metrics": {"recall@1": 0.5}, "embedder": saved}, f)
    page = _assert_self_contained(write_report(run_dir, verbose=False))
    assert "canonical_fggan.png" in {image["src"] for image in page.images}
    assert not any(image["src"].startswith("keypoints_") for image in page.images)


def test_report_of_a_viewgan_run_shows_its_view_grid_alone(tmp_path):
    run_dir = tmp_path / "viewgan"
    run_dir.mkdir()
    Image.fromarray(np.full((20, 30, 3), 128, np.uint8)).save(run_dir / "view_grid.png")
    (run_dir / "results.json").write_text(json.dumps({"identity": {}, "grid": str(run_dir / "view_grid.png")}))
    (run_dir / "few_shot.md").write_text("| setting | with augmentation % |\n| 8-way 5-shot | 12.8 <b> |\n")
    path = write_report(str(run_dir))
    page = _assert_self_contained(path)
    assert page.sections == ["few-shot", "method"] and [image["src"] for image in page.images] == ["view_grid.png"]
    assert "12.8 &lt;b&gt;" in open(path, encoding="utf-8").read()  # shown as text, escaped


def test_a_directory_without_results_json_is_refused_with_how_to_make_one(tmp_path, capsys):
    with pytest.raises(ValueError, match=r"no results\.json.*fgkeras demo --out"):
        write_report(str(tmp_path))
    assert cli.main(["report", str(tmp_path)]) == 2
    assert "fgkeras report: error:" in capsys.readouterr().err
    assert not os.path.exists(tmp_path / "report")


def _chromium_driver():
    if not (os.path.exists(CHROMIUM) and os.path.exists(CHROMEDRIVER)):
        pytest.skip(f"no headless browser: {CHROMIUM} and {CHROMEDRIVER} come with Debian's `chromium` and "
                    "`chromium-driver` packages (apt-get install -y chromium chromium-driver)")
    webdriver = pytest.importorskip("selenium.webdriver", reason="selenium is in the `test` extra")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for argument in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"):
        options.add_argument(argument)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    return webdriver.Chrome(options=options, service=webdriver.ChromeService(executable_path=CHROMEDRIVER))


def test_report_opens_in_headless_chromium_with_every_image_loaded(exported_run):
    _, path = exported_run
    driver = _chromium_driver()
    try:
        driver.get("file://" + os.path.abspath(path))
        images = driver.execute_script(
            "return Array.from(document.images).map(i => [i.getAttribute('src'), i.complete, i.naturalWidth]);")
        errors = [entry for entry in driver.get_log("browser") if entry["level"] == "SEVERE"]
    finally:
        driver.quit()
    assert len(images) == len(_page(path).images) > 0
    broken = [src for src, complete, width in images if not complete or width == 0]
    assert not broken, f"images that did not load: {broken}"
    assert not errors, errors
