"""Prototype initialisation: k-means (cosine) over normalised training windows."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from stream_detector.model import AnomalyLLM


def spherical_kmeans(
    points: torch.Tensor, clusters: int, iterations: int = 20, seed: int = 0
) -> torch.Tensor:
    """Cluster unit vectors by cosine similarity. (M, L) -> (clusters, L)

    k-means++ seeding; an empty cluster is re-seeded with the point farthest from
    its centroid, so every prototype ends up representing some data.
    """
    generator = torch.Generator().manual_seed(seed)
    points = F.normalize(points.float(), dim=-1)
    count = points.shape[0]
    first = torch.randint(count, (1,), generator=generator)
    centroids = [points[first[0]]]
    for _ in range(1, clusters):
        similarity = points @ torch.stack(centroids).T  # (M, k)
        distance = (1 - similarity.max(dim=1).values).clamp(min=0)
        weights = distance if distance.sum() > 0 else torch.ones(count)
        centroids.append(points[torch.multinomial(weights, 1, generator=generator)[0]])
    centers = torch.stack(centroids)
    for _ in range(iterations):
        similarity = points @ centers.T
        assignment = similarity.argmax(dim=1)
        best = similarity.max(dim=1).values
        for cluster in range(clusters):
            members = points[assignment == cluster]
            if len(members):
                centers[cluster] = F.normalize(members.mean(dim=0), dim=0)
            else:
                worst = best.argmin()
                centers[cluster] = points[worst]
                best[worst] = 1.0
    return centers


@torch.no_grad()
def init_prototypes(model: AnomalyLLM, windows: torch.Tensor, seed: int = 0) -> None:
    """Set each channel's prototypes to k-means centroids of training windows (M, C, L)."""
    normalised = model.normalise(windows.float().to(model.normalise.mean.device)).cpu()
    clusters = model.config.prototypes
    if normalised.shape[0] < clusters:
        raise ValueError(
            f"k-means needs at least {clusters} training windows, got {normalised.shape[0]}"
        )
    prototypes = model.student.prototypes
    for channel in range(normalised.shape[1]):
        centers = spherical_kmeans(normalised[:, channel], clusters, seed=seed + channel)
        # Centroids are unit vectors; scale to the norm of a normalised window.
        prototypes[channel] = (centers * normalised.shape[-1] ** 0.5).to(prototypes.device)


@torch.no_grad()
def refit_prototypes(model: AnomalyLLM, windows: torch.Tensor, iterations: int = 10) -> None:
    """Move each channel's prototypes to the k-means centroids of new windows (M, C, L).

    Warm-started from the current prototypes, so prototype k stays the pattern the
    student learned to pair with k; each keeps its norm (the student sees it unscaled),
    and a prototype that attracts no window keeps its place.
    """
    device = model.normalise.mean.device
    normalised = F.normalize(model.normalise(windows.float().to(device)).cpu(), dim=-1)
    prototypes = model.student.prototypes
    for channel in range(normalised.shape[1]):
        points = normalised[:, channel].to(prototypes.device)  # (M, L)
        norms = prototypes[channel].float().norm(dim=-1, keepdim=True)  # (K, 1)
        centers = prototypes[channel].float() / norms.clamp(min=1e-12)  # (K, L)
        for _ in range(iterations):
            assignment = (points @ centers.T).argmax(dim=1)  # (M,)
            sums = torch.zeros_like(centers).index_add_(0, assignment, points)  # (K, L)
            filled = torch.bincount(assignment, minlength=len(centers)) > 0
            centers = torch.where(filled[:, None], F.normalize(sums, dim=-1), centers)
        prototypes[channel] = (centers * norms).to(prototypes.dtype)
