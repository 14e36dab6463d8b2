"""Class names for DETR-panoptic: the COCO panoptic taxonomy and the model's ``config.json``.

The table is panopticapi's ``panoptic_coco_categories.json`` (133 categories: 80 things
with ids 1..90 and 53 stuff categories with ids 92..200, both with gaps). The DETR head is
251 wide (250 class slots plus no-object), so most slots are unused; the public configs
name the used ones and leave ``LABEL_n`` or ``N/A`` in some, which we fill from the table.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Optional

from config.errors import ModelIncompatible

# fmt: off
COCO_THINGS: dict[int, str] = {
    1: "person", 2: "bicycle", 3: "car", 4: "motorcycle", 5: "airplane", 6: "bus",
    7: "train", 8: "truck", 9: "boat", 10: "traffic light", 11: "fire hydrant",
    13: "stop sign", 14: "parking meter", 15: "bench", 16: "bird", 17: "cat", 18: "dog",
    19: "horse", 20: "sheep", 21: "cow", 22: "elephant", 23: "bear", 24: "zebra",
    25: "giraffe", 27: "backpack", 28: "umbrella", 31: "handbag", 32: "tie",
    33: "suitcase", 34: "frisbee", 35: "skis", 36: "snowboard", 37: "sports ball",
    38: "kite", 39: "baseball bat", 40: "baseball glove", 41: "skateboard",
    42: "surfboard", 43: "tennis racket", 44: "bottle", 46: "wine glass", 47: "cup",
    48: "fork", 49: "knife", 50: "spoon", 51: "bowl", 52: "banana", 53: "apple",
    54: "sandwich", 55: "orange", 56: "broccoli", 57: "carrot", 58: "hot dog",
    59: "pizza", 60: "donut", 61: "cake", 62: "chair", 63: "couch", 64: "potted plant",
    65: "bed", 67: "dining table", 70: "toilet", 72: "tv", 73: "laptop", 74: "mouse",
    75: "remote", 76: "keyboard", 77: "cell phone", 78: "microwave", 79: "oven",
    80: "toaster", 81: "sink", 82: "refrigerator", 84: "book", 85: "clock", 86: "vase",
    87: "scissors", 88: "teddy bear", 89: "hair drier", 90: "toothbrush",
}

COCO_STUFF: dict[int, str] = {
    92: "banner", 93: "blanket", 95: "bridge", 100: "cardboard", 107: "counter",
    109: "curtain", 112: "door-stuff", 118: "floor-wood", 119: "flower", 122: "fruit",
    125: "gravel", 128: "house", 130: "light", 133: "mirror-stuff", 138: "net",
    141: "pillow", 144: "platform", 145: "playingfield", 147: "railroad", 148: "river",
    149: "road", 151: "roof", 154: "sand", 155: "sea", 156: "shelf", 159: "snow",
    161: "stairs", 166: "tent", 168: "towel", 171: "wall-brick", 175: "wall-stone",
    176: "wall-tile", 177: "wall-wood", 178: "water-other", 180: "window-blind",
    181: "window-other", 184: "tree-merged", 185: "fence-merged", 186: "ceiling-merged",
    187: "sky-other-merged", 188: "cabinet-merged", 189: "table-merged",
    190: "floor-other-merged", 191: "pavement-merged", 192: "mountain-merged",
    193: "grass-merged", 194: "dirt-merged", 195: "paper-merged",
    196: "food-other-merged", 197: "building-other-merged", 198: "rock-merged",
    199: "wall-other-merged", 200: "rug-merged",
}
# fmt: on

COCO_PANOPTIC: dict[int, str] = {**COCO_THINGS, **COCO_STUFF}
COCO_THING_IDS: frozenset[int] = frozenset(COCO_THINGS)

_PLACEHOLDER = re.compile(r"^(LABEL_\d+|N/A|)$")


def label_name(label_id: int, id2label: dict[int, str]) -> str:
    """The name for ``label_id``: the config's, unless it is a placeholder, then COCO's."""
    name = id2label.get(label_id, "")
    if _PLACEHOLDER.match(name.strip()):
        return COCO_PANOPTIC.get(label_id, name.strip() or f"LABEL_{label_id}")
    return name


def load_labels(config_json_path: Optional[Path]) -> tuple[dict[int, str], frozenset[int]]:
    """``(id2label, thing_ids)`` from a transformers ``config.json`` (or None: COCO only).

    Every COCO id is present in the result; config names win where they are real names.
    """
    config_ids: dict[int, str] = {}
    if config_json_path is not None:
        try:
            raw = json.loads(Path(config_json_path).read_text()).get("id2label") or {}
            config_ids = {int(k): str(v) for k, v in raw.items()}
        except (OSError, ValueError, AttributeError) as e:
            raise ModelIncompatible(f"cannot read id2label from {config_json_path}: {e}") from None
    ids = set(config_ids) | set(COCO_PANOPTIC)
    id2label = {i: label_name(i, config_ids) for i in sorted(ids)}
    return id2label, COCO_THING_IDS
