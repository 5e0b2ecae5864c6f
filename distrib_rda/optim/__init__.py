"""Optimizers for sparse training: RDA (the method), proximal SGD and gradual magnitude
pruning (the baselines), the sparsity schedule and parameter groups they share, and the parts a
training step drives. Imports only torch."""

from distrib_rda.optim.gmp import MagnitudePruner, magnitude_masks
from distrib_rda.optim.groups import prunable_weights, rda_param_groups
from distrib_rda.optim.parts import FixedMask, OptimizerParts
from distrib_rda.optim.prox_sgd import ProxSGD
from distrib_rda.optim.rda import RDA
from distrib_rda.optim.schedule import cubic_sparsity, magnitude_quantile

# The functional core is distrib_rda.optim.rda.rda, as torch's is torch.optim.sgd.sgd.
__all__ = ["RDA", "FixedMask", "MagnitudePruner", "OptimizerParts", "ProxSGD", "cubic_sparsity",
           "magnitude_masks", "magnitude_quantile", "prunable_weights", "rda_param_groups"]
