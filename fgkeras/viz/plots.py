"""Charts of a run (matplotlib, Agg canvas): Recall@K and P@k curves, a 2-D embedding
projection, the growing-inventory curve.

Every function draws on its own `matplotlib.figure.Figure` (never pyplot's global figures, so it
is safe in threads and needs no display) and writes a PNG; matplotlib is imported on first use.
"""

import io
import os
import re

import numpy as np

from fgkeras._files import write_atomic


def metric_curves(rows, prefix, path, title, names_key="method"):
    """One line per row: the row's `<prefix>@<n>` figures against n, in percent.

    Args:
        rows: result dicts (e.g. `results.json`'s rows), each with `names_key`.
        prefix: "recall" (Recall@K) or "p" (P@k).
        path: the PNG to write.
        title: the chart's title.
    Returns: `path`, or None when no row has a `<prefix>@<n>` figure.
    """
    pattern = re.compile(rf"^{re.escape(prefix)}@(\d+)$")
    figure, axes = _figure()
    drawn = set()
    for row in rows:
        points = sorted((int(m.group(1)), row[key]) for key in row if (m := pattern.match(key)))
        if not points:
            continue
        ks, values = zip(*points)
        axes.plot(ks, 100 * np.asarray(values, float), marker="o", label=str(row[names_key]))
        drawn.update(ks)
    if not drawn:
        return None
    axes.set_xscale("log", base=2)
    axes.set_xticks(sorted(drawn), [str(k) for k in sorted(drawn)])
    axes.set_xlabel("K" if prefix == "recall" else "k")
    axes.set_ylabel(f"{'Recall' if prefix == 'recall' else 'P'}@{'K' if prefix == 'recall' else 'k'} (%)")
    axes.set_ylim(0, 100)
    axes.set_title(title)
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _save(figure, path)


def embedding_projection(embeddings, labels, path, title, max_points=2000, seed=0):
    """A scatter of the embeddings' first two principal components (scikit-learn PCA), by class.

    At most `max_points` points (a seeded sample) are drawn. Returns `path` and the share of
    the variance the two components explain, `(path, explained)`.
    """
    from sklearn.decomposition import PCA

    embeddings, labels = np.asarray(embeddings, np.float32), np.asarray(labels)
    if len(embeddings) < 3:
        raise ValueError(f"A projection needs at least 3 embeddings. Received {len(embeddings)}")
    if len(embeddings) > max_points:
        keep = np.sort(np.random.default_rng(seed).choice(len(embeddings), max_points, replace=False))
        embeddings, labels = embeddings[keep], labels[keep]
    pca = PCA(n_components=2, random_state=seed)
    points = pca.fit_transform(embeddings)
    classes, codes = np.unique(labels, return_inverse=True)
    figure, axes = _figure()
    axes.scatter(points[:, 0], points[:, 1], c=codes, cmap="tab20" if len(classes) <= 20 else "turbo",
                 s=12, alpha=0.8, linewidths=0)
    axes.set_xlabel("principal component 1")
    axes.set_ylabel("principal component 2")
    axes.set_title(title)
    return _save(figure, path), float(pca.explained_variance_ratio_.sum())


def growing_inventory_curve(rows, path, title):
    """Recall@1 and MAP@R of each year's new arrivals (`growing_inventory` rows) against the year,
    with the inventory's size in classes on a second axis. Returns `path`."""
    years = [row["year"] for row in rows]
    figure, axes = _figure()
    for key, label in (("recall@1", "Recall@1"), ("map@r", "MAP@R")):
        if key in rows[0]:
            axes.plot(years, [100 * row[key] for row in rows], marker="o", label=label)
    axes.set_xlabel("release year (inventory holds every class released by then)")
    axes.set_ylabel("new arrivals' figure (%)")
    axes.set_ylim(0, 100)
    axes.set_xticks(years, [str(y) for y in years])
    sizes = axes.twinx()
    sizes.bar(years, [row["num_classes"] for row in rows], alpha=0.15, color="grey", label="classes")
    sizes.set_ylabel("classes in the inventory")
    axes.set_zorder(sizes.get_zorder() + 1)
    axes.patch.set_visible(False)
    axes.legend(fontsize="small", loc="lower left")
    axes.set_title(title)
    return _save(figure, path)


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6, 4), dpi=100, layout="constrained")
    return figure, figure.add_subplot()


def _save(figure, path):
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(figure)
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_atomic(path, buffer.getvalue())
    return path


__all__ = ["embedding_projection", "growing_inventory_curve", "metric_curves"]
