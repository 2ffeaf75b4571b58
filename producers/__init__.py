"""logitguard producers: run real classifiers and real attacks once, export logit tables.

This is the only package that touches images, models and attacks; `logitguard` never imports it, and it uses
the core's public modules only. Packages: `data` (datasets, noise queries), `models` (classifiers, training,
InSen, GRED), `attacks`, `threat` (mirrors of saved defenses), `export` (logit tables, on Ray too) and `cli`
(the `logitguard-produce` command); docs/architecture.md.
"""

__version__ = "0.1.0"
