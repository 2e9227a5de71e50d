"""Hydra finds sweepers only in the `hydra_plugins` namespace; the code lives in densenet_exp.search."""

from densenet_exp.search import OptunaSweeper as _OptunaSweeper


class OptunaSweeper(_OptunaSweeper):
    """`hydra/sweeper=optuna`: see densenet_exp.search.OptunaSweeper."""
