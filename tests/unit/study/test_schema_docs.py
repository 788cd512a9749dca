"""The study schema documents every field, and the README's study-file example uses only them.

The README's commented example and the schema's descriptions say the same
things; these tests keep a field from being added, renamed or dropped on one
side only.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import BaseModel

from llem_dispatch.study import BuildSpec, Study

README = Path(__file__).resolve().parents[3] / "README.md"


def readme_study_example() -> dict[str, Any]:
    """The YAML block of the README's "The study file" section, parsed."""
    section = README.read_text(encoding="utf-8").split("\n## The study file\n", 1)[1]
    section = section.split("\n## ", 1)[0]
    match = re.search(r"```yaml\n(.*?)\n```", section, re.DOTALL)
    assert match is not None, "the README's 'The study file' section has no yaml block"
    example = yaml.safe_load(match.group(1))
    assert isinstance(example, dict)
    return example


@pytest.mark.parametrize("model", [Study, BuildSpec])
def test_every_field_is_described(model: type[BaseModel]) -> None:
    undocumented = [
        name for name, field in model.model_fields.items() if not (field.description or "").strip()
    ]
    assert undocumented == []


def test_every_key_of_the_readme_example_is_a_study_field() -> None:
    keys = set(readme_study_example())
    assert "name" in keys
    assert sorted(keys - set(Study.model_fields)) == []


def test_the_readme_example_is_a_valid_study() -> None:
    study = Study.model_validate(readme_study_example())
    assert study.build is not None
