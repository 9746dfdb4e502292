"""Procedural vehicle renderer behind `SyntheticVehicles`: parametric 3-D parts, numpy + Pillow.

A vehicle is designed in two levels: a *make* fixes the body style and proportions, a *model*
fixes the small parts (wheels, cabin length and height, lights, grille, spoiler, roof rack,
stripe, windows, mirrors, tail lights). `build_vehicle` turns a (make, model) design into a
`Mesh` of planar polygons once; `render_photo` draws that mesh for one photo with a perspective
camera, back-face culling, Lambert shading and the painter's algorithm.

Coordinates: x to the vehicle's right, y up, z forward (the front bumper is at z = length / 2);
the ground is the plane y = 0. Lengths are in metres.
"""

import colorsys
import dataclasses
import functools

import numpy as np
from PIL import Image, ImageDraw

# Draw layers, back to front. The body is solid, so a visible body face is always in front of a
# wheel it overlaps on screen; the inside of a wheel arch is always behind its wheel; and the
# camera is above every roof, so nothing above the belt line is ever hidden by the body.
SHADOW, WELL, WHEEL, BODY, UPPER = range(5)

# Deformation groups for the per-instance shape jitter (`Mesh.deform`).
FIXED, CABIN, ABOVE_BELT = range(3)

# Paint modes of a face: a fixed colour, the instance's paint, or a colour contrasting with it.
FIXED_COLOUR, PAINT, CONTRAST = range(3)

BODY_STYLES = ("sedan", "hatchback", "suv", "wagon", "coupe", "van", "pickup", "sports")

# Base proportions of each body style (metres). `hood`: front end to the windscreen base;
# `deck`: rear end to the cabin's rear base; `rake_f` / `rake_r`: horizontal run of the
# windscreen / rear window; `tail`: height of the rear face.
_STYLE_GEOMETRY = {
    "sedan": dict(length=4.6, width=1.80, clearance=0.30, belt=0.95, nose=0.70, tail=0.88,
                  wheel=0.33, overhang_f=0.90, overhang_r=1.00, hood=1.35, deck=1.05,
                  cabin_h=0.50, rake_f=0.60, rake_r=0.50),
    "hatchback": dict(length=4.0, width=1.75, clearance=0.30, belt=0.93, nose=0.70, tail=0.90,
                      wheel=0.32, overhang_f=0.80, overhang_r=0.65, hood=1.10, deck=0.10,
                      cabin_h=0.55, rake_f=0.60, rake_r=0.22),
    "suv": dict(length=4.6, width=1.90, clearance=0.42, belt=1.12, nose=0.95, tail=1.08,
                wheel=0.40, overhang_f=0.85, overhang_r=0.85, hood=1.30, deck=0.10,
                cabin_h=0.62, rake_f=0.50, rake_r=0.12),
    "wagon": dict(length=4.7, width=1.80, clearance=0.30, belt=0.95, nose=0.70, tail=0.92,
                  wheel=0.33, overhang_f=0.90, overhang_r=1.00, hood=1.35, deck=0.10,
                  cabin_h=0.52, rake_f=0.60, rake_r=0.15),
    "coupe": dict(length=4.5, width=1.85, clearance=0.25, belt=0.85, nose=0.60, tail=0.80,
                  wheel=0.32, overhang_f=0.90, overhang_r=0.90, hood=1.60, deck=0.85,
                  cabin_h=0.42, rake_f=0.65, rake_r=0.70),
    "van": dict(length=4.9, width=1.95, clearance=0.35, belt=1.00, nose=0.85, tail=0.98,
                wheel=0.34, overhang_f=0.70, overhang_r=0.80, hood=0.80, deck=0.08,
                cabin_h=0.95, rake_f=0.55, rake_r=0.05),
    "pickup": dict(length=5.2, width=1.95, clearance=0.45, belt=1.15, nose=1.00, tail=1.12,
                   wheel=0.40, overhang_f=0.90, overhang_r=1.20, hood=1.50, deck=2.00,
                   cabin_h=0.65, rake_f=0.45, rake_r=0.10),
    "sports": dict(length=4.3, width=1.95, clearance=0.20, belt=0.80, nose=0.52, tail=0.76,
                   wheel=0.33, overhang_f=0.95, overhang_r=0.95, hood=1.55, deck=0.95,
                   cabin_h=0.38, rake_f=0.75, rake_r=0.85),
}

# Small parts that tell the models of one make apart: name -> number of variants.
PARTS = {
    "wheel_size": 3,
    "spokes": 5,
    "rim_colour": 3,
    "cabin_length": 3,
    "cabin_height": 3,
    "headlights": 5,
    "grille": 5,
    "spoiler": 3,
    "roof_rack": 2,
    "stripe": 4,
    "windows": 2,
    "mirrors": 2,
    "tail_lights": 3,
}
# Parts visible on the canonical front view (stock photos): any two models differ in one of them.
# Not the wheel size: every wheel stands on the ground, so the tyre showing below the front
# bumper is the same for every size (two models differing only in it had identical stock photos).
FRONT_PARTS = ("cabin_height", "headlights", "grille", "roof_rack", "mirrors")

_SPOKES = (0, 3, 4, 5, 8)  # 0 = a plain dish
_RIMS = ((205, 205, 210), (60, 60, 66), (196, 166, 92))
_TRIMS = ((200, 200, 206), (48, 48, 52))
_GLASS = (38, 48, 62)
_TYRE = (30, 30, 32)
_DARK = (22, 22, 24)
_HEADLIGHT = (245, 244, 228)
_TAIL_LIGHT = (205, 30, 34)
_PLATE = (232, 232, 222)
_WHEEL_SIDES = 12


def make_design(rng, style):
    """Make-level design: body style, proportions jittered by +-6 %, trim and base parts."""
    geometry = {k: v * rng.uniform(0.94, 1.06) for k, v in _STYLE_GEOMETRY[style].items()}
    return {
        "style": style,
        "geometry": geometry,
        "hood_rise": rng.uniform(0.45, 0.8),   # hood front height, between nose and belt
        "nose_run": rng.uniform(0.08, 0.3),    # nose chamfer length
        "tail_run": rng.uniform(0.05, 0.25) if geometry["deck"] > 0.4 else 0.05,
        "taper": rng.uniform(0.08, 0.18),      # roof narrower than the cabin base (per side)
        "grille_frame": int(rng.integers(4)),  # rectangle, trapezoid, hexagon, split
        "grille_size": (rng.uniform(0.32, 0.5), rng.uniform(0.3, 0.5)),
        "trim": _TRIMS[int(rng.integers(len(_TRIMS)))],
        "parts": {name: int(rng.integers(n)) for name, n in PARTS.items()},
    }


def model_parts(rng, base, num_models, part_changes, min_part_differences, max_tries=2000):
    """Part choices of the models of one make: each differs from the make's base design in
    `part_changes` parts, any two in at least `min_part_differences` parts, one of them visible
    from the front."""
    names = list(PARTS)
    front = np.array([name in FRONT_PARTS for name in names])
    base_vector = np.array([base[name] for name in names])
    chosen = []
    for _ in range(max_tries):
        vector = base_vector.copy()
        for i in rng.choice(len(names), size=part_changes, replace=False):
            vector[i] = (vector[i] + rng.integers(1, PARTS[names[i]])) % PARTS[names[i]]
        if all(np.sum(vector != other) >= min_part_differences
               and np.any((vector != other) & front) for other in chosen):
            chosen.append(vector)
            if len(chosen) == num_models:
                return [dict(zip(names, map(int, v))) for v in chosen]
    raise ValueError(
        f"Cannot design {num_models} models per make that differ in at least "
        f"{min_part_differences} parts with part_changes={part_changes}: raise `part_changes` "
        f"or lower `min_part_differences` / `models_per_make`."
    )


def paint_colour(rng):
    """Instance paint: often white, black, silver or grey, otherwise any saturated hue."""
    if rng.random() < 0.45:
        grey = (235.0, 25.0, 185.0, 120.0)[int(rng.integers(4))] + rng.uniform(-12, 12)
        return np.full(3, np.clip(grey, 0, 255)) + rng.uniform(-4, 4, size=3)
    hue, sat, val = rng.random(), rng.uniform(0.45, 0.95), rng.uniform(0.35, 0.95)
    return 255.0 * np.array(colorsys.hsv_to_rgb(hue, sat, val))


class _MeshBuilder:
    """Collects planar faces (each with its own vertices) and the decals painted on them."""

    def __init__(self):
        self.points, self.faces = [], []
        self._num_points = 0

    def _add_points(self, points):
        points = np.asarray(points, dtype=np.float64)
        start = self._num_points
        self.points.append(points)
        self._num_points += len(points)
        return start, points

    def face(self, points, normal, colour, layer, anchor=None, mode=FIXED_COLOUR, shading=1.0,
             group=FIXED, rank=0):
        start, points = self._add_points(points)
        centre = points.mean(axis=0)
        colour = (0, 0, 0) if colour is None else colour
        index = len(self.faces)
        self.faces.append(dict(
            start=start, count=len(points), normal=np.asarray(normal),
            centre=centre, anchor=centre if anchor is None else np.asarray(anchor), layer=layer,
            rank=rank, parent=index, order=0, mode=mode, colour=colour, shading=shading,
            group=group,
        ))
        return index

    def decal(self, parent, points, colour, mode=FIXED_COLOUR, shading=1.0):
        """A polygon painted on face `parent`: drawn right after it, only when it is visible."""
        start, points = self._add_points(points)
        colour = (0, 0, 0) if colour is None else colour
        self.faces.append(dict(
            self.faces[parent], start=start, count=len(points), order=len(self.faces),
            mode=mode, colour=colour, shading=shading,
        ))

    def solid(self, points, faces, colour, layer, **kwargs):
        """A convex solid: outward normals from the solid's centre. Returns the face indices."""
        points = np.asarray(points, dtype=np.float64)
        middle = points.mean(axis=0)
        anchor = kwargs.pop("anchor", middle)
        indices = []
        for face in faces:
            p = points[list(face)]
            normal = np.cross(p[1] - p[0], p[2] - p[0])
            normal /= np.linalg.norm(normal)
            if normal @ (p.mean(axis=0) - middle) < 0:
                normal = -normal
            indices.append(self.face(p, normal, colour, layer, anchor=anchor, **kwargs))
        return indices

    def box(self, centre, half, colour, layer, **kwargs):
        signs = np.array([[sx, sy, sz] for sx in (-1, 1) for sy in (-1, 1) for sz in (-1, 1)])
        points = np.asarray(centre) + signs * np.asarray(half)
        faces = ((0, 1, 3, 2), (4, 5, 7, 6), (0, 1, 5, 4), (2, 3, 7, 6), (0, 2, 6, 4), (1, 3, 7, 5))
        return self.solid(points, faces, colour, layer, **kwargs)

    def build(self):
        def column(key, dtype):
            return np.array([face[key] for face in self.faces], dtype=dtype)

        group = column("group", np.int8)
        counts = column("count", np.int64)
        return Mesh(
            points=np.concatenate(self.points), starts=column("start", np.int64), counts=counts,
            normals=column("normal", np.float64), centres=column("centre", np.float64),
            anchors=column("anchor", np.float64), layer=column("layer", np.int64),
            rank=column("rank", np.int64), parent=column("parent", np.int64),
            order=column("order", np.int64), mode=column("mode", np.int8),
            colour=column("colour", np.float64), shading=column("shading", np.float64),
            point_group=np.repeat(group, counts), face_group=group,
        )


@dataclasses.dataclass
class Mesh:
    """A vehicle as arrays of planar faces; decals share the normal, centre and anchor of the
    face they are painted on."""

    points: np.ndarray       # (V, 3) vertices, face i owns points[starts[i]:starts[i] + counts[i]]
    starts: np.ndarray       # (F,)
    counts: np.ndarray       # (F,)
    normals: np.ndarray      # (F, 3) outward unit normals
    centres: np.ndarray      # (F, 3) face centres (visibility, depth order within an object)
    anchors: np.ndarray      # (F, 3) object centres (depth order between objects)
    layer: np.ndarray        # (F,) draw layer
    rank: np.ndarray         # (F,) order between objects sharing an anchor (roof rack on cabin)
    parent: np.ndarray       # (F,) face a decal is painted on (itself for a face)
    order: np.ndarray        # (F,) 0 for a face, increasing for its decals
    mode: np.ndarray         # (F,) FIXED_COLOUR, PAINT or CONTRAST
    colour: np.ndarray       # (F, 3) fixed colours
    shading: np.ndarray      # (F,) 0 = flat colour, 1 = full Lambert shading
    point_group: np.ndarray  # (V,) deformation group of each vertex
    face_group: np.ndarray   # (F,)
    belt: float = 0.0
    cabin_z: float = 0.0

    def deform(self, scale, cabin_height, cabin_length):
        """Instance jitter: scale the vehicle by (sx, sy, sz), stretch everything above the belt
        line by `cabin_height` and the cabin (with its glass, mirrors, rack) by `cabin_length`.
        Returns the deformed (points, centres, anchors)."""
        points = np.concatenate([self.points, self.centres, self.anchors]) * scale
        group = np.concatenate([self.point_group, self.face_group, self.face_group])
        belt, middle = self.belt * scale[1], self.cabin_z * scale[2]
        upper = group != FIXED
        points[upper, 1] = belt + (points[upper, 1] - belt) * cabin_height
        cabin = group == CABIN
        points[cabin, 2] = middle + (points[cabin, 2] - middle) * cabin_length
        v, f = len(self.points), len(self.centres)
        return points[:v], points[v:v + f], points[v + f:]


def _circle(cx, cy, rx, ry, n=10):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], axis=1)


def _rect(x0, y0, x1, y1):
    return np.array([[x0, y0], [x1, y0], [x1, y1], [x0, y1]], dtype=np.float64)


def _on_plane(points_2d, axis, value, offset=(0.0, 0.0)):
    """Lift 2-D polygon points (+ offset) onto an axis-aligned plane: on the plane z = value
    they are (x, y), on the plane x = value they are (z, y)."""
    p = np.asarray(points_2d, dtype=np.float64) + offset
    if axis == "z":
        return np.stack([p[:, 0], p[:, 1], np.full(len(p), value)], axis=1)
    return np.stack([np.full(len(p), value), p[:, 1], p[:, 0]], axis=1)


def _on_quad(quad, u0, u1, v0, v1):
    """Sub-quad [u0, u1] x [v0, v1] of a planar quad given as corners (0,0), (1,0), (1,1), (0,1)."""
    q0, q1, q2, q3 = quad
    uv = np.array([[u0, v0], [u1, v0], [u1, v1], [u0, v1]])[:, :, None]
    u, v = uv[:, 0], uv[:, 1]
    return (1 - u) * (1 - v) * q0 + u * (1 - v) * q1 + u * v * q2 + (1 - u) * v * q3


def build_vehicle(make, parts, part_scale=1.0):
    """The mesh of one model: the make's body with the model's `parts` (a dict of PARTS choices).

    `part_scale` multiplies the size of the continuous part differences (wheel size, cabin
    length and height) between models."""
    g = make["geometry"]
    length, width = g["length"], g["width"]
    zf, zr, half_w = length / 2, -length / 2, width / 2
    y0, belt = g["clearance"], g["belt"]
    radius = g["wheel"] * (1 + 0.09 * part_scale * (parts["wheel_size"] - 1))
    arch = radius * 1.12 + 0.02
    belt = max(belt, radius + arch + 0.06)
    nose, tail = min(g["nose"], belt - 0.04), min(g["tail"], belt - 0.02)
    cabin_h = g["cabin_h"] * (1 + 0.12 * part_scale * (parts["cabin_height"] - 1))
    cab_r = zr + g["deck"]
    cowl = zf - g["hood"]
    cowl -= 0.12 * part_scale * (parts["cabin_length"] - 1) * (cowl - cab_r)
    hood_y = nose + make["hood_rise"] * (belt - nose)
    nose_z = zf - make["nose_run"]
    tail_z = zr + min(make["tail_run"], 0.8 * g["deck"])
    axles = (zr + g["overhang_r"], zf - g["overhang_f"])
    b = _MeshBuilder()

    # Ground shadow.
    footprint = _rect(zr - 0.08, -half_w - 0.06, zf + 0.08, half_w + 0.06)
    b.face(np.stack([footprint[:, 1], np.full(4, 0.002), footprint[:, 0]], axis=1),
           (0, 1, 0), (0, 0, 0), SHADOW)

    # Body: a side profile in (z, y), counter-clockwise, with a notch over each wheel,
    # extruded across the width.
    top = [(zf, y0), (zf, nose), (nose_z, hood_y), (cowl, belt), (tail_z, belt), (zr, tail),
           (zr, y0)]
    alpha = np.arcsin(np.clip((y0 - radius) / arch, -1, 1))
    notches = [np.stack([za + arch * np.cos(t), radius + arch * np.sin(t)], axis=1)
               for za in axles for t in [np.linspace(np.pi - alpha, alpha, 8)]]
    profile = np.concatenate([np.array(top)] + notches)
    edges = np.roll(profile, -1, axis=0) - profile
    n_top = len(top) - 1
    faces_by_edge = {}
    for i, (start, edge) in enumerate(zip(profile, edges)):
        z0, y_0 = start
        z1, y_1 = start + edge
        normal = np.array([0.0, -edge[0], edge[1]])
        norm = np.linalg.norm(normal)
        if norm < 1e-9 or (i >= n_top and normal[1] < -0.999):
            continue  # the flat underside is never seen from above
        quad = [(-half_w, y_0, z0), (half_w, y_0, z0), (half_w, y_1, z1), (-half_w, y_1, z1)]
        if i < n_top:
            faces_by_edge[i] = b.face(quad, normal / norm, None, BODY, mode=PAINT)
        else:  # inside of a wheel arch
            b.face(quad, normal / norm, _DARK, WELL, shading=0.3)
    sides = {s: b.face(_on_plane(profile, "x", s * half_w), (s, 0, 0), None, BODY, mode=PAINT)
             for s in (-1, 1)}
    front, rear, deck = faces_by_edge[0], faces_by_edge[5], faces_by_edge[3]

    _front_details(b, front, make, parts, half_w, y0, nose, zf)
    _rear_details(b, rear, parts, half_w, y0, tail, zr)
    for s, face in sides.items():
        _stripe(b, face, parts["stripe"], s * half_w, zr, zf, axles, arch, radius, y0, belt)
    if make["style"] == "pickup":
        bed = _rect(tail_z + 0.06, -half_w + 0.1, cab_r - 0.06, half_w - 0.1)
        b.decal(deck, np.stack([bed[:, 1], np.full(4, belt), bed[:, 0]], axis=1), (58, 58, 60))

    # Wheels: 12-sided cylinders, the outer face carries the rim.
    rim = _RIMS[parts["rim_colour"]]
    spokes = _SPOKES[parts["spokes"]]
    tyre_w = 0.1 + 0.04 * g["wheel"]
    for za in axles:
        for s in (-1, 1):
            _wheel(b, s, s * (half_w - 0.03 - tyre_w), za, radius, tyre_w, rim, spokes)

    # Cabin: a loft from the base on the belt line to a narrower, shorter roof.
    wb = half_w - 0.06
    wr = wb - make["taper"]
    roof_y = belt + cabin_h
    roof_f, roof_r = cowl - g["rake_f"], cab_r + g["rake_r"]
    if roof_f - roof_r < 0.3:
        roof_f, roof_r = (cowl + cab_r) / 2 + 0.15, (cowl + cab_r) / 2 - 0.15
    corners = np.array([
        (-wb, belt, cab_r), (wb, belt, cab_r), (wb, belt, cowl), (-wb, belt, cowl),
        (-wr, roof_y, roof_r), (wr, roof_y, roof_r), (wr, roof_y, roof_f), (-wr, roof_y, roof_f),
    ])
    cabin_anchor = corners.mean(axis=0)
    # windscreen, rear window, left, right, roof; each quad from (u, v) = (0, 0).
    quads = ((3, 2, 6, 7), (1, 0, 4, 5), (0, 3, 7, 4), (2, 1, 5, 6), (7, 6, 5, 4))
    cabin = b.solid(corners, quads, None, UPPER, mode=PAINT, group=CABIN)
    b.decal(cabin[0], _on_quad(corners[list(quads[0])], 0.07, 0.93, 0.06, 0.9), _GLASS, shading=0.5)
    b.decal(cabin[1], _on_quad(corners[list(quads[1])], 0.1, 0.9, 0.12, 0.86), _GLASS, shading=0.5)
    n_windows = 2 + parts["windows"]
    for face, quad in ((cabin[2], quads[2]), (cabin[3], quads[3])):
        side = corners[list(quad)]
        if quad == quads[3]:  # right side runs front to back: flip so u goes rear to front
            side = side[[1, 0, 3, 2]]
        cuts = np.linspace(0.05, 0.95, n_windows + 1)
        for u0, u1 in zip(cuts[:-1], cuts[1:]):
            b.decal(face, _on_quad(side, u0 + 0.03, u1 - 0.03, 0.12, 0.86), _GLASS, shading=0.5)

    # Mirrors at the windscreen base.
    small = parts["mirrors"] == 0
    half = (0.07, 0.045, 0.05) if small else (0.1, 0.075, 0.06)
    for s in (-1, 1):
        b.box((s * (wb + half[0] + 0.02), belt + 0.1, cowl - 0.22 * g["rake_f"] - 0.04), half,
              None, UPPER, mode=PAINT, group=CABIN)

    if parts["roof_rack"]:
        rail_l = 0.42 * (roof_f - roof_r)
        mid = (roof_f + roof_r) / 2
        for s in (-1, 1):
            b.box((s * (wr - 0.08), roof_y + 0.05, mid), (0.03, 0.03, rail_l), (40, 40, 42),
                  UPPER, anchor=cabin_anchor, rank=1, group=CABIN)
        for t in (-0.6, 0.6):
            b.box((0, roof_y + 0.1, mid + t * rail_l), (wr - 0.04, 0.02, 0.035), (40, 40, 42),
                  UPPER, anchor=cabin_anchor, rank=1, group=CABIN)

    _spoiler(b, parts["spoiler"], g, half_w, wr, belt, roof_y, roof_r, zr, tail_z,
             cabin_anchor)

    mesh = b.build()
    mesh.belt = belt
    mesh.cabin_z = float(cabin_anchor[2])
    return mesh


def _wheel(b, side, x_in, za, radius, tyre_w, rim, spokes):
    t = np.linspace(0, 2 * np.pi, _WHEEL_SIDES, endpoint=False)
    ring = np.stack([radius * np.cos(t), radius * np.sin(t)], axis=1)
    x_out = x_in + side * tyre_w
    points = np.concatenate([_on_plane(ring + (za, radius), "x", x) for x in (x_in, x_out)])
    n = _WHEEL_SIDES
    faces = [tuple(range(n)), tuple(range(n, 2 * n))]
    faces += [(i, (i + 1) % n, n + (i + 1) % n, n + i) for i in range(n)]
    outer = b.solid(points, faces, _TYRE, WHEEL, shading=0.6)[1]
    on_face = functools.partial(_on_plane, axis="x", value=x_out, offset=(za, radius))
    b.decal(outer, on_face(_circle(0, 0, 0.7 * radius, 0.7 * radius, 12)), rim, shading=0.7)
    if spokes:
        step = 2 * np.pi / spokes
        for k in range(spokes):
            a = np.linspace(k * step + 0.22 * step, (k + 1) * step - 0.22 * step, 3)
            inner, outer_r = 0.25 * radius, 0.6 * radius
            hole = np.concatenate([
                np.stack([outer_r * np.cos(a), outer_r * np.sin(a)], axis=1),
                np.stack([inner * np.cos(a[::-1]), inner * np.sin(a[::-1])], axis=1),
            ])
            b.decal(outer, on_face(hole), _DARK, shading=0.2)
    else:
        ring = _circle(0, 0, 0.5 * radius, 0.5 * radius, 12)
        b.decal(outer, on_face(ring), tuple(0.75 * np.array(rim)), shading=0.7)
    b.decal(outer, on_face(_circle(0, 0, 0.14 * radius, 0.14 * radius, 8)), _DARK, shading=0.3)


def _front_details(b, front, make, parts, half_w, y0, nose, zf):
    h = nose - y0
    on = functools.partial(_on_plane, axis="z", value=zf)
    # Grille: the frame is the make's signature, the pattern is the model's.
    gw, gh = make["grille_size"][0] * half_w * 2, make["grille_size"][1] * h
    gy = y0 + 0.45 * h
    x0, x1, y_lo, y_hi = -gw / 2, gw / 2, gy - gh / 2, gy + gh / 2
    frame = make["grille_frame"]
    if frame == 0:
        pieces = [_rect(x0, y_lo, x1, y_hi)]
    elif frame == 1:
        pieces = [np.array([[x0 * 0.75, y_lo], [x1 * 0.75, y_lo], [x1, y_hi], [x0, y_hi]])]
    elif frame == 2:
        pieces = [np.array([[x0 * 0.7, y_lo], [x1 * 0.7, y_lo], [x1, gy], [x1 * 0.8, y_hi],
                            [x0 * 0.8, y_hi], [x0, gy]])]
    else:
        pieces = [_rect(x0, y_lo, -0.04, y_hi), _rect(0.04, y_lo, x1, y_hi)]
    trim = make["trim"]
    b.decal(front, on(_rect(x0 - 0.04, y_lo - 0.04, x1 + 0.04, y_hi + 0.04)), trim, shading=0.5)
    for piece in pieces:
        b.decal(front, on(piece), _DARK, shading=0.2)
    pattern = parts["grille"]
    bx0, bx1, by0, by1 = x0 * 0.82, x1 * 0.82, y_lo + 0.15 * gh, y_hi - 0.15 * gh
    bar = 0.018
    if pattern in (1, 3):  # horizontal bars
        for y in np.linspace(by0, by1, 3):
            b.decal(front, on(_rect(bx0, y - bar, bx1, y + bar)), trim, shading=0.5)
    if pattern in (2, 3):  # vertical bars
        for x in np.linspace(bx0, bx1, 5 if pattern == 2 else 4):
            b.decal(front, on(_rect(x - bar, by0, x + bar, by1)), trim, shading=0.5)
    if pattern == 4:  # dots
        for x in np.linspace(bx0, bx1, 4):
            for y in (by0, by1):
                b.decal(front, on(_rect(x - 0.035, y - 0.03, x + 0.035, y + 0.03)), trim,
                        shading=0.5)
    # Lower air intake.
    b.decal(front, on(_rect(-0.55 * half_w, y0 + 0.04, 0.55 * half_w, y0 + 0.1)), _DARK,
            shading=0.2)
    # Headlights.
    shape = parts["headlights"]
    ly = y0 + 0.7 * h
    for s in (-1, 1):
        lx = s * (half_w - 0.3)
        if shape == 0:
            lights = [_circle(lx, ly, 0.12, 0.1)]
        elif shape == 1:
            lights = [_rect(lx - 0.18, ly - 0.07, lx + 0.18, ly + 0.07)]
        elif shape == 2:  # slanted slit
            lights = [np.array([[lx - s * 0.24, ly - 0.03], [lx + s * 0.2, ly + 0.01],
                                [lx + s * 0.2, ly + 0.06], [lx - s * 0.24, ly + 0.02]])]
        elif shape == 3:  # twin round
            lights = [_circle(lx - 0.1, ly, 0.075, 0.075, 8), _circle(lx + 0.1, ly, 0.075, 0.075, 8)]
        else:  # trapezoid, wide outside
            lights = [np.array([[lx - s * 0.14, ly - 0.04], [lx + s * 0.2, ly - 0.08],
                                [lx + s * 0.2, ly + 0.08], [lx - s * 0.14, ly + 0.05]])]
        for light in lights:
            b.decal(front, on(light), _HEADLIGHT, shading=0.15)


def _rear_details(b, rear, parts, half_w, y0, tail, zr):
    h = tail - y0
    on = functools.partial(_on_plane, axis="z", value=zr)
    ly = y0 + 0.72 * h
    shape = parts["tail_lights"]
    if shape == 0:  # full-width bar
        lights = [_rect(-half_w + 0.08, ly - 0.04, half_w - 0.08, ly + 0.04)]
    elif shape == 1:  # corner blocks
        lights = [_rect(s * (half_w - 0.28) - 0.2, ly - 0.09, s * (half_w - 0.28) + 0.2, ly + 0.07)
                  for s in (-1, 1)]
    else:  # two round lights a side
        lights = [_circle(s * (half_w - d), ly, 0.07, 0.07, 8) for s in (-1, 1) for d in (0.18, 0.38)]
    for light in lights:
        b.decal(rear, on(light), _TAIL_LIGHT, shading=0.3)
    b.decal(rear, on(_rect(-0.26, y0 + 0.3 * h, 0.26, y0 + 0.3 * h + 0.12)), _PLATE, shading=0.4)


def _stripe(b, side, kind, x, zr, zf, axles, arch, radius, y0, belt):
    if kind == 0:
        return
    top = radius + arch + 0.03
    bands = []
    if kind in (1, 3) and belt - 0.05 - top >= 0.06:  # along the belt line
        hi = belt - 0.05
        bands.append((zr + 0.1, hi - 0.07, zf - 0.15, hi))
        if kind == 3 and hi - 0.11 - top >= 0.04:  # a second, thinner one below
            bands.append((zr + 0.1, hi - 0.14, zf - 0.15, hi - 0.11))
    if kind == 2 or not bands:  # along the sill, between the wheel arches
        dz = np.sqrt(max(arch ** 2 - (y0 + 0.09 - radius) ** 2, 0.0)) + 0.05
        bands.append((axles[0] + dz, y0 + 0.015, axles[1] - dz, y0 + 0.09))
    for z0, ya, z1, yb in bands:
        b.decal(side, _on_plane(_rect(z0, ya, z1, yb), "x", x), None, mode=CONTRAST, shading=1.0)


def _spoiler(b, kind, g, half_w, wr, belt, roof_y, roof_r, zr, tail_z, cabin_anchor):
    if kind == 0:
        return
    if g["deck"] > 0.4:  # on the boot lid
        if kind == 1:
            b.box((0, belt + 0.03, tail_z + 0.07), (half_w - 0.12, 0.03, 0.07), None, UPPER,
                  mode=PAINT, group=ABOVE_BELT)
        else:
            z = zr + 0.3
            b.box((0, belt + 0.24, z), (half_w - 0.04, 0.022, 0.13), None, UPPER, mode=PAINT,
                  group=ABOVE_BELT)
            for s in (-1, 1):
                b.box((s * (half_w - 0.4), belt + 0.11, z), (0.025, 0.11, 0.04), (40, 40, 42),
                      UPPER, group=ABOVE_BELT)
    else:  # at the rear edge of the roof
        if kind == 1:
            b.box((0, roof_y + 0.025, roof_r + 0.06), (wr, 0.025, 0.08), None, UPPER, mode=PAINT,
                  anchor=cabin_anchor, rank=1, group=CABIN)
        else:
            b.box((0, roof_y + 0.07, roof_r - 0.04), (wr + 0.03, 0.025, 0.16), (40, 40, 42), UPPER,
                  anchor=cabin_anchor, rank=1, group=CABIN)


@dataclasses.dataclass
class Photo:
    """Everything but the vehicle that defines one photo."""

    azimuth: float                # radians; 0 = camera in front of the vehicle
    elevation: float              # radians above the horizon
    fit: float                    # longer side of the vehicle's bounding box / image side
    shift: tuple = (0.0, 0.0)     # centre offset, fraction of the image side
    light_azimuth: float = 0.6    # relative to the camera, radians
    light_elevation: float = 0.9
    ambient: float = 0.42
    diffuse: float = 0.62
    distance: float = 14.0        # camera distance (m): mild perspective


def _camera(photo, target):
    ce, se = np.cos(photo.elevation), np.sin(photo.elevation)
    direction = np.array([np.sin(photo.azimuth) * ce, se, np.cos(photo.azimuth) * ce])
    position = target + photo.distance * direction
    forward = -direction
    right = np.cross(forward, (0.0, 1.0, 0.0))
    right /= np.linalg.norm(right)
    up = np.cross(right, forward)
    return position, np.stack([right, up, forward])


def draw_vehicle(image, mesh, paint, shape_jitter, photo):
    """Draw `mesh` on the Pillow `image` (RGB). `shape_jitter` = (scale(3,), cabin_height,
    cabin_length) for `Mesh.deform`. Returns the vehicle's bounding box (x0, y0, x1, y1) in
    pixels."""
    points, centres, anchors = mesh.deform(*shape_jitter)
    target = np.array([0.0, 0.4 * points[:, 1].max(), 0.0])
    position, basis = _camera(photo, target)
    cam = (points - position) @ basis.T
    screen = cam[:, :2] / cam[:, 2:3]
    screen[:, 1] *= -1
    low, high = screen.min(axis=0), screen.max(axis=0)
    size = image.size[0]
    scale = photo.fit * size / max(high - low)
    offset = size / 2 + np.asarray(photo.shift) * size - scale * (low + high) / 2
    screen = screen * scale + offset

    forward = basis[2]
    visible = np.einsum("ij,ij->i", mesh.normals, position - centres) > 0
    face_depth = (centres - position) @ forward
    object_depth = (anchors - position) @ forward
    order = np.lexsort((mesh.order, mesh.parent, -face_depth, mesh.rank, -object_depth,
                        mesh.layer))
    order = order[visible[order]]

    la, le = photo.azimuth + photo.light_azimuth, photo.elevation + photo.light_elevation
    light = np.array([np.sin(la) * np.cos(le), np.sin(le), np.cos(la) * np.cos(le)])
    lambert = photo.ambient + photo.diffuse * np.clip(mesh.normals @ light, 0, None)
    contrast = np.full(3, 40.0 if paint.mean() > 110 else 225.0)
    base = np.where((mesh.mode == PAINT)[:, None], paint,
                    np.where((mesh.mode == CONTRAST)[:, None], contrast, mesh.colour))
    factor = 1 - mesh.shading + mesh.shading * lambert
    colours = np.clip(base * factor[:, None], 0, 255).astype(np.int64).tolist()

    flat = screen.ravel().tolist()
    starts, ends = (2 * mesh.starts).tolist(), (2 * (mesh.starts + mesh.counts)).tolist()
    layer = mesh.layer.tolist()
    shaded = ImageDraw.Draw(image, "RGBA")
    plain = ImageDraw.Draw(image)
    for i in order.tolist():
        if layer[i] == SHADOW:
            shaded.polygon(flat[starts[i]:ends[i]], fill=(0, 0, 0, 80))
        else:
            plain.polygon(flat[starts[i]:ends[i]], fill=tuple(colours[i]))
    return (*(low * scale + offset), *(high * scale + offset))


def plain_background(size, colour=(234, 234, 234)):
    return Image.new("RGB", (size, size), colour)


def cluttered_background(rng, size, clutter=1.0):
    """A random scene: a smooth colour field, a ground plane below a horizon, random shapes."""
    field = rng.uniform(50, 210, size=(3, 3, 1)) + rng.uniform(-50, 50, size=(3, 3, 3))
    field = np.clip(field, 0, 255).astype(np.uint8)
    image = Image.fromarray(field, "RGB").resize((size, size), Image.BILINEAR)
    draw = ImageDraw.Draw(image, "RGBA")
    horizon = size * rng.uniform(0.35, 0.75)
    ground = np.clip(rng.uniform(40, 180) + rng.uniform(-25, 25, size=3), 0, 255)
    ground = tuple(int(c) for c in ground) + (int(200 * min(clutter, 1)),)
    draw.rectangle((0, horizon, size, size), fill=ground)
    for _ in range(rng.poisson(7 * clutter)):
        fill = tuple(int(c) for c in rng.integers(0, 256, size=3)) + (int(rng.integers(90, 256)),)
        x, y = rng.uniform(-0.1, 1.1, size=2) * size
        w, h = rng.uniform(0.04, 0.35, size=2) * size
        kind = rng.integers(3)
        if kind == 0:
            draw.rectangle((x, y, x + w, y + h), fill=fill)
        elif kind == 1:
            draw.ellipse((x, y, x + w, y + h), fill=fill)
        else:
            corners = rng.uniform(0, 1, size=(3, 2)) * (w, h) + (x, y)
            draw.polygon(corners.ravel().tolist(), fill=fill)
    return image


def occlude(rng, image, box):
    """Cover part of the vehicle's bounding box with an opaque rectangle or blob."""
    x0, y0, x1, y1 = box
    w, h = (x1 - x0) * rng.uniform(0.25, 0.5), (y1 - y0) * rng.uniform(0.3, 0.65)
    cx, cy = rng.uniform(x0, x1), rng.uniform(y0, y1)
    fill = tuple(int(c) for c in rng.integers(0, 256, size=3))
    draw = ImageDraw.Draw(image)
    if rng.random() < 0.5:
        draw.rectangle((cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2), fill=fill)
    else:
        angles = np.sort(rng.uniform(0, 2 * np.pi, size=7))
        radii = rng.uniform(0.6, 1.0, size=7)
        blob = np.stack([cx + w / 2 * radii * np.cos(angles), cy + h / 2 * radii * np.sin(angles)],
                        axis=1)
        draw.polygon(blob.ravel().tolist(), fill=fill)
