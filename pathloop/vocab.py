"""Class vocabularies and the 7 plausibility criteria.

One shared definition used by the phantom renderer, the judge, the feedback store, the reward
model and the review UI. A vocabulary travels with every shard set (``manifest.json``) and every
checkpoint (``classes.json``), so a path alone says what class id 3 means.
"""

from __future__ import annotations

import json
from pathlib import Path

from pydantic import BaseModel, ConfigDict, Field

# The 7 criteria of Sun et al. 2023 (Sec. 4.1), in the order the review UI binds to keys 1-7.
CRITERIA: tuple[str, ...] = (
    "cell_size",
    "nucleus_shape_size",
    "nc_ratio",
    "cytoplasm",
    "chromatin",
    "inclusions",
    "granules",
)

CRITERIA_TEXT: dict[str, str] = {
    "cell_size": "Cell size",
    "nucleus_shape_size": "Nucleus shape and size",
    "nc_ratio": "Nucleus-to-cytoplasm ratio",
    "cytoplasm": "Cytoplasm colour and consistency",
    "chromatin": "Chromatin pattern",
    "inclusions": "Inclusions (nucleoli, vacuoles)",
    "granules": "Granules",
}


class ClassInfo(BaseModel):
    """One class of a dataset: a stable integer id, a name, a short code and what it looks like."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    id: int = Field(ge=0, description="Integer label used by models; 0..K-1, dense.")
    name: str = Field(min_length=1, description="Human name, unique in the vocabulary.")
    code: str = Field(min_length=1, description="Short code (the paper's, e.g. M5), unique.")
    description: str = Field("", description="What an expert expects to see; shown in the UI.")
    subtypes: tuple[str, ...] = Field((), description="Subtypes an expert may record, if any.")
    parent: str | None = Field(
        None, description="Code of the class this one was split from (new concepts); else None."
    )


class Vocabulary(BaseModel):
    """An ordered set of classes; ids are dense 0..K-1 and names and codes are unique."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    classes: tuple[ClassInfo, ...]

    def model_post_init(self, __context: object) -> None:
        ids = [c.id for c in self.classes]
        if ids != list(range(len(ids))):
            raise ValueError(f"class ids must be 0..{len(ids) - 1} in order, got {ids}")
        for attr in ("name", "code"):
            values = [getattr(c, attr) for c in self.classes]
            dupes = sorted({v for v in values if values.count(v) > 1})
            if dupes:
                raise ValueError(f"duplicate class {attr}s: {dupes}")

    def __len__(self) -> int:
        return len(self.classes)

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.classes]

    def lookup(self, key: str | int) -> ClassInfo:
        """Find a class by id, name or code (case-insensitive); unknown keys list the valid ones."""
        if isinstance(key, int) or (isinstance(key, str) and key.isdigit()):
            idx = int(key)
            if 0 <= idx < len(self.classes):
                return self.classes[idx]
        else:
            low = key.strip().lower()
            for c in self.classes:
                if low in (c.name.lower(), c.code.lower()):
                    return c
        valid = ", ".join(f"{c.code} ({c.name})" for c in self.classes)
        raise KeyError(f"unknown class {key!r}; valid classes: {valid}")

    def save(self, path: str | Path) -> None:
        Path(path).write_text(json.dumps(self.model_dump(mode="json"), indent=2))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        return cls.model_validate_json(Path(path).read_text())

    def with_subclasses(self, parent: str | int, subtypes: tuple[str, ...]) -> Vocabulary:
        """This vocabulary plus one class per subtype of ``parent``, appended with the next ids
        (so every old id keeps its meaning). New classes are named "<parent name> <subtype>",
        coded "<parent code>-<subtype>" and record ``parent`` (the new-concepts step)."""
        p = self.lookup(parent)
        if not subtypes:
            raise ValueError(f"class {p.code} ({p.name}): no subtypes given to split it into")
        new = tuple(
            ClassInfo(
                id=len(self.classes) + i,
                name=f"{p.name} {s}",
                code=f"{p.code}-{s}",
                description=f"The {s} form of {p.name} ({p.code}). {p.description}".strip(),
                parent=p.code,
            )
            for i, s in enumerate(subtypes)
        )
        return Vocabulary(classes=self.classes + new)

    @classmethod
    def from_names(cls, names: list[str]) -> Vocabulary:
        """A plain vocabulary for an image folder: ids in sorted-name order, code = name."""
        return cls(
            classes=tuple(ClassInfo(id=i, name=n, code=n) for i, n in enumerate(sorted(names)))
        )


def _c(i: int, code: str, name: str, desc: str, subtypes: tuple[str, ...] = ()) -> ClassInfo:
    return ClassInfo(id=i, name=name, code=code, description=desc, subtypes=subtypes)


# The 16 bone-marrow cell types of Sun et al. 2023. Codes are the paper's: the letters name the
# lineage (B basophil, E eosinophil, ER erythroid, M myeloid/neutrophil, MO monocyte) and the
# number the maturation stage; the names below are the standard stage names for those codes.
BONE_MARROW_16 = Vocabulary(
    classes=(
        _c(0, "B1", "basophilic myelocyte", "Round nucleus, blue cytoplasm, few dark granules."),
        _c(1, "B2", "basophil", "Lobed nucleus hidden under large dark-purple granules."),
        _c(
            2,
            "E1",
            "eosinophilic myelocyte",
            "Round/oval nucleus, pink cytoplasm, orange granules.",
        ),
        _c(3, "E4", "eosinophil", "Bilobed nucleus, pink cytoplasm packed with orange granules."),
        _c(4, "ER1", "proerythroblast", "Large cell, round nucleus with nucleoli, deep-blue rim."),
        _c(5, "ER2", "basophilic erythroblast", "Round nucleus, coarse chromatin, blue cytoplasm."),
        _c(
            6,
            "ER3",
            "polychromatic erythroblast",
            "Smaller, clumped chromatin, grey-lilac cytoplasm.",
        ),
        _c(7, "ER4", "orthochromatic erythroblast", "Small pyknotic nucleus, pink cytoplasm."),
        _c(8, "ER5", "polychromatic erythrocyte", "No nucleus, lilac-pink disc, slightly large."),
        _c(9, "ER6", "erythrocyte", "No nucleus, pink disc with central pallor."),
        _c(10, "M1", "myeloblast", "High N:C, fine chromatin, nucleoli, blue agranular rim."),
        _c(11, "M2", "promyelocyte", "Large, oval nucleus, azurophilic granules, blue cytoplasm."),
        _c(
            12,
            "M3",
            "myelocyte",
            "Round nucleus, coarser chromatin, lilac cytoplasm, fine granules.",
        ),
        _c(
            13, "M4", "metamyelocyte", "Kidney-shaped nucleus, pale lilac cytoplasm, fine granules."
        ),
        _c(
            14,
            "M5",
            "neutrophil",
            "Band or 2-5 segmented lobes, clumped chromatin, pale pink cytoplasm, fine granules.",
            ("band", "segmented"),
        ),
        _c(
            15, "MO2", "monocyte", "Large, indented/folded nucleus, grey-blue vacuolated cytoplasm."
        ),
    )
)
