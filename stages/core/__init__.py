"""Shared building blocks of the stage recipes: data, training, modeling, chat masks, scoring,
evaluation, config and errors. A block never imports a recipe (``stages/*.py``) or ``pipelines/``."""
