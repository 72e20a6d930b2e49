"""This process's place in a torch.distributed job and the collectives training needs."""

from training.parallel.distributed import Collective, assigned, init_distributed, launched_world_size, shutdown_distributed

__all__ = ["Collective", "assigned", "init_distributed", "launched_world_size", "shutdown_distributed"]
