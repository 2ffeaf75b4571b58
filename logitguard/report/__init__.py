"""Reports: what people read.

- `summary`: what a table holds (``inspect``) and the shared text / markdown rendering (`render_table`,
  `percent`, `markdown_frame`).
- `demo`: the main job's report (``logitguard demo``); `plots`: its figures (optional matplotlib).
- `published`: the seed papers' published figures (read from seed-figures.json), quoted in Reference blocks.
- `threats`: the report's opening summary and threat-model tables.

Nothing is imported here: importing one module does not pull in the others.
"""
