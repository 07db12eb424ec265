"""Augmentations and tf.data input pipelines."""
