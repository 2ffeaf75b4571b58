"""logitguard producers: run real classifiers and real attacks once, export logit tables.

This is the only package that touches images, models and attacks; `logitguard` never imports it.
"""

__version__ = "0.1.0"
