"""``Res5ROIHeadsExtraNorm``: MoCo's R50-C4 ROI head, with a BN after the res5 stage.

MoCo (He et al. 2020, Sec. 4.2 and appendix) fine-tunes R50-C4 with a normalization layer after res5 in the box
head, because the pretrained features come without one. MoCo defined the class inside its ``train_net.py``, so stock
detectron2 tools failed with "Res5ROIHeadsExtraNorm is not registered"; here ``import transfer.detection`` registers
it in ``ROI_HEADS_REGISTRY``, and ``MODEL.ROI_HEADS.NAME: Res5ROIHeadsExtraNorm`` works in any detectron2 script.
"""

from __future__ import annotations

from detectron2.layers import get_norm
from detectron2.modeling.roi_heads import ROI_HEADS_REGISTRY, Res5ROIHeads


@ROI_HEADS_REGISTRY.register()
class Res5ROIHeadsExtraNorm(Res5ROIHeads):
    """Res5ROIHeads whose res5 block ends with ``norm`` = ``get_norm(MODEL.RESNETS.NORM, 2048)``."""

    @classmethod
    def _build_res5_block(cls, cfg):
        seq, out_channels = super()._build_res5_block(cfg)
        seq.add_module("norm", get_norm(cfg.MODEL.RESNETS.NORM, out_channels))
        return seq, out_channels
