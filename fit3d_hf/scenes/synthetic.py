"""Procedural indoor rooms, ray-cast to RGB, metric depth and semantic labels.

A room is an axis-aligned box (walls, floor, ceiling) with furniture made of boxes, spheres and
cylinders, each textured (checker, stripes, tiles, dots, wood grain, value noise) in its own colours
and labelled with its semantic class. Rays are cast analytically in torch for all views at once and
shaded Lambertian under one point light (no shadows), so a surface looks the same from every view.
World axes: z up, metres; the room spans [0, Lx] × [0, Ly] × [0, Lz].

Example:
    >>> from fit3d_hf.scenes import synthetic
    >>> room = synthetic.make_room(0)
    >>> room.images().shape, room.depth_m.shape, room.semantics.max() < len(synthetic.CLASS_NAMES)
    (torch.Size([24, 3, 120, 160]), torch.Size([24, 120, 160]), tensor(True))
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fit3d_hf.scenes.scene import Scene

CLASS_NAMES: list[str] = [
    "wall",
    "floor",
    "ceiling",
    "cabinet",
    "table",
    "sofa",
    "crate",
    "ball",
    "pillar",
    "stool",
    "lamp",
]
WALL, FLOOR, CEILING, CABINET, TABLE, SOFA, CRATE, BALL, PILLAR, STOOL, LAMP = range(len(CLASS_NAMES))

# Texture family per class (a class keeps its pattern kind; colours vary per object).
_CLASS_PATTERNS = {
    WALL: ("stripes", "tiles", "noise"),
    FLOOR: ("wood", "tiles", "checker"),
    CEILING: ("noise",),
    CABINET: ("wood",),
    TABLE: ("wood", "checker"),
    SOFA: ("noise", "dots"),
    CRATE: ("stripes", "tiles"),
    BALL: ("checker", "dots", "stripes"),
    PILLAR: ("noise", "stripes"),
    STOOL: ("dots", "checker"),
    LAMP: ("noise",),
}
_FACE_LABELS = (WALL, WALL, WALL, WALL, FLOOR, CEILING)
_SHELL = len(_FACE_LABELS)
_TEXTURE_SIZE = 64
_EPS = 1e-4


@dataclass
class _Primitive:
    """One analytic surface: kind in {"room", "box", "sphere", "cylinder"} with its parameters."""

    kind: str
    label: int
    center: torch.Tensor  # [3] (box/sphere centre; cylinder axis point at z=0; room: [Lx, Ly, Lz] extents)
    size: torch.Tensor  # box: [3] half extents; sphere: [1] radius; cylinder: [3] radius, z0, z1
    yaw: float
    texture: torch.Tensor  # [3, T, T] tileable albedo
    tile_m: float  # metres covered by one texture tile
    emissive: bool = False


def _value_noise(gen: torch.Generator, cells: int, size: int) -> torch.Tensor:
    """Tileable value noise [size, size] in [0, 1]: a random periodic lattice, bicubically upsampled."""
    lattice = torch.rand(1, 1, cells, cells, generator=gen)
    padded = F.pad(lattice, (2, 2, 2, 2), mode="circular")
    scale = size // cells
    up = F.interpolate(padded, scale_factor=scale, mode="bicubic", align_corners=False)
    return up[0, 0, 2 * scale : 2 * scale + size, 2 * scale : 2 * scale + size].clamp(0, 1)


def _fractal_noise(gen: torch.Generator, size: int) -> torch.Tensor:
    octaves = [_value_noise(gen, cells, size) * weight for cells, weight in ((4, 0.5), (8, 0.3), (16, 0.2))]
    return sum(octaves)


def _random_color(rng: random.Random, label: int) -> torch.Tensor:
    """A colour drawn from a class-dependent palette (hue/saturation/value ranges)."""
    hue_range, sat_range, val_range = {
        WALL: ((0.0, 1.0), (0.1, 0.35), (0.7, 0.95)),
        FLOOR: ((0.05, 0.12), (0.4, 0.7), (0.35, 0.7)),
        CEILING: ((0.0, 1.0), (0.0, 0.1), (0.85, 1.0)),
        CABINET: ((0.04, 0.1), (0.5, 0.8), (0.3, 0.6)),
        LAMP: ((0.1, 0.16), (0.3, 0.6), (0.95, 1.0)),
    }.get(label, ((0.0, 1.0), (0.45, 0.95), (0.45, 0.95)))
    hsv = torch.tensor([rng.uniform(*hue_range), rng.uniform(*sat_range), rng.uniform(*val_range)])
    h6 = hsv[0] * 6
    rgb = torch.stack([(h6 + shift) % 6 for shift in (0.0, 4.0, 2.0)])  # HSV → RGB via the hue wheel
    rgb = (rgb - 3).abs().sub(1).clamp(0, 1)
    return hsv[2] * (1 - hsv[1] + hsv[1] * rgb)


def _make_texture(rng: random.Random, gen: torch.Generator, label: int) -> torch.Tensor:
    """A tileable [3, T, T] albedo texture of the class's pattern family in random colours."""
    size = _TEXTURE_SIZE
    s, t = torch.meshgrid(torch.arange(size) / size, torch.arange(size) / size, indexing="xy")
    noise = _fractal_noise(gen, size)
    kind = rng.choice(_CLASS_PATTERNS[label])
    if kind == "checker":
        cells = rng.choice((2, 4, 8))
        pattern = ((torch.floor(s * cells) + torch.floor(t * cells)) % 2).float()
    elif kind == "stripes":
        fs, ft = rng.choice(((2, 0), (0, 3), (4, 0), (2, 2), (0, 6), (3, 1)))
        pattern = (torch.sin(2 * math.pi * (fs * s + ft * t)) > rng.uniform(-0.5, 0.5)).float()
    elif kind == "tiles":
        cells_s, cells_t = rng.choice((2, 4)), rng.choice((2, 4, 8))
        grout = 0.05 * max(cells_s, cells_t)
        pattern = (((s * cells_s) % 1 < grout) | ((t * cells_t) % 1 < grout)).float()
    elif kind == "dots":
        cells = rng.choice((2, 4))
        ds, dt = (s * cells) % 1 - 0.5, (t * cells) % 1 - 0.5
        pattern = ((ds * ds + dt * dt) < rng.uniform(0.04, 0.1)).float()
    elif kind == "wood":
        rings = rng.choice((4, 6, 8))
        pattern = 0.5 + 0.5 * torch.sin(2 * math.pi * (rings * t + 1.5 * noise))
    else:  # noise
        pattern = noise
    base, accent = _random_color(rng, label), _random_color(rng, label)
    if label in (CABINET, FLOOR, TABLE) and kind == "wood":
        accent = base * 0.55
    texture = base[:, None, None] * (1 - pattern) + accent[:, None, None] * pattern
    return (texture * (0.85 + 0.3 * noise)).clamp(0, 1)


def _intersect(prim: _Primitive, origins: torch.Tensor, dirs: torch.Tensor) -> torch.Tensor:
    """Ray parameter t of the first hit in front of the origin, inf on a miss. origins/dirs: [R, 3]."""
    inf = torch.full_like(origins[:, 0], math.inf)
    if prim.kind == "room":  # rays start inside: the exit face is the hit
        bound = torch.where(dirs > 0, prim.center, torch.zeros_like(prim.center))
        t_axes = torch.where(dirs != 0, (bound - origins) / dirs, torch.full_like(dirs, math.inf))
        return t_axes.min(dim=1).values
    if prim.kind == "box":
        o_local, d_local = _to_local(prim, origins - prim.center, dirs)
        inv = 1.0 / torch.where(d_local.abs() < 1e-12, torch.full_like(d_local, 1e-12), d_local)
        t1, t2 = (-prim.size - o_local) * inv, (prim.size - o_local) * inv
        t_near = torch.minimum(t1, t2).max(dim=1).values
        t_far = torch.maximum(t1, t2).min(dim=1).values
        hit = (t_near <= t_far) & (t_near > _EPS)
        return torch.where(hit, t_near, inf)
    if prim.kind == "sphere":
        oc = origins - prim.center
        a = (dirs * dirs).sum(1)
        b = (oc * dirs).sum(1)
        c = (oc * oc).sum(1) - prim.size[0] ** 2
        disc = b * b - a * c
        t = (-b - disc.clamp_min(0).sqrt()) / a
        return torch.where((disc >= 0) & (t > _EPS), t, inf)
    # Vertical cylinder with caps: side from the quadratic in xy, caps from the planes z0 and z1.
    radius, z0, z1 = prim.size.tolist()
    oc = origins[:, :2] - prim.center[:2]
    dxy = dirs[:, :2]
    a = (dxy * dxy).sum(1).clamp_min(1e-12)
    b = (oc * dxy).sum(1)
    c = (oc * oc).sum(1) - radius**2
    disc = b * b - a * c
    t_side = (-b - disc.clamp_min(0).sqrt()) / a
    z_side = origins[:, 2] + t_side * dirs[:, 2]
    best = torch.where((disc >= 0) & (t_side > _EPS) & (z_side >= z0) & (z_side <= z1), t_side, inf)
    for z_cap in (z0, z1):
        t_cap = (z_cap - origins[:, 2]) / torch.where(dirs[:, 2].abs() < 1e-12, torch.full_like(a, 1e-12), dirs[:, 2])
        xy = oc + t_cap[:, None] * dxy
        on_cap = (t_cap > _EPS) & ((xy * xy).sum(1) <= radius**2)
        best = torch.minimum(best, torch.where(on_cap, t_cap, inf))
    return best


def _to_local(prim: _Primitive, offsets: torch.Tensor, dirs: torch.Tensor | None = None):
    """Rotate world offsets (and directions) [R, 3] into the box frame (yaw about z)."""
    cos, sin = math.cos(prim.yaw), math.sin(prim.yaw)
    rot_t = torch.tensor([[cos, sin, 0.0], [-sin, cos, 0.0], [0.0, 0.0, 1.0]])  # world → local
    if dirs is None:
        return offsets @ rot_t.T
    return offsets @ rot_t.T, dirs @ rot_t.T


def _surface(prim: _Primitive, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Outward normal [R, 3] (inward for the room) and texture coordinates in metres [R, 2] at hit points."""
    if prim.kind in ("room", "box"):
        if prim.kind == "room":
            local, half = points - prim.center / 2, prim.center / 2
        else:
            local, half = _to_local(prim, points - prim.center), prim.size
        axis = (local.abs() / half).argmax(dim=1)
        sign = torch.sign(local.gather(1, axis[:, None]))[:, 0]
        normal_local = F.one_hot(axis, 3).float() * sign[:, None] * (-1 if prim.kind == "room" else 1)
        # The two coordinates spanning the face; metres from the box corner so tiles line up at edges.
        corner = local + half
        uv = torch.stack(
            [torch.where(axis == 0, corner[:, 1], corner[:, 0]), torch.where(axis == 2, corner[:, 1], corner[:, 2])], dim=1
        )
        if prim.kind == "box":
            cos, sin = math.cos(prim.yaw), math.sin(prim.yaw)
            rot = torch.tensor([[cos, -sin, 0.0], [sin, cos, 0.0], [0.0, 0.0, 1.0]])
            normal_local = normal_local @ rot.T
        return normal_local, uv
    if prim.kind == "sphere":
        offset = points - prim.center
        radius = prim.size[0]
        normal = offset / radius
        azimuth = torch.atan2(offset[:, 1], offset[:, 0])
        polar = torch.acos((offset[:, 2] / radius).clamp(-1, 1))
        return normal, torch.stack([azimuth * radius, polar * radius], dim=1)
    radius, z0, z1 = prim.size.tolist()
    offset = points[:, :2] - prim.center[:2]
    rho = offset.norm(dim=1)
    azimuth = torch.atan2(offset[:, 1], offset[:, 0])
    dist = torch.stack([(rho - radius).abs(), (points[:, 2] - z0).abs(), (points[:, 2] - z1).abs()], dim=1)
    part = dist.argmin(dim=1)  # 0 side, 1 bottom cap, 2 top cap
    side_normal = torch.cat([offset / rho.clamp_min(1e-9)[:, None], torch.zeros_like(rho)[:, None]], dim=1)
    cap_normal = torch.zeros_like(points)
    cap_normal[:, 2] = torch.where(part == 1, -1.0, 1.0)
    normal = torch.where((part == 0)[:, None], side_normal, cap_normal)
    uv = torch.where((part == 0)[:, None], torch.stack([azimuth * radius, points[:, 2]], dim=1), offset)
    return normal, uv


def _sample_texture(prim: _Primitive, uv: torch.Tensor) -> torch.Tensor:
    """Bilinear, tiled texture lookup at uv [R, 2] metres. Returns albedo [R, 3]."""
    tex_uv = (uv / prim.tile_m) % 1.0 * 2 - 1
    grid = tex_uv[None, None]  # [1, 1, R, 2]
    return F.grid_sample(prim.texture[None], grid, mode="bilinear", padding_mode="reflection", align_corners=False)[0, :, 0].T


def _look_at(eye: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """World→camera [4, 4] in OpenCV axes for a camera at `eye` looking at `target` (z is world up)."""
    forward = F.normalize(target - eye, dim=0)
    right = F.normalize(torch.linalg.cross(forward, torch.tensor([0.0, 0.0, 1.0])), dim=0)
    down = torch.linalg.cross(forward, right)
    rotation = torch.stack([right, down, forward])  # rows: camera axes in world coordinates
    pose = torch.eye(4)
    pose[:3, :3] = rotation
    pose[:3, 3] = -rotation @ eye
    return pose


def _layout(rng: random.Random, gen: torch.Generator, extent: torch.Tensor, camera_xy: torch.Tensor) -> list[_Primitive]:
    """Room shell plus furniture, placed so that no object comes within 0.4 m of a camera (in xy)."""
    lx, ly, lz = extent.tolist()
    center = torch.tensor([lx / 2, ly / 2, 0.0])
    # Six shell entries with the room geometry, one texture per face, in `_room_face` order.
    prims = [
        _Primitive("room", label, extent, torch.zeros(0), 0.0, _make_texture(rng, gen, label), rng.uniform(0.8, 1.6))
        for label in _FACE_LABELS
    ]
    footprints: list[tuple[float, float, float]] = []  # (x, y, radius) of placed objects

    def free(x: float, y: float, radius: float, half_x: float | None = None, half_y: float = 0.0, yaw: float = 0.0) -> bool:
        """Inside the room, clear of other objects (circles) and ≥ 0.4 m from every camera.

        The camera clearance uses the footprint rectangle (half_x, half_y, yaw) when given, else the
        circle, so long furniture can stand against a wall near the orbit.
        """
        if not (0 < x < lx and 0 < y < ly):
            return False
        offsets = camera_xy - torch.tensor([x, y])
        if half_x is None:
            clearance = offsets.norm(dim=1) - radius
        else:
            cos, sin = math.cos(yaw), math.sin(yaw)
            along = (offsets[:, 0] * cos + offsets[:, 1] * sin).abs() - half_x
            across = (-offsets[:, 0] * sin + offsets[:, 1] * cos).abs() - half_y
            clearance = torch.stack([along, across], dim=1).clamp_min(0).norm(dim=1)
        if clearance.min() < 0.4:
            return False
        return all(math.hypot(x - ox, y - oy) > radius + orad + 0.05 for ox, oy, orad in footprints)

    def box(label, x, y, z0, half, yaw, texture=None, tile=None):
        hx, hy, hz = half
        return _Primitive(
            "box",
            label,
            torch.tensor([x, y, z0 + hz]),
            torch.tensor([hx, hy, hz]),
            yaw,
            _make_texture(rng, gen, label) if texture is None else texture,
            rng.uniform(0.4, 1.0) if tile is None else tile,
        )

    def wall_spot(depth: float, width: float) -> tuple[float, float, float, float, float] | None:
        """A free spot against a random wall: (x, y, yaw, wall_dx, wall_dy); local x runs along the wall."""
        for _ in range(30):
            wall = rng.randrange(4)
            if wall < 2:
                x = rng.uniform(width / 2 + 0.1, lx - width / 2 - 0.1)
                y = depth / 2 + 0.02 if wall == 0 else ly - depth / 2 - 0.02
                spot = (x, y, 0.0, 0.0, -1.0 if wall == 0 else 1.0)
            else:
                y = rng.uniform(width / 2 + 0.1, ly - width / 2 - 0.1)
                x = depth / 2 + 0.02 if wall == 2 else lx - depth / 2 - 0.02
                spot = (x, y, math.pi / 2, -1.0 if wall == 2 else 1.0, 0.0)
            radius = math.hypot(width, depth) / 2
            if free(x, y, radius, width / 2, depth / 2, spot[2]):
                footprints.append((x, y, radius))
                return spot
        return None

    def floor_spot(min_radius: float, max_radius: float) -> tuple[float, float, float] | None:
        """A free round spot anywhere on the floor: (x, y, radius)."""
        for _ in range(20):
            radius = rng.uniform(min_radius, max_radius)
            x, y = rng.uniform(radius, lx - radius), rng.uniform(radius, ly - radius)
            if free(x, y, radius):
                footprints.append((x, y, radius))
                return x, y, radius
        return None

    # Along the walls: cabinets, sofas, crate stacks.
    for _ in range(rng.randint(4, 6)):
        kind = rng.choice((CABINET, SOFA, CRATE))
        if kind == CABINET:
            w, d, h = rng.uniform(0.7, 1.3), rng.uniform(0.4, 0.6), rng.uniform(1.2, 2.1)
            spot = wall_spot(d, w)
            if spot:
                prims.append(box(CABINET, spot[0], spot[1], 0.0, (w / 2, d / 2, h / 2), spot[2]))
        elif kind == SOFA:
            w, d = rng.uniform(1.4, 2.0), rng.uniform(0.75, 0.9)
            spot = wall_spot(d, w)
            if spot:
                x, y, yaw, wall_dx, wall_dy = spot
                tex, tile = _make_texture(rng, gen, SOFA), rng.uniform(0.3, 0.8)
                prims.append(box(SOFA, x, y, 0.0, (w / 2, d / 2, 0.22), yaw, tex, tile))
                offset = d / 2 - 0.1  # the backrest stands on the seat's wall side
                prims.append(box(SOFA, x + wall_dx * offset, y + wall_dy * offset, 0.44, (w / 2, 0.1, 0.22), yaw, tex, tile))
        else:
            s = rng.uniform(0.35, 0.6)
            spot = wall_spot(s, s)
            if spot:
                for level in range(rng.randint(1, 3)):
                    prims.append(
                        box(CRATE, spot[0], spot[1], level * s, (s / 2, s / 2, s / 2), spot[2] + rng.uniform(-0.15, 0.15))
                    )
    # Pillars in some corners.
    for cx, cy in rng.sample([(0.35, 0.35), (lx - 0.35, 0.35), (0.35, ly - 0.35), (lx - 0.35, ly - 0.35)], 2):
        radius = rng.uniform(0.15, 0.25)
        if free(cx, cy, radius):
            footprints.append((cx, cy, radius))
            circumference_tiles = rng.choice((2, 3, 4))
            prims.append(
                _Primitive(
                    "cylinder",
                    PILLAR,
                    torch.tensor([cx, cy, 0.0]),
                    torch.tensor([radius, 0.0, lz]),
                    0.0,
                    _make_texture(rng, gen, PILLAR),
                    2 * math.pi * radius / circumference_tiles,
                )
            )
    # Centre: a table with legs, balls, stools; a lamp hanging from the ceiling.
    tx, ty = center[0].item() + rng.uniform(-0.2, 0.2), center[1].item() + rng.uniform(-0.2, 0.2)
    tw, td, th = rng.uniform(0.9, 1.4), rng.uniform(0.6, 0.9), rng.uniform(0.7, 0.78)
    table_yaw = rng.uniform(-0.5, 0.5)
    if free(tx, ty, math.hypot(tw, td) / 2, tw / 2, td / 2, table_yaw):
        footprints.append((tx, ty, math.hypot(tw, td) / 2))
        tex, tile = _make_texture(rng, gen, TABLE), rng.uniform(0.4, 0.9)
        prims.append(box(TABLE, tx, ty, th - 0.05, (tw / 2, td / 2, 0.025), table_yaw, tex, tile))
        cos, sin = math.cos(table_yaw), math.sin(table_yaw)
        for sx in (-1, 1):
            for sy in (-1, 1):
                lx_, ly_ = sx * (tw / 2 - 0.06), sy * (td / 2 - 0.06)
                prims.append(
                    box(
                        TABLE,
                        tx + cos * lx_ - sin * ly_,
                        ty + sin * lx_ + cos * ly_,
                        0.0,
                        (0.03, 0.03, (th - 0.05) / 2),
                        table_yaw,
                        tex,
                        tile,
                    )
                )
        radius = rng.uniform(0.08, 0.15)
        prims.append(
            _Primitive(
                "sphere",
                BALL,
                torch.tensor([tx, ty, th + radius]),
                torch.tensor([radius]),
                0.0,
                _make_texture(rng, gen, BALL),
                2 * math.pi * radius / rng.choice((2, 4)),
            )
        )
    for _ in range(rng.randint(1, 3)):
        spot = floor_spot(0.12, 0.3)
        if spot:
            x, y, radius = spot
            prims.append(
                _Primitive(
                    "sphere",
                    BALL,
                    torch.tensor([x, y, radius]),
                    torch.tensor([radius]),
                    0.0,
                    _make_texture(rng, gen, BALL),
                    2 * math.pi * radius / rng.choice((2, 4)),
                )
            )
    for _ in range(rng.randint(1, 3)):
        spot = floor_spot(0.16, 0.24)
        if spot:
            x, y, radius = spot
            prims.append(
                _Primitive(
                    "cylinder",
                    STOOL,
                    torch.tensor([x, y, 0.0]),
                    torch.tensor([radius, 0.0, rng.uniform(0.4, 0.5)]),
                    0.0,
                    _make_texture(rng, gen, STOOL),
                    2 * math.pi * radius / rng.choice((1, 2, 3)),
                )
            )
    lamp_radius = rng.uniform(0.15, 0.25)
    prims.append(
        _Primitive(
            "cylinder",
            LAMP,
            torch.tensor([tx, ty, 0.0]),
            torch.tensor([lamp_radius, lz - rng.uniform(0.3, 0.5), lz]),
            0.0,
            _make_texture(rng, gen, LAMP),
            2 * math.pi * lamp_radius,
            emissive=True,
        )
    )
    return prims


def _room_face(points: torch.Tensor, extent: torch.Tensor) -> torch.Tensor:
    """Face index of points [R, 3] on the room shell: x=0, x=Lx, y=0, y=Ly, floor, ceiling."""
    local = points - extent / 2
    axis = (local.abs() / (extent / 2)).argmax(dim=1)
    positive = (local.gather(1, axis[:, None])[:, 0] > 0).long()
    return 2 * axis + positive


def _trajectory(rng: random.Random, extent: torch.Tensor, num_views: int) -> torch.Tensor:
    """[V, 4, 4] world→camera: an orbit inside the room at varying heights, looking across it."""
    lx, ly, lz = extent.tolist()
    center = torch.tensor([lx / 2, ly / 2])
    phase = rng.uniform(0, 2 * math.pi)
    poses = []
    for k in range(num_views):
        angle = phase + 2 * math.pi * k / num_views + rng.uniform(-0.05, 0.05)
        radial = torch.tensor([math.cos(angle), math.sin(angle)])
        eye_xy = center + radial * torch.tensor([lx, ly]) * rng.uniform(0.26, 0.32)
        eye_z = 1.0 + 0.35 * (1 + math.sin(3 * angle + phase)) + rng.uniform(-0.05, 0.05)
        # Look across the room through (roughly) its centre, swinging left/right and up/down.
        swing = rng.uniform(-0.7, 0.7)
        cos, sin = math.cos(swing), math.sin(swing)
        across = -torch.stack([cos * radial[0] - sin * radial[1], sin * radial[0] + cos * radial[1]])
        target_xy = center + across * torch.tensor([lx, ly]) * rng.uniform(0.1, 0.4)
        target_z = rng.uniform(0.3, min(1.6, lz - 0.6))
        eye = torch.tensor([eye_xy[0], eye_xy[1], eye_z])
        poses.append(_look_at(eye, torch.tensor([target_xy[0], target_xy[1], target_z])))
    return torch.stack(poses)


def make_room(
    seed: int,
    *,
    num_views: int = 24,
    height: int = 120,
    width: int = 160,
    fov_x_deg: float = 70.0,
    num_points: int = 20_000,
    test_every: int = 8,
) -> Scene:
    """Generate one procedural room and render it from an orbit of cameras.

    Args:
        seed: everything (layout, textures, trajectory, points) is a deterministic function of it.
        num_views: number of views V along the orbit (≥ 2); views `i % test_every == 0` are test views.
        height, width: image size H × W in pixels.
        fov_x_deg: horizontal field of view of the pinhole cameras.
        num_points: number of init points P, back-projected from random pixels, in turn from each view.

    Returns:
        A `Scene` with scene_id `room_{seed:04d}`, in-memory images [V, 3, H, W], `depth_m`
        [V, H, W] (z-depth: distance along the optical axis, as depth sensors report, not the
        ray length), `semantics` [V, H, W] (indices into CLASS_NAMES; every pixel is labelled),
        `points` [P, 3] and `point_colors` [P, 3] (shaded RGB), and OpenCV cameras.
    """
    rng = random.Random(seed)
    gen = torch.Generator().manual_seed(seed)
    extent = torch.tensor([rng.uniform(5.0, 7.0), rng.uniform(4.5, 6.5), rng.uniform(2.6, 3.0)])
    world_to_camera = _trajectory(rng, extent, num_views)
    camera_to_world = torch.linalg.inv(world_to_camera)
    prims = _layout(rng, gen, extent, camera_to_world[:, :2, 3])

    focal = width / (2 * math.tan(math.radians(fov_x_deg) / 2))
    K = torch.tensor([[focal, 0.0, width / 2], [0.0, focal, height / 2], [0.0, 0.0, 1.0]])
    intrinsics = K.expand(num_views, 3, 3).clone()
    # Camera-frame rays with z = 1, so the hit parameter t is the z-depth.
    v, u = torch.meshgrid(torch.arange(height) + 0.5, torch.arange(width) + 0.5, indexing="ij")
    dirs_cam = torch.stack([(u - K[0, 2]) / focal, (v - K[1, 2]) / focal, torch.ones_like(u)], dim=-1).reshape(-1, 3)
    dirs = torch.einsum("vij,rj->vri", camera_to_world[:, :3, :3], dirs_cam).reshape(-1, 3)  # [V*H*W, 3]
    origins = camera_to_world[:, None, :3, 3].expand(num_views, height * width, 3).reshape(-1, 3)

    # The room shell is hit by every ray (cameras are inside it): start from it, then nearer objects win.
    depth = _intersect(prims[0], origins, dirs)
    owner = torch.zeros_like(depth, dtype=torch.long)
    for index in range(_SHELL, len(prims)):
        t = _intersect(prims[index], origins, dirs)
        closer = t < depth
        depth = torch.where(closer, t, depth)
        owner = torch.where(closer, index, owner)
    points = origins + depth[:, None] * dirs
    shell = owner == 0
    owner[shell] = _room_face(points[shell], extent)

    labels = torch.empty_like(owner)
    albedo = torch.empty_like(points)
    normals = torch.empty_like(points)
    emissive = torch.zeros_like(depth, dtype=torch.bool)
    for index, prim in enumerate(prims):
        hit = owner == index
        if not hit.any():
            continue
        normal, uv = _surface(prim, points[hit])
        labels[hit] = prim.label
        normals[hit] = normal
        albedo[hit] = _sample_texture(prim, uv)
        emissive[hit] = prim.emissive

    light = torch.tensor([extent[0] / 2, extent[1] / 2, extent[2] - 0.7])
    to_light = light - points
    distance = to_light.norm(dim=1, keepdim=True)
    lambert = ((normals * to_light).sum(1, keepdim=True) / distance).clamp_min(0)
    shading = 0.3 + 0.9 * lambert / (1 + 0.04 * distance**2)
    rgb = torch.where(emissive[:, None], albedo, albedo * shading).clamp(0, 1)

    images = rgb.reshape(num_views, height, width, 3).permute(0, 3, 1, 2).contiguous()
    test_views = [i for i in range(num_views) if i % test_every == 0]
    train_views = [i for i in range(num_views) if i % test_every != 0]
    # Like COLMAP points, drawn from every view (round robin, so each camera sees some).
    chosen = torch.arange(num_points) % num_views * height * width + torch.randint(height * width, (num_points,), generator=gen)
    return Scene(
        scene_id=f"room_{seed:04d}",
        intrinsics=intrinsics,
        world_to_camera=world_to_camera,
        height=height,
        width=width,
        image_data=images,
        depth_m=depth.reshape(num_views, height, width).contiguous(),
        semantics=labels.reshape(num_views, height, width).contiguous(),
        points=points[chosen],
        point_colors=rgb[chosen],
        train_views=train_views,
        test_views=test_views,
        view_names=[f"room_{seed:04d}_view_{i:03d}" for i in range(num_views)],
        class_names=list(CLASS_NAMES),
        source=f"synthetic room seed={seed}",
    )


def make_rooms(n: int, seed: int = 0, **kwargs) -> list[Scene]:
    """`n` rooms with seeds seed, seed+1, ...; keyword arguments go to `make_room`."""
    return [make_room(seed + i, **kwargs) for i in range(n)]
