"""ctmkit host: configuration, plugin manager, coefficient math, stages."""

__version__ = "0.1.0"
