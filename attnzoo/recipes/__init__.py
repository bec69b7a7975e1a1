"""Lightning training recipes (tasks, data modules, augmentation presets, configs).

Imported only on demand: ``import attnzoo`` never imports Lightning or albumentations.
"""
