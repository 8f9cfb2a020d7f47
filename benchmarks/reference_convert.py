"""MoCo's checkpoint converter (facebookresearch/moco ``detection/convert-pretrain-to-detectron2.py``), re-written
with the same steps, as the reference the converter benchmark divides by.

    python -m benchmarks.reference_convert checkpoint_with_module_prefix.pth.tar out.pkl

Steps as the original: ``torch.load`` on the CPU, keep ``module.encoder_q.*`` keys (head included, as the original
did), rename torchvision -> detectron2 (``stem.``, ``layerN`` -> ``res{N+1}``, ``bnK`` -> ``convK.norm``,
``downsample.0/1`` -> ``shortcut[.norm]``), print every mapping, ``pickle.dump`` the dict.
"""

from __future__ import annotations

import pickle
import sys

import torch


def convert(src: str, dst: str) -> int:
    obj = torch.load(src, map_location="cpu", weights_only=False)["state_dict"]
    newmodel = {}
    for k, v in obj.items():
        if not k.startswith("module.encoder_q."):
            continue
        old_k = k
        k = k.replace("module.encoder_q.", "")
        if "layer" not in k:
            k = "stem." + k
        for t in [1, 2, 3, 4]:
            k = k.replace(f"layer{t}", f"res{t + 1}")
        for t in [1, 2, 3]:
            k = k.replace(f"bn{t}", f"conv{t}.norm")
        k = k.replace("downsample.0", "shortcut")
        k = k.replace("downsample.1", "shortcut.norm")
        print(old_k, "->", k)
        newmodel[k] = v.numpy()
    with open(dst, "wb") as f:
        pickle.dump({"model": newmodel, "__author__": "MOCO", "matching_heuristics": True}, f)
    return len(newmodel)


if __name__ == "__main__":
    convert(sys.argv[1], sys.argv[2])
