"""Shipped YAML configs, installed as the package data of ``funkflow.configs``."""
