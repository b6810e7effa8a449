"""The package version, at the bottom of the import graph (files record which han-edge wrote them)."""
__version__ = "0.1.0"
