"""Evaluation with the reference tools' numbers: ImageNet as timm's validate.py, COCO as pycocotools'
COCOeval, semantic segmentation as mmseg's IoU metric. The scripts in ``scripts/`` are thin wrappers.

Each module imports its heavy dependencies itself; this package imports none of them.
"""
