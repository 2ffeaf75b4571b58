"""Classifiers on the producer side: their networks (`networks`), building, saving and loading them
(`classifiers`), their training objectives (`training`), input sensitivity (`insen`) and the image-space
GRED defense (`gred`)."""
