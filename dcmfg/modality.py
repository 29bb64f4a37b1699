"""The two node kinds of the cross-modal graph. One definition, so a 0/1 never means different things in two files."""

from __future__ import annotations

from enum import IntEnum


class Modality(IntEnum):
    IMAGE = 0
    TEXT = 1

    @property
    def key(self) -> str:
        """The prefix of this modality's feature tensors ("image_global", "text_words", ...)."""
        return "image" if self is Modality.IMAGE else "text"


IMAGE, TEXT = Modality.IMAGE, Modality.TEXT
