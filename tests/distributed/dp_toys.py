"""Test helpers shared by the in-process tests and the torchrun worker: an in-process (threaded) communicator and a
minimal data-holding denoiser that uses the data-parallel hook, so the generic machinery is tested on its own."""

from __future__ import annotations

import threading

import torch
from diffusers import ConfigMixin, ModelMixin
from diffusers.configuration_utils import register_to_config

from diffusers_analytic.kernels.online_softmax import OnlineSoftmax
from diffusers_analytic.kernels.stored_images import image_chunks
from diffusers_analytic.models.stored_images import StoredImagesMixin


class ThreadGroup:
    """`world_size` threads of one process acting as processes: an all-reduce through shared slots and a barrier."""

    def __init__(self, world_size: int):
        self.world_size = world_size
        self.barrier = threading.Barrier(world_size, timeout=60)
        self.slots = [None] * world_size

    def communicator(self, rank: int) -> ThreadCommunicator:
        return ThreadCommunicator(self, rank)

    def run(self, fn):
        """Runs `fn(rank, communicator)` in one thread per rank; returns the results by rank, re-raises failures."""
        results, errors = [None] * self.world_size, []

        def target(rank):
            try:
                results[rank] = fn(rank, self.communicator(rank))
            except BaseException as error:  # noqa: BLE001 - re-raised in the caller
                errors.append(error)
                self.barrier.abort()

        threads = [threading.Thread(target=target, args=(rank,)) for rank in range(self.world_size)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if errors:
            raise errors[0]
        return results


class ThreadCommunicator:
    def __init__(self, group: ThreadGroup, rank: int):
        self.group, self.rank, self.world_size = group, rank, group.world_size

    def all_reduce(self, tensor: torch.Tensor, op: str) -> torch.Tensor:
        self.group.slots[self.rank] = tensor.detach().clone()
        self.group.barrier.wait()
        stacked = torch.stack(self.group.slots)
        result = {"sum": lambda: stacked.sum(0), "max": lambda: stacked.amax(0), "min": lambda: stacked.amin(0)}[op]()
        self.group.barrier.wait()
        return result


class ToyOptimalDenoiser(StoredImagesMixin, ModelMixin, ConfigMixin):
    """The exact optimal denoiser in its plainest streamed form, with the data-parallel reduction."""

    supports_data_parallel = True

    @register_to_config
    def __init__(
        self,
        sample_size: int = 8,
        in_channels: int = 1,
        num_images: int = 1,
        chunk_size: int = 64,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        prediction_type: str = "epsilon",
    ):
        super().__init__()
        self._init_analytic()
        self._register_image_storage(num_images, "uint8", has_labels=False)

    def _denoise(self, x_t, alpha_prod_t, beta_prod_t, generator=None, class_labels=None):
        x = x_t.reshape(len(x_t), -1)  # [B, D]
        a, one_minus_a = alpha_prod_t.float()[:, None], beta_prod_t.float()[:, None]  # [B, 1]
        state = OnlineSoftmax()
        for _, y in image_chunks(self.images, self.config.chunk_size, device=x.device):  # y [n, D]
            # -||x - sqrt(a) y||^2 / (2 (1 - a)) up to the row constant ||x||^2
            logits = (2 * a.sqrt() * (x @ y.T) - a * (y * y).sum(1)) / (2 * one_minus_a)  # [B, n]
            state.update(logits, lambda w, y=y: w @ y)
        state = self._reduce_softmax(state, rows_shape=(len(x),), value_shape=(x.shape[1],), device=x.device)
        return state.result().reshape(x_t.shape)
