"""Pure aggregation of virtual paths: the server's update, and the client's replay in "scalars" downlink."""

from __future__ import annotations

from collections.abc import Sequence

import torch

from meerkat_fl.fed.messages import ClientPath
from meerkat_fl.masks import Mask
from meerkat_fl.noise import NoiseSource
from meerkat_fl.zo import replay


def client_endpoint(values: torch.Tensor, mask: Mask, path: ClientPath, *, noise: NoiseSource) -> torch.Tensor:
    """w_k^T: replay one client's (seed, scalar) path from the round's starting point ``values``."""
    return replay(values, mask, list(zip(path.seeds.tolist(), path.scalars.tolist())), path.lr, noise=noise)


def aggregate_paths(
    values: torch.Tensor, mask: Mask, paths: Sequence[ClientPath], *, noise: NoiseSource
) -> torch.Tensor:
    """w^r = sum_k p_k * w_k^T over ``paths`` (weights already normalised), in client-id order.

    With no paths the model is unchanged. Holds one accumulator and one replayed vector at a time.
    """
    if not paths:
        return values.clone()
    total = torch.zeros_like(values)
    for path in sorted(paths, key=lambda p: p.client_id):
        total.add_(client_endpoint(values, mask, path, noise=noise), alpha=path.weight)
    return total


def normalised_weights(sizes: dict[int, int], weighting: str) -> dict[int, float]:
    """p_k over the given clients: proportional to data size, or uniform; sums to 1."""
    if weighting == "uniform" or sum(sizes.values()) == 0:
        return {k: 1.0 / len(sizes) for k in sizes}
    total = sum(sizes.values())
    return {k: n / total for k, n in sizes.items()}
