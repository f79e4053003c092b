"""Evaluation: reference metrics (metrics.py), TF-free TFDS builders for COCO captions, VQAv2 and
OwlEval (tfds_builders.py) that record the raw files they read (raw_files.py) so a stale build is
rebuilt, and the batched generate-and-score loop behind `owl-eval` (run.py)."""
