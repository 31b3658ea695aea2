"""Experiment configs (ml_collections, ``get_config(arg)``); see ``common.py``."""
