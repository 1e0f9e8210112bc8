"""What a run reads: its training set, each process's share of an epoch's sample order, the epoch's DataLoader, and
the fixed validation subsets."""

from __future__ import annotations

import signal

import torch

from ..data import Augment, SaliencyDataset, collate, dataset_name, read_pairs
from ..recipes import Recipe
from ..transforms import InputSpec
from .builders import epoch_seed


class EpochSampler(torch.utils.data.Sampler):
    """This rank's share of the epoch's permutation (every world-th index), from a given position onwards.

    The permutation comes from (seed, epoch) alone, so a run resumed mid-epoch sees exactly the batches an
    uninterrupted one would. The remainder of n / world is dropped so that ranks run the same number of steps.
    """

    def __init__(self, n: int, seed: int, rank: int = 0, world: int = 1):
        self.n, self.seed, self.rank, self.world = n, seed, rank, world
        self.epoch, self.start = 0, 0

    def set_position(self, epoch: int, start: int) -> None:
        self.epoch, self.start = epoch, start

    def order(self) -> list[int]:
        g = torch.Generator().manual_seed(epoch_seed(self.seed, self.epoch))
        perm = torch.randperm(self.n, generator=g).tolist()
        return perm[self.rank : self.n - self.n % self.world : self.world]

    def __iter__(self):
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, len(self.order()) - self.start)


def training_dataset(pairs: list, recipe: Recipe, spec: InputSpec, seed: int = 0,
                     cache: bool = False) -> SaliencyDataset:
    """The pairs as the recipe trains on them: its augmentation, targets and target resampling."""
    augment = Augment(saturation=(0.5, 1.5) if recipe.saturation else None) if recipe.augment else None
    return SaliencyDataset(pairs, spec, augment, seed=seed, cache=cache, targets=recipe.targets,
                           target_resize=recipe.target_resize)


def _worker_init(worker_id: int) -> None:
    """DataLoader workers leave SIGINT/SIGTERM to the main process, which stops at the end of the step with a
    checkpoint (a Ctrl-C reaches the whole process group; a worker dying of it would fail the run instead)."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)


def epoch_loader(dataset: SaliencyDataset, sampler: EpochSampler, batch_size: int, seed: int, workers: int,
                 pin_memory: bool = False) -> torch.utils.data.DataLoader:
    """The batches of the sampler's epoch from its position on."""
    # Its own generator: without one, each new iterator draws from the global RNG that dropout uses.
    generator = torch.Generator().manual_seed(epoch_seed(seed, sampler.epoch))
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, sampler=sampler, collate_fn=collate, num_workers=workers, drop_last=True,
        pin_memory=pin_memory, worker_init_fn=_worker_init, generator=generator,
    )


def evenly_spaced(pairs: list, n: int | None) -> list:
    """n pairs spread evenly over the list (all of them when n is None or not smaller): a fixed validation subset."""
    if not n or n >= len(pairs):
        return pairs
    return [pairs[i * len(pairs) // n] for i in range(n)]


def validation_sets(sources: list[str], limit: int | None = None) -> dict[str, list]:
    """Each validation source's pairs (`limit` evenly spaced ones), by the source's name."""
    return {dataset_name(source): evenly_spaced(read_pairs(source), limit) for source in sources}
