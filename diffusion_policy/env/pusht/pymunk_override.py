"""Pygame debug-drawing for pymunk spaces, styled like the original PushT renders.

The recorded PushT images (``data/img``) were drawn with a customised variant of
``pymunk.pygame_util.DrawOptions``; reproducing its style pixel for pixel is what lets image
policies trained on the demonstrations see the same pictures in simulation. Style rules:

- circles: solid disc in the shape colour with an inner disc (radius - 4) in a lighter tint,
  no orientation line;
- polygons: filled with the lighter tint, outlined by fat segments of radius 2 in the shape colour;
- fat segments: a thick line plus a quad and two end discs (pymunk's recipe);
- plain segments (collision points): anti-aliased lines;
- coordinates are rounded, y grows downwards (no flip).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

os.environ.setdefault("PYGAME_HIDE_SUPPORT_PROMPT", "1")

import numpy as np  # noqa: E402
import pygame  # noqa: E402
import pymunk  # noqa: E402
from pymunk.space_debug_draw_options import SpaceDebugColor  # noqa: E402

# polygon outlines are always drawn this thick, whatever the shape's own radius is
POLYGON_OUTLINE_RADIUS = 2
# inner disc of a circle is this many pixels smaller than the circle
CIRCLE_RIM = 4


def to_pygame(p: Sequence[float]) -> tuple[int, int]:
    """Round a pymunk point to pygame pixel coordinates (same axes, y down)."""
    return round(p[0]), round(p[1])


def light_color(color: SpaceDebugColor) -> SpaceDebugColor:
    """The 1.2x brighter tint (clipped at 255) used for polygon and circle interiors."""
    # float32 arithmetic, then pymunk's rounding in as_int, gives e.g. (143, 163, 184) for
    # LightSlateGray; the recorded images contain exactly these values
    rgba = np.minimum(np.float32(1.2) * np.float32(color), np.float32(255.0))
    return SpaceDebugColor(*(float(c) for c in rgba))


class DrawOptions(pymunk.SpaceDebugDrawOptions):
    """Draws a :class:`pymunk.Space` onto a :class:`pygame.Surface` via ``space.debug_draw``."""

    def __init__(self, surface: pygame.Surface) -> None:
        self.surface = surface
        super().__init__()

    def draw_circle(self, pos, angle, radius, outline_color, fill_color) -> None:
        centre = to_pygame(pos)
        pygame.draw.circle(self.surface, fill_color.as_int(), centre, round(radius), 0)
        pygame.draw.circle(
            self.surface, light_color(fill_color).as_int(), centre, round(radius - CIRCLE_RIM), 0
        )

    def draw_segment(self, a, b, color) -> None:
        pygame.draw.aalines(self.surface, color.as_int(), False, [to_pygame(a), to_pygame(b)])

    def draw_fat_segment(self, a, b, radius, outline_color, fill_color) -> None:
        p1 = to_pygame(a)
        p2 = to_pygame(b)
        colour = fill_color.as_int()
        width = round(max(1, radius * 2))
        pygame.draw.lines(self.surface, colour, False, [p1, p2], width)
        if width <= 2:
            return
        dx = abs(p2[1] - p1[1])
        dy = abs(p2[0] - p1[0])
        if dx == 0 and dy == 0:
            return
        scale = radius / (dx * dx + dy * dy) ** 0.5
        ox = round(dx * scale)
        oy = round(dy * scale)
        quad = [
            (p1[0] - ox, p1[1] - oy),
            (p1[0] + ox, p1[1] + oy),
            (p2[0] + ox, p2[1] + oy),
            (p2[0] - ox, p2[1] - oy),
        ]
        pygame.draw.polygon(self.surface, colour, quad)
        pygame.draw.circle(self.surface, colour, p1, round(radius))
        pygame.draw.circle(self.surface, colour, p2, round(radius))

    def draw_polygon(self, verts, radius, outline_color, fill_color) -> None:
        points = [to_pygame(v) for v in verts]
        points.append(points[0])
        pygame.draw.polygon(self.surface, light_color(fill_color).as_int(), points)
        n = len(verts)
        for i in range(n):
            self.draw_fat_segment(
                verts[i], verts[(i + 1) % n], POLYGON_OUTLINE_RADIUS, fill_color, fill_color
            )

    def draw_dot(self, size, pos, color) -> None:
        pygame.draw.circle(self.surface, color.as_int(), to_pygame(pos), round(size), 0)
