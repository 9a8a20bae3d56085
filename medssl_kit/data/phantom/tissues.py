"""The phantom's tissue classes and the segmentation labels they map to."""

from __future__ import annotations

from enum import IntEnum

import numpy as np

LABELS: dict[int, str] = {
    0: "background",
    1: "liver",
    2: "spleen",
    3: "kidney_left",
    4: "kidney_right",
    5: "aorta",
    6: "vertebra",
    7: "liver_lesion",
}
SOURCE_CLASSES: dict[str, list[int]] = {"A": [1, 7], "B": [3, 4], "C": [2, 5]}


class Tissue(IntEnum):
    """Tissue classes of the phantom's internal tissue map (``PhantomCase.tissue``)."""

    AIR = 0
    SUBCUTANEOUS_FAT = 1
    MUSCLE = 2
    VISCERAL_FAT = 3
    BOWEL_WALL = 4
    BOWEL_CONTENT = 5
    BOWEL_GAS = 6
    COLON_CONTENT = 7
    LUNG = 8
    LUNG_VESSEL = 9
    HEART_WALL = 10
    HEART_BLOOD = 11
    RIB = 12
    STOMACH_WALL = 13
    STOMACH_CONTENT = 14
    PANCREAS = 15
    GALLBLADDER = 16
    LIVER = 17
    LIVER_VESSEL = 18
    LIVER_LESION = 19
    SPLEEN = 20
    KIDNEY_LEFT_CORTEX = 21
    KIDNEY_LEFT_MEDULLA = 22
    KIDNEY_RIGHT_CORTEX = 23
    KIDNEY_RIGHT_MEDULLA = 24
    AORTA = 25
    ARTERY = 26
    IVC = 27
    VEIN = 28
    VERTEBRA_CORTICAL = 29
    VERTEBRA_CANCELLOUS = 30
    VERTEBRA_POSTERIOR = 31
    DISC = 32
    SPINAL_CANAL = 33
    RENAL_PELVIS = 34
    TABLE = 35


TISSUES: dict[int, str] = {int(t): t.name.lower() for t in Tissue}

_T = Tissue
_TISSUE_LABEL = np.zeros(len(Tissue), dtype=np.uint8)
for _tissues, _label in (
    ((_T.LIVER, _T.LIVER_VESSEL), 1),
    ((_T.SPLEEN,), 2),
    ((_T.KIDNEY_LEFT_CORTEX, _T.KIDNEY_LEFT_MEDULLA), 3),
    ((_T.KIDNEY_RIGHT_CORTEX, _T.KIDNEY_RIGHT_MEDULLA), 4),
    ((_T.AORTA,), 5),
    ((_T.VERTEBRA_CORTICAL, _T.VERTEBRA_CANCELLOUS, _T.VERTEBRA_POSTERIOR), 6),
    ((_T.LIVER_LESION,), 7),
):
    _TISSUE_LABEL[list(_tissues)] = _label
