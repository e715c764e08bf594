"""mkdocs hooks: the recipe guide's table of `RANConfig` fields is generated from the fields themselves."""

from __future__ import annotations

import dataclasses

MARKER = "<!-- ran-config-fields -->"


def ran_config_fields_table() -> str:
    """One row per recipe field of `RANConfig`: name, default and its help text (the field's own metadata)."""
    from ran_peft import RANConfig
    from ran_peft.config import _LORA_FIELD_NAMES

    rows = ["| field | default | meaning |", "| --- | --- | --- |"]
    for field in dataclasses.fields(RANConfig):
        if field.name in _LORA_FIELD_NAMES or not field.metadata.get("help"):
            continue
        default = field.default if field.default is not dataclasses.MISSING else field.default_factory()
        text = " ".join(str(field.metadata["help"]).split()).replace("|", "\\|")
        rows.append(f"| `{field.name}` | `{default!r}` | {text} |")
    return "\n".join(rows)


def on_page_markdown(markdown: str, page, config, files) -> str:
    if MARKER in markdown:
        markdown = markdown.replace(MARKER, ran_config_fields_table())
    return markdown
