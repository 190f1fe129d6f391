"""BoB task recipes (linear probing, kNN, retrieval, ...); import the submodules directly."""
