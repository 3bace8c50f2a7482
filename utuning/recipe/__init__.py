"""Recipes: YAML files validated against the dataclasses of ``utuning.schema``.

``load.py`` reads, merges and overrides (``load_recipe``), ``validate.py`` checks values,
``io.py`` is the one serialiser (``save_recipe``, ``recipe_to_dict``, ``recipe_from_dict``).
"""

from utuning.recipe.io import recipe_from_dict, recipe_to_dict, recipe_yaml, save_recipe
from utuning.recipe.load import load_config, load_recipe
from utuning.recipe.validate import validate

__all__ = ["load_config", "load_recipe", "recipe_from_dict", "recipe_to_dict", "recipe_yaml", "save_recipe", "validate"]
