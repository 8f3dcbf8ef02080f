"""docs/configuration.md is generated from the config dataclasses and must stay equal to the generator's output."""

import dataclasses
import typing
from pathlib import Path

from moe_dist import config_docs
from moe_dist.engine.config import RunConfig
from moe_dist.models.config import ModelConfig
from moe_dist.moe.config import MoEConfig

DOC = Path(__file__).resolve().parents[2] / "docs" / "configuration.md"
REGENERATE = "regenerate it: python -m moe_dist.config_docs > docs/configuration.md"


def _keys(cls, prefix=""):
    """Every dotted leaf key of ``cls``, recursing into dataclass sections."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield from _keys(hints[f.name], f"{prefix}{f.name}.")
        else:
            yield prefix + f.name


def test_configuration_md_is_the_generated_text():
    assert DOC.read_text() == config_docs.render(), f"docs/configuration.md is stale; {REGENERATE}"


def test_every_field_has_a_row_with_a_meaning():
    text = config_docs.render()
    keys = list(_keys(RunConfig)) + list(_keys(ModelConfig, "model.")) + list(_keys(MoEConfig, "model.moe."))
    assert len(keys) > 80
    for key in keys:
        assert f"| `{key}` |" in text, f"{key} is missing from the configuration reference"
    for cls, prefix in ((RunConfig, ""), (ModelConfig, "model."), (MoEConfig, "model.moe.")):
        for _, _, rows in config_docs.walk(cls, prefix):
            for row in rows:
                assert row.meaning, f"{row.key} has no comment, docstring entry or NOTES line"


def test_notes_name_real_fields():
    classes = {}
    for cls, prefix in ((RunConfig, ""), (ModelConfig, "model."), (MoEConfig, "model.moe.")):
        for _, sub, _ in config_docs.walk(cls, prefix):
            classes[sub.__name__] = {f.name for f in dataclasses.fields(sub)}
    for key in config_docs.NOTES:
        cls, _, name = key.partition(".")
        assert name in classes.get(cls, ()), f"NOTES[{key!r}] names no field"


def test_field_comments_and_docstring_entries_are_read():
    # the comment on RunConfig.steps' line, a MoEConfig docstring entry and a registry's names
    text = config_docs.render()
    assert "| `steps` | `int` | `100` | optimizer steps |" in text
    assert "divide the selected gate weights by their sum" in text
    assert "`topk`, `threshold`, `top_p`" in text
