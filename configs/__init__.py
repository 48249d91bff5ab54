"""The configs that ship with ecpt (``*.toml`` next to this file, installed as package data).

A package so that an installed ecpt finds them through ``importlib.resources`` wherever it runs; load them by
name with ``elastic.config.bundled_config`` (``ecpt train --config tiny-cpu``).
"""
