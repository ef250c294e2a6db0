"""Which images each training step sees: the global batch order, cut per process and
micro-batch, and the batches delivered from a loader or from a dataset held on the device.

Global batch g is slice g % per_epoch of a permutation of the dataset drawn afresh for each
epoch from the (--seed, DATA_ORDER, epoch) stream (streams.py), so the order does not depend
on the number of processes or micro-batches, and a resumed run continues it exactly.
"""
import torch
from torch.utils.data import DataLoader, Sampler

import datasets
from streams import DATA_ORDER, generator


class GlobalBatchSampler(Sampler):
    """This process's micro-batches of the global batches start, start + 1, ...

    The last incomplete batch of an epoch is dropped. Process r takes the r-th of world_size
    equal parts of each global batch and cuts it into accum_steps micro-batches.
    """

    def __init__(self, dataset_size, global_batch, world_size, rank, accum_steps, seed, start,
                 device="cpu"):
        self.per_epoch = dataset_size // global_batch
        if self.per_epoch == 0:
            raise datasets.DatasetError(f"the dataset has {dataset_size} images, fewer than one "
                                    f"batch of {global_batch}")
        self.size, self.global_batch = dataset_size, global_batch
        self.world_size, self.rank, self.accum_steps = world_size, rank, accum_steps
        self.seed, self.start, self.device = seed, start, device

    def __iter__(self):
        local = self.global_batch // self.world_size
        epoch, order = None, None
        for g in range(self.start, 2 ** 62):
            if g // self.per_epoch != epoch:
                epoch = g // self.per_epoch
                order = torch.randperm(self.size, generator=generator("cpu", self.seed, DATA_ORDER, epoch))
                order = order.to(self.device)
            first = (g % self.per_epoch) * self.global_batch + self.rank * local
            yield from order[first:first + local].chunk(self.accum_steps)


def device_batches(images, batch_sampler, labels=None):
    """(batch, its labels) pairs cut from a dataset held whole on the device: no loader, no
    copies. labels: every image's label (datasets.labels_of) on the images' device, else None,
    which each pair then holds."""
    for indices in batch_sampler:
        yield datasets.from_stored(images[indices]), None if labels is None else labels[indices]


def loader_batches(dataset, batch_sampler, num_workers, seed, device):
    """(batch, its labels as int64) pairs on the device, read by num_workers loader processes."""
    loader = DataLoader(
        dataset, num_workers=num_workers, pin_memory=device.type == "cuda",
        persistent_workers=num_workers > 0,
        # its own generator: creating the iterator must not draw from the dropout RNG
        generator=generator("cpu", seed, DATA_ORDER),
        batch_sampler=(indices.tolist() for indices in batch_sampler))
    try:
        for x, y in loader:
            yield x.to(device, non_blocking=True), y.to(device, torch.long, non_blocking=True)
    except datasets.DatasetError as error:
        raise datasets.worker_error(error) from None
