"""Figures written as image files (Pillow + numpy): keypoint-map overlays, …"""

from fgkeras.viz.canonical import canonical_grid, class_views
from fgkeras.viz.keypoints import keypoint_overlays
from fgkeras.viz.keypoints import overlay_heatmap
from fgkeras.viz.views import view_grid

__all__ = ["canonical_grid", "class_views", "keypoint_overlays", "overlay_heatmap", "view_grid"]
