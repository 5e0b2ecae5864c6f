"""distrib-rda: distributed training of sparse CNNs with l1-regularized dual averaging."""

__version__ = "0.1.0"
