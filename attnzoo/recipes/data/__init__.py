"""Datasets of the recipes as plain torch/numpy code (no Lightning): readers of the on-disk layouts
and the embedded, generated sets that need no download."""
