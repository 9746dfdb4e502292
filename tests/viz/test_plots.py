import numpy as np
from PIL import Image

from fgkeras.viz import plots


def test_metric_curves_draw_the_rows_that_have_the_metric_and_nothing_without(tmp_path):
    rows = [{"method": "a", "recall@1": 0.5, "recall@4": 0.9}, {"method": "b", "map@r": 0.2}]
    path = plots.metric_curves(rows, "recall", str(tmp_path / "recall.png"), "Recall@K")
    with Image.open(path) as image:
        assert image.format == "PNG" and image.width > 100
    assert plots.metric_curves(rows, "p", str(tmp_path / "p.png"), "P@k") is None
    assert not (tmp_path / "p.png").exists()


def test_embedding_projection_reports_the_variance_its_two_components_explain(tmp_path):
    rng = np.random.default_rng(0)
    flat = np.concatenate([rng.normal(size=(30, 2)) * 10, rng.normal(size=(30, 6)) * 0.01], axis=1)
    _, explained = plots.embedding_projection(flat, np.arange(30) % 3, str(tmp_path / "p.png"), "PCA")
    assert explained > 0.99
    _, explained = plots.embedding_projection(rng.normal(size=(200, 8)), np.arange(200) % 4,
                                              str(tmp_path / "q.png"), "PCA")
    assert explained < 0.6


def test_growing_inventory_curve_writes_a_png(tmp_path):
    rows = [{"year": 2001, "num_classes": 2, "recall@1": 0.5, "map@r": 0.3},
            {"year": 2002, "num_classes": 4, "recall@1": 0.25, "map@r": 0.1}]
    with Image.open(plots.growing_inventory_curve(rows, str(tmp_path / "g.png"), "inventory")) as image:
        assert image.format == "PNG"
