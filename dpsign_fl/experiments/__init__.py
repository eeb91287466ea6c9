"""Research side: an in-process federated loop and the paper's experiment recipes.

Run ``python -m dpsign_fl.experiments RECIPE --data-dir DIR --out DIR``; see
:mod:`dpsign_fl.experiments.__main__` and docs/results.md.
"""

from .loop import METHODS, PRIVATE_METHODS, Experiment, noise_multiplier_for, run_experiment
from .recipes import RECIPES, Recipe, RecipeOptions, get_recipe

__all__ = [
    "METHODS",
    "PRIVATE_METHODS",
    "RECIPES",
    "Recipe",
    "RecipeOptions",
    "Experiment",
    "get_recipe",
    "noise_multiplier_for",
    "run_experiment",
]
