"""Published figures of the seed papers, printed beside ours in the demo report (clearly labelled).

Each entry: ``source`` (paper and table), ``setup`` (their data and model) and ``figures`` (strings,
quoted as published). Only figures found in the papers are listed; nothing here is measured by us.
"""

PUBLISHED: dict[str, dict] = {}
