"""Learning happens: a 3D AGUNet with deep supervision, trained on synthetic tumour volumes with
MONAI's DiceCE and deep-supervision losses, segments held-out volumes as no constant can."""
import torch
from torch.utils.data import DataLoader

from attnzoo.recipes.data.volumes import VolumeDataset, write_synthetic_volumes
from attnzoo.zoo.medical import create_medical_model

STEPS = 60


def test_3d_agunet_learns_synthetic_tumours(tmp_path):
    from monai.losses import DeepSupervisionLoss, DiceCELoss
    from monai.metrics import DiceMetric
    from monai.networks.utils import one_hot

    write_synthetic_volumes(tmp_path, num_cases=8, shape=(16, 16, 16), seed=0, min_radius=0.2, max_radius=0.35)
    names = [f'case_{i:03d}' for i in range(8)]
    train = next(iter(DataLoader(VolumeDataset(tmp_path, cases=names[:6]), batch_size=6)))
    held_out = next(iter(DataLoader(VolumeDataset(tmp_path, cases=names[6:]), batch_size=2)))

    torch.manual_seed(0)
    model = create_medical_model('agunet', spatial_dims=3, channels=(8, 16, 32), deep_supervision=True)
    # the paper sums one DiceCE per decoder level against the label downsampled to it
    loss_fn = DeepSupervisionLoss(DiceCELoss(to_onehot_y=True, softmax=True), weight_mode='same')
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    x, y = train['image'], train['label'][:, None].float()
    losses = []
    model.train()
    for step in range(STEPS):
        idx = torch.arange(3) + 3 * (step % 2)
        out = model(x[idx])
        assert isinstance(out, list) and len(out) == 2
        loss = loss_fn(out, y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-4:]) / 4 < 0.6 * sum(losses[:2]) / 2, losses

    model.eval()
    with torch.no_grad():
        logits = model(held_out['image'])
    assert isinstance(logits, torch.Tensor) and logits.shape == (2, 2, 16, 16, 16)
    target = one_hot(held_out['label'][:, None], 2)
    dice = DiceMetric(include_background=False)(one_hot(logits.argmax(1, keepdim=True), 2), target).mean().item()
    # the best constant: all tumour (all background scores 0)
    constant = DiceMetric(include_background=False)(one_hot(torch.ones_like(held_out['label'][:, None]), 2),
                                                     target).mean().item()
    assert dice > 0.6 and dice > constant + 0.4, (dice, constant)
