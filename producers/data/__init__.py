"""Inputs of the producer: image datasets (`datasets`) and the noise queries' recipe (`noise`)."""
