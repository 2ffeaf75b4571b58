"""Export: logit tables from a model, a dataset and attacks (`logits`), and the same on Ray actors (`scale`)."""
