"""Evaluation protocols of fine-grained search: closed set, open set, growing inventory.

Protocols take arrays (embeddings, labels, metadata), never models: embed once with
`embed_dataset`, then evaluate as many protocols as needed. Extra keyword arguments
(`recall_ks`, `map_ks`, `chunk_size`, ...) are passed on to `retrieval_metrics`.
A cross-domain search (stock photos as the gallery, user photos as queries) is
`retrieval_metrics` with a gallery.
"""

import math
from collections.abc import Mapping

import numpy as np

from fgkeras.evaluation.metrics import _as_embeddings, _as_labels, _check_same_dim, retrieval_metrics


def closed_set(embeddings, labels, **metric_kwargs):
    """Closed-set retrieval: leave-one-out among images of the training classes.

    Args:
        embeddings: (N, dim) embeddings, typically held-out images of training classes.
        labels: (N,) class labels.
        **metric_kwargs: passed on to `retrieval_metrics`.
    Returns:
        The `retrieval_metrics` dict.
    """
    return retrieval_metrics(embeddings, labels, **metric_kwargs)


def open_set(train_embeddings, train_labels, unseen_embeddings, unseen_labels, **metric_kwargs):
    """Open-set retrieval (FGGAN, Sec. 4.4): classes never seen in training.

    - `"seen"`: leave-one-out among the items of the training (seen) classes.
    - `"unseen"`: leave-one-out among the items of the unseen classes only.
    - `"mixed"`: every unseen item is a query against the inventory of seen *and*
      unseen items (itself excluded), so the seen classes act as distractors.

    Args:
        train_embeddings: (N_seen, dim) embeddings of items of the training classes.
        train_labels: (N_seen,) their labels.
        unseen_embeddings: (N_unseen, dim) embeddings of items of unseen classes.
        unseen_labels: (N_unseen,) their labels, disjoint from `train_labels`.
        **metric_kwargs: passed on to `retrieval_metrics`.
    Returns:
        `{"seen": metrics, "unseen": metrics, "mixed": metrics}`.
    """
    train = _as_embeddings(train_embeddings, "train_embeddings")
    train_labels = _as_labels(train_labels, "train_labels", len(train))
    unseen = _as_embeddings(unseen_embeddings, "unseen_embeddings")
    unseen_labels = _as_labels(unseen_labels, "unseen_labels", len(unseen))
    _check_same_dim(train, unseen, "train_embeddings", "unseen_embeddings")
    shared = np.intersect1d(train_labels, unseen_labels)
    if len(shared):
        raise ValueError(
            f"`unseen_labels` must not contain training classes. Received {len(shared)} shared "
            f"with `train_labels`, e.g. {shared[:5].tolist()}"
        )
    return {
        "seen": retrieval_metrics(train, train_labels, **metric_kwargs),
        "unseen": retrieval_metrics(unseen, unseen_labels, **metric_kwargs),
        "mixed": retrieval_metrics(
            unseen,
            unseen_labels,
            np.concatenate([train, unseen]),
            np.concatenate([train_labels, unseen_labels]),
            exclude_index=len(train) + np.arange(len(unseen)),
            **metric_kwargs,
        ),
    }


def growing_inventory(embeddings, labels, years, **metric_kwargs):
    """Retrieval in an inventory that grows by release year (FGGAN, Sec. 4.4, Fig. 4).

    For each year Y (ascending), the inventory holds every item whose class was
    released in year Y or before. The new arrivals — items of the classes released
    in year Y — are the queries, each searching the whole inventory so far with
    itself excluded. Earlier classes therefore act as distractors, more every year.

    Args:
        embeddings: (N, dim) embeddings.
        labels: (N,) class labels.
        years: (N,) release year of each item's class (the same for all the items
            of a class).
        **metric_kwargs: passed on to `retrieval_metrics`.
    Returns:
        One row per year, ascending: `{"year": Y, "num_classes": classes in the
        inventory, "num_items": items in the inventory, "num_queries": new arrivals
        used as queries (those with a relevant item), **metrics}`.
    """
    embeddings = _as_embeddings(embeddings, "embeddings")
    labels = _as_labels(labels, "labels", len(embeddings))
    years = _as_labels(years, "years", len(embeddings))
    classes, class_codes = np.unique(labels, return_inverse=True)
    class_year_pairs = np.unique(np.stack([class_codes, years], axis=1), axis=0)
    many_years = np.flatnonzero(np.bincount(class_year_pairs[:, 0].astype(np.int64)) > 1)
    if len(many_years):
        raise ValueError(
            "`years` must give one release year per class. Received several years for "
            f"{len(many_years)} classes, e.g. {classes[many_years[:5]].tolist()}"
        )
    rows = []
    for year in np.unique(years):
        inventory = np.flatnonzero(years <= year)
        arrivals = np.flatnonzero(years[inventory] == year)
        metrics = retrieval_metrics(
            embeddings[inventory[arrivals]],
            labels[inventory[arrivals]],
            embeddings[inventory],
            labels[inventory],
            exclude_index=arrivals,
            **metric_kwargs,
        )
        rows.append(
            {
                "year": year.item(),
                "num_classes": len(np.unique(labels[inventory])),
                "num_items": len(inventory),
                "num_queries": metrics.pop("num_queries"),
                **metrics,
            }
        )
    return rows


def format_table(rows, keys=None, headers=None, formats=None):
    """A Markdown table of results, metrics as percentages with one decimal.

    Floats are shown as percentages (0.8734 → `87.3`), ints and strings as they are,
    unless `formats` says otherwise for their column. A row without a column's key
    leaves that cell empty.

    Args:
        rows: one of
            - a mapping of row names to result dicts (`{"htg": metrics, "ohem": metrics}`,
              or the output of `open_set`): one named row per entry;
            - a sequence of result dicts (the output of `growing_inventory`);
            - a single result dict: one row.
        keys: the columns, in order. Default: every key, in order of first appearance.
        headers: a mapping of column keys to header texts. Default: the key itself.
        formats: a mapping of column keys to `str.format` patterns for their cells,
            e.g. `{"qps": "{:,.0f}", "ms": "{:.2f}", "share": "{:.0%}"}`.
    Returns:
        The table as a string, one line per row after the header lines.
    """
    if isinstance(rows, Mapping) and not any(isinstance(value, Mapping) for value in rows.values()):
        rows = [rows]
    if isinstance(rows, Mapping):
        names, rows = [str(name) for name in rows], list(rows.values())
    else:
        names, rows = None, list(rows)
    if not rows or not all(isinstance(row, Mapping) for row in rows):
        raise ValueError(
            f"`rows` must be a result dict, or a non-empty mapping or sequence of them. Received: {rows!r}"
        )
    if keys is None:
        keys = list(dict.fromkeys(key for row in rows for key in row))
    headers, formats = dict(headers or {}), dict(formats or {})
    for name, mapping in (("headers", headers), ("formats", formats)):
        unknown = [key for key in mapping if key not in keys]
        if unknown:
            raise ValueError(f"`{name}` must only name columns {list(keys)}. Received unknown keys: {unknown}")
    header = ([""] if names else []) + [str(headers.get(key, key)) for key in keys]
    lines = [header, ["---"] * len(header)]
    for i, row in enumerate(rows):
        cells = [_format_cell(row[key], formats.get(key)) if key in row else "" for key in keys]
        lines.append(([names[i]] if names else []) + cells)
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def _format_cell(value, pattern=None):
    if pattern is not None:
        return pattern.format(value)
    if isinstance(value, (float, np.floating)):
        return "nan" if math.isnan(value) else f"{100 * value:.1f}"
    return str(value)
