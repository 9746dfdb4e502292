"""Figures written as image files: keypoint-map overlays, canonical-view and view grids, retrieval
galleries (Pillow + numpy), charts (matplotlib), and the HTML report of a run (`write_report`)."""

from fgkeras.viz.canonical import canonical_grid, class_views
from fgkeras.viz.keypoints import keypoint_overlays
from fgkeras.viz.keypoints import overlay_heatmap
from fgkeras.viz.views import view_grid
from fgkeras.viz.gallery import gallery_image, pick_queries, rank_queries, write_gallery
from fgkeras.viz.report import write_report

__all__ = ["canonical_grid", "class_views", "gallery_image", "keypoint_overlays", "overlay_heatmap", "pick_queries",
           "rank_queries", "view_grid", "write_gallery", "write_report"]
