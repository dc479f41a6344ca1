from .seeding import generator_for_index, generators_for_indices

__all__ = ["generator_for_index", "generators_for_indices"]
