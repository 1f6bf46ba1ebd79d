"""ShapesWorld's vocabulary: the attributes and relations a scene can have, and the words captions use for them.

Every name here is a plain constant: scene sampling (:mod:`.scenes`), rendering (:mod:`.render`) and the caption
writers (:mod:`.captions`, :mod:`.negatives`) all read them, and other modules (VQA questions, bridge evaluation)
import them to ask about the same colours and shapes.
"""
from __future__ import annotations

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "diamond", "cross")
COLOURS: tuple[str, ...] = ("red", "green", "blue", "yellow", "purple", "orange")
SIZES: tuple[str, ...] = ("small", "large")
RELATIONS: tuple[str, ...] = ("left_of", "right_of", "above", "below", "in_front_of", "behind")
REVERSE_RELATION = {"left_of": "right_of", "right_of": "left_of", "above": "below", "below": "above",
                    "in_front_of": "behind", "behind": "in_front_of"}
SPATIAL_RELATIONS = ("left_of", "right_of", "above", "below")
DEPTH_RELATIONS = ("in_front_of", "behind")
REGIONS: tuple[str, ...] = ("top left", "top", "top right", "left", "centre", "right",
                            "bottom left", "bottom", "bottom right")
HARD_NEGATIVE_KINDS: tuple[str, ...] = ("swap_attributes", "reverse_relation", "change_attribute")
NUMBER_WORDS = ("zero", "one", "two", "three", "four")

COLOUR_RGB = {"red": (210, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 215),
              "yellow": (230, 210, 50), "purple": (140, 60, 180), "orange": (240, 135, 30)}
COLOUR_WORDS = {"red": ("red", "crimson", "scarlet"), "green": ("green", "emerald"), "blue": ("blue", "cobalt"),
                "yellow": ("yellow", "golden"), "purple": ("purple", "violet"), "orange": ("orange", "tangerine")}
SHAPE_WORDS = {"circle": ("circle", "disc"), "square": ("square",), "triangle": ("triangle",), "star": ("star",),
               "diamond": ("diamond", "rhombus"), "cross": ("cross", "plus sign")}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big", "huge")}
RELATION_WORDS = {
    "left_of": ("left of", "to the left of", "on the left of"),
    "right_of": ("right of", "to the right of", "on the right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "in_front_of": ("in front of", "closer to the camera than", "nearer to the viewer than"),
    "behind": ("behind", "farther from the camera than", "further back than"),
}
WHERE_WORDS = {  # "there is B; <where> sits A"
    "left_of": ("to its left", "on its left"), "right_of": ("to its right", "on its right"),
    "above": ("above it",), "below": ("below it", "beneath it"),
    "in_front_of": ("in front of it",), "behind": ("behind it",),
}
REGION_WORDS = {
    "top left": ("in the top left", "in the top left corner"), "top": ("at the top", "near the top"),
    "top right": ("in the top right", "in the top right corner"), "left": ("on the left", "at the left side"),
    "centre": ("in the centre", "in the middle"), "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left", "in the bottom left corner"), "bottom": ("at the bottom", "near the bottom"),
    "bottom right": ("in the bottom right", "in the bottom right corner"),
}
