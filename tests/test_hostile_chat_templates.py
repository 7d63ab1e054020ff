"""Hostile chat templates (a tokenizer folder's chat_template.jinja or tokenizer_config.json):
each one ends in one DataError naming the tokenizer, never a traceback, a hang or an allocation
without bound; nothing in the sandbox reaches Python's internals."""

import json

import pytest
from test_own_data import CHATML, bpe_tokenizer

import data
from data import DataError, load_tokenizer, prompt_text

pytest.importorskip("jinja2")

TEMPLATES = [  # (template, what the error says)
    ("{{ raise_exception('this template takes no system role') }}",
     "fails to render: TemplateError: this template takes no system role"),
    ("{{ messages[0].content.nothing.deeper }}", "fails to render: UndefinedError"),
    ("{{ ''.__class__.__mro__[1].__subclasses__() }}", "fails to render: SecurityError"),
    ("{{ messages.append(1) }}", "fails to render: SecurityError"),  # the sandbox is immutable
    ("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "fails to render: RecursionError"),
    ("{{ 'x' * 100000000 }}", "fails to render: SecurityError: a sequence multiplied past"),
    ("{{ 10 ** 100000000 }}", "fails to render: SecurityError: a power too large"),
    ("{% for i in range(100000000) %}x{% endfor %}", "fails to render: OverflowError"),  # the sandbox's range
    ("{% for i in range(99999) %}xxxxxxxxxx{% endfor %}", "renders 999,990 characters for one conversation"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}",
     "fails to render: TemplateTimeout: it ran for over 1 s"),
    ("{% for %}", "the chat template does not parse"),
    ("   ", "the chat template is empty"),
]


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setattr(data, "CHAT_RENDER_SECONDS", 1)
    data._RENDERERS.clear()
    bpe_tokenizer(tmp_path, False)
    return tmp_path


@pytest.mark.parametrize("template, says", TEMPLATES)
def test_a_hostile_template_is_one_data_error(folder, template, says):
    (folder / "chat_template.jinja").write_text(template)
    with pytest.raises(DataError, match=r"tokenizer\.json: ") as e:
        prompt_text("What is 2 + 2?", "chat", load_tokenizer(str(folder / "tokenizer.json")))
    assert says in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("value", [5, None, [], ["not a dict", 3], [{"name": "tool_use", "template": CHATML}],
                                   {"default": CHATML}])
def test_a_config_template_of_the_wrong_type_is_no_template(folder, value):
    """tokenizer_config.json's chat_template: a string, or a list of named ones whose "default" is
    used; anything else is no template, one line."""
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": value}))
    with pytest.raises(DataError, match="no chat template"):
        prompt_text("Q", "chat", load_tokenizer(str(folder / "tokenizer.json")))


def test_several_named_templates_use_the_default_one(folder):
    config = json.loads((folder / "tokenizer_config.json").read_text())
    named = [{"name": "tool_use", "template": "{{ raise_exception('not this one') }}"},
             {"name": "default", "template": CHATML}]
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, "chat_template": named}))
    text = prompt_text("Q", "chat", load_tokenizer(str(folder / "tokenizer.json")))
    assert text == "<|im_start|>user\nQ<|im_end|>\n<|im_start|>assistant\n"
