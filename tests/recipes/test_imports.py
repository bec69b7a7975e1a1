"""``import attnzoo`` and the light parts of ``attnzoo.recipes`` pull in no training stack."""
import subprocess
import sys

HEAVY = ('pytorch_lightning', 'lightning', 'albumentations', 'matplotlib', 'sklearn', 'jsonargparse', 'monai',
         'pycocotools', 'nibabel', 'segmentation_models_pytorch', 'torchmetrics')


def test_attnzoo_and_the_recipe_datasets_import_light():
    code = ('import sys, attnzoo, attnzoo.recipes, attnzoo.recipes.data.classification, attnzoo.recipes.sampling; '
            f'print([m for m in {HEAVY!r} if m in sys.modules])')
    out = subprocess.run([sys.executable, '-c', code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == '[]', out
