"""logitguard producers: run real classifiers and real attacks once, export logit tables.

This is the only package that touches images, models and attacks; `logitguard` never imports it.
Packages: `data` (datasets, noise queries), `models` (classifiers, training, InSen, GRED), `attacks`,
`threat` (mirrors of saved defenses), `export` (logit tables, on Ray too); docs/architecture.md. The module
names from before that layout (``producers.datasets``, ``producers.training``, …) still import, as the very
same modules (`logitguard._compat`).
"""

from logitguard._compat import install

__version__ = "0.1.0"

# old name -> new name; ``producers.models`` and ``producers.export`` are packages now that re-export the
# names of the modules they were (`producers.models.classifiers`, `producers.export.logits`).
ALIASES: dict[str, str] = {
    "producers.datasets": "producers.data.datasets",
    "producers.noise": "producers.data.noise",
    "producers.training": "producers.models.training",
    "producers.gred": "producers.models.gred",
    "producers.insen": "producers.models.insen",
    "producers.scale": "producers.export.scale",
}

install(ALIASES)
