"""Optimizers for sparse training: RDA (the method), proximal SGD and gradual magnitude
pruning (the baselines), and the parameter groups they share. Imports only torch."""

from distrib_rda.optim.gmp import MagnitudePruner, magnitude_masks
from distrib_rda.optim.groups import prunable_weights, rda_param_groups
from distrib_rda.optim.prox_sgd import ProxSGD
from distrib_rda.optim.rda import RDA

__all__ = ["RDA", "MagnitudePruner", "ProxSGD", "magnitude_masks", "prunable_weights",
           "rda_param_groups"]
