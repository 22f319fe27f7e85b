"""RLHS hindsight simulation on a marketplace: the market math, seller policies, text form and the experiment.

Light at import (NumPy only); torch and transformers are imported by the submodules that need them.
"""
