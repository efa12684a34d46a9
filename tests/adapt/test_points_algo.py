"""vitkit/adapt/points_algo.py beyond test_inputs.py's adapter oracle: the cases mutation testing found untested
(benchmarks/RESULTS.md, "Mutation testing, stop 25") -- clouds smaller than the unit ball, farthest point sampling
on raw (uncentred) clouds, the cameras being rotations, float64 points. Expected values from loops over points
and python trigonometry; nothing from vitkit computes them."""
from __future__ import annotations

import math

import torch

from vitkit.adapt.points_algo import farthest_point_sample, normalise, project, view_rotations


def test_normalise_scales_small_clouds_up_to_the_unit_ball():
    torch.manual_seed(0)
    cloud = 0.01 * torch.randn(2, 40, 3) + torch.tensor([5.0, -2.0, 1.0])
    points, centroid, scale = normalise(cloud)
    torch.testing.assert_close(points.norm(dim=-1).amax(1), torch.ones(2))
    torch.testing.assert_close(points * scale + centroid, cloud)


def test_farthest_point_sample_starts_farthest_from_the_centroid_of_raw_points():
    torch.manual_seed(1)
    clouds = torch.randn(3, 60, 3) * torch.tensor([3.0, 1.0, 0.3]) + torch.tensor([4.0, 4.0, 4.0])
    got = farthest_point_sample(clouds, 10)
    for b, p in enumerate(clouds):
        chosen = [int((p - p.mean(0)).norm(dim=1).argmax())]
        while len(chosen) < 10:
            chosen.append(int(torch.stack([(p - p[c]).norm(dim=1) for c in chosen]).min(0).values.argmax()))
        assert got[b].tolist() == chosen


def test_cameras_are_rotations_and_project_float64_points():
    rotations = view_rotations(4)
    torch.testing.assert_close(rotations @ rotations.transpose(1, 2), torch.eye(3).expand(4, -1, -1))
    torch.manual_seed(2)
    points = torch.randn(2, 5, 3, dtype=torch.float64)
    uv = project(points, rotations)
    assert uv.dtype == torch.float64 and uv.shape == (2, 4, 5, 2)
    e = math.radians(30)
    for i in range(4):
        a = math.pi * i / 4
        x, y, z = points.unbind(-1)
        u, v = x * math.cos(a) - y * math.sin(a), (x * math.sin(a) + y * math.cos(a)) * math.cos(e) - z * math.sin(e)
        torch.testing.assert_close(uv[:, i], torch.stack([u, v], -1), atol=1e-6, rtol=1e-6)
