"""How far a batch-normalised checkpoint's running statistics lag its network: MAE on DUTS-TR val images with the
running statistics (what prediction uses) and with each batch's own, on the same batch.

    python benchmarks/bn_statistics.py RUN/last.safetensors [--images 16]
"""

import argparse

import torch

from pfanet.data import load_pair, read_pairs
from pfanet.train import evenly_spaced
from pfanet.transforms import preprocess, square_bilinear
from pfanet.weights import load_checkpoint

ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
ap.add_argument("weights")
ap.add_argument("--images", type=int, default=16)
ap.add_argument("--val", default="../shared/data/duts-tr/val.txt")
args = ap.parse_args()
model, spec, meta = load_checkpoint(args.weights)
pairs = evenly_spaced(read_pairs(args.val), args.images)
xs, ys = [], []
for i, m in pairs:
    img, mask = load_pair(i, m)
    xs.append(preprocess(img, spec)); ys.append(torch.from_numpy(square_bilinear(mask / 255.0, spec.size)))
x, y = torch.stack(xs), torch.stack(ys)
with torch.no_grad():
    model.eval(); pe = torch.sigmoid(model(x))[:, 0]
    model.train()
    for mod in model.modules():
        if isinstance(mod, torch.nn.Dropout): mod.eval()
    pt = torch.sigmoid(model(x))[:, 0]
print("step", meta["training"].get("step"), "eval-mode MAE", (pe - y).abs().mean().item(), "mean pred", pe.mean().item(),
      "| batch-stats MAE", (pt - y).abs().mean().item(), "mean pred", pt.mean().item(), "| target mean", y.mean().item())
