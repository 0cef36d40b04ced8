"""nld_adapter.json: what the trainer records next to a PEFT adapter, read and written only through AdapterMeta.

An adapter folder without it (NVIDIA's released `linear_spec_lora/`) reads as the defaults. Version 1 is the first
versioned schema; files written before versioning carry the same fields without `schema_version` and read as 1.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

META_FILE = "nld_adapter.json"
SCHEMA_VERSION = 1
LORA_MODES = ("draft_only", "both")
DRAFT_LAYOUTS = ("linear", "quadratic")


class AdapterMetaError(ValueError):
    """An nld_adapter.json that cannot be read; the message names the file and the field."""


@dataclass
class AdapterMeta:
    """The trainer's record of an adapter: its base, how the runtime should use it, and how it was chosen."""

    base_model: str = ""
    base_weights_hash: str = ""
    lora_mode: str = "draft_only"  # the adapter's default lora_mode at inference
    draft_len: int | None = None  # trained draft length (the runtime's default draft_len with this adapter)
    draft_layout: str = "linear"  # linear (mode self_spec) | quadratic (self_spec_quadratic)
    block_size: int | None = None
    base_quantization: str | None = None  # "4bit" / "8bit" when trained on a QLoRA base
    train_config: dict[str, Any] = field(default_factory=dict)
    step: int | None = None  # the training step selected
    eval: dict[str, Any] = field(default_factory=dict)  # its evaluation (simulated_acceptance, per_position, ...)
    baseline_simulated_acceptance: float | None = None
    schema_version: int = SCHEMA_VERSION

    @property
    def per_position(self) -> list[float] | None:
        """Evaluated per-position acceptance rates r_j with the adapter, if recorded."""
        rates = self.eval.get("per_position")
        return list(rates) if rates else None

    @classmethod
    def read(cls, folder: str | os.PathLike) -> AdapterMeta:
        """The adapter folder's nld_adapter.json, or the defaults when it has none."""
        path = Path(folder) / META_FILE
        if not path.exists():
            return cls()
        try:
            raw = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise AdapterMetaError(f"{path}: invalid JSON at line {err.lineno}: {err.msg}") from err
        except OSError as err:
            raise AdapterMetaError(f"{path}: cannot be read ({err.strerror})") from err
        if not isinstance(raw, dict):
            raise AdapterMetaError(f"{path}: expected a JSON object, found {type(raw).__name__}")
        return cls.from_dict(raw, str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = META_FILE) -> AdapterMeta:
        version = raw.get("schema_version", SCHEMA_VERSION)
        if not isinstance(version, int) or version > SCHEMA_VERSION:
            raise AdapterMetaError(f"{source}: schema_version {version!r} is newer than this nld_lora reads "
                                   f"({SCHEMA_VERSION}); upgrade nld_lora")
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(raw) - names)
        if unknown:
            raise AdapterMetaError(f"{source}: unknown field(s) {unknown}; known: {sorted(names)}")
        meta = cls(**raw)
        meta.validate(source)
        return meta

    def validate(self, source: str = META_FILE) -> None:
        def bad(name: str, expected: str) -> AdapterMetaError:
            return AdapterMetaError(f"{source}: field {name!r} is {getattr(self, name)!r}; expected {expected}")

        if self.lora_mode not in LORA_MODES:
            raise bad("lora_mode", f"one of {LORA_MODES}")
        if self.draft_layout not in DRAFT_LAYOUTS:
            raise bad("draft_layout", f"one of {DRAFT_LAYOUTS}")
        for name in ("draft_len", "block_size", "step"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 0):
                raise bad(name, "a non-negative integer or null")
        if self.draft_len is not None and self.draft_len < 1:
            raise bad("draft_len", "an integer >= 1 or null")
        if self.base_quantization not in (None, "4bit", "8bit"):
            raise bad("base_quantization", "null, '4bit' or '8bit'")
        for name in ("train_config", "eval"):
            if not isinstance(getattr(self, name), dict):
                raise bad(name, "an object")
        rates = self.eval.get("per_position")
        if rates is not None and not (isinstance(rates, list) and all(isinstance(r, (int, float)) for r in rates)):
            raise AdapterMetaError(f"{source}: field 'eval.per_position' must be a list of numbers")

    def write(self, folder: str | os.PathLike) -> Path:
        """Write nld_adapter.json into folder (through a temporary file, so a reader never sees half of it)."""
        self.schema_version = SCHEMA_VERSION
        self.validate(str(Path(folder) / META_FILE))
        path = Path(folder) / META_FILE
        tmp = path.with_name(f".{META_FILE}.tmp")
        tmp.write_text(json.dumps(dataclasses.asdict(self), indent=2) + "\n")
        os.replace(tmp, path)
        return path
