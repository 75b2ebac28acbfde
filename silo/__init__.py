"""SILO: a parametric LM trained only on permissive text, plus an attributable datastore."""

__version__ = "0.1.0"
