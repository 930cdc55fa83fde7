"""Shipped YAML configs, installed as the package data of ``pipeline.configs``."""
