"""Evaluation: reference metrics (metrics.py), TF-free TFDS builders for COCO captions, VQAv2 and
OwlEval (tfds_builders.py), and the batched generate-and-score loop behind `owl-eval` (run.py)."""
