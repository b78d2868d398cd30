"""ctmkit host: configuration, plugin manager, coefficient math, stages."""

from pathlib import Path

__version__ = "0.1.0"
#: the checkout this package runs from (its build/ folder holds ctm_sample)
REPO = Path(__file__).resolve().parent.parent
