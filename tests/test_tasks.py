"""Tasks as plug-ins: the registry, the built-in tasks' specs, a toy task through split and export."""

import pytest

from semedge.core.errors import UserError
from semedge.semcom.tasks.base import FEATURES, Task
from semedge.semcom.tasks.registry import TASKS, get_task


def test_registry_holds_the_built_in_tasks():
    assert {"speech", "text"} <= set(TASKS)
    assert all(isinstance(t, Task) and TASKS[n] is t and t.name == n for n, t in TASKS.items())
    for t in TASKS.values():
        assert t.features <= set(FEATURES), t.name
        assert set(t.export.inputs) | {t.export.output} == set(t.export.dynamic_axes), t.name


def test_unknown_task_names_the_known_ones():
    with pytest.raises(UserError) as e:
        get_task("sign-language")
    assert "speech" in str(e.value) and "text" in str(e.value)


def test_speech_and_text_specs():
    speech, text = get_task("speech"), get_task("text")
    assert speech.export.inputs == ("input_features",) and speech.fills_silence
    assert text.export.inputs == ("input_ids", "attention_mask") and not text.fills_silence
    assert speech.supports("link-eval") and not text.supports("link-eval")
