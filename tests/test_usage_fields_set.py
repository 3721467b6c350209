"""The fields set Usage.from_openai_chat shares never leaks between instances."""

from __future__ import annotations

from pydantic import ConfigDict

from aimiddleware import Usage


class MutableUsage(Usage):
    model_config = ConfigDict(frozen=False)


def test_assigning_on_a_mutable_subclass_leaves_other_usages_fields_set_alone() -> None:
    mine = MutableUsage.from_openai_chat({"prompt_tokens": 1, "completion_tokens": 2})
    mine.cache_creation_input_tokens = 3  # pydantic adds the name to mine's fields set
    assert "cache_creation_input_tokens" in mine.model_fields_set
    other = Usage.from_openai_chat({"prompt_tokens": 1, "completion_tokens": 2})
    assert "cache_creation_input_tokens" not in other.model_fields_set
    assert "cache_creation_input_tokens" not in other.model_dump(exclude_unset=True)


def test_model_copy_with_update_leaves_the_shared_set_alone() -> None:
    first = Usage.from_openai_chat({"prompt_tokens": 1, "completion_tokens": 2})
    copied = first.model_copy(update={"cache_creation_input_tokens": 4})
    assert "cache_creation_input_tokens" in copied.model_fields_set
    again = Usage.from_openai_chat({"prompt_tokens": 1, "completion_tokens": 2})
    assert "cache_creation_input_tokens" not in again.model_fields_set
    assert "cache_creation_input_tokens" not in first.model_fields_set
