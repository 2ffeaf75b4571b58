"""Export: logit tables from a model, a dataset and attacks, and the same on Ray actors (`scale`).

`logits.export` makes an `ExportPlan` (`plan`: what to export, checked once; the attack requests in
`attack_specs`) and runs it (`execute`, staging in `staging`).
"""
