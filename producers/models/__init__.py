"""Classifiers on the producer side: building, saving and loading them (`classifiers`), their training
objectives (`training`), input sensitivity (`insen`) and the image-space GRED defense (`gred`)."""
