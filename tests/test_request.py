"""What `stage` refuses before anything runs: names by the Hub's rules, where the source is, file
names s5cmd can't be given. Pure: no network, no Prefect."""

from __future__ import annotations

import pytest

from modelferry.tasks.staging import request
from modelferry.tasks.errors import SettingsError


@pytest.mark.parametrize("name", ["acme/llama-ft", "sentence-transformers/all-MiniLM-L6-v2", "a/b.c_d"])
def test_names_the_hub_accepts(name):
    assert request.model_name(name, "--name") == name


@pytest.mark.parametrize("name", ["a/b/c", "org/", "/x", "../x", "acme/" + "x" * 300, "acme/a--b", "acme/a..b",
                                  "noslash", "acme/x.git", "acme/we ird"])
def test_names_the_hub_refuses(name):
    with pytest.raises(SettingsError, match="is not a model name"):
        request.model_name(name, "--name")


def test_where_the_source_is(tmp_path):
    (tmp_path / "ckpt").mkdir()
    assert request.where_from(str(tmp_path / "ckpt"), "acme/ft").kind == "local"
    assert request.where_from("acme/model", None) == request.Source("hub", "acme/model", "acme/model")
    with pytest.raises(SettingsError, match="pass --name"):
        request.where_from(str(tmp_path / "ckpt"), None)
    with pytest.raises(SettingsError, match="no such directory"):
        request.where_from(str(tmp_path / "missing"), "acme/ft")
    with pytest.raises(SettingsError, match="no such directory"):
        request.where_from("ckpts/step/1000", "acme/ft")
    with pytest.raises(SettingsError, match="neither an existing directory nor a Hub repo id"):
        request.where_from("org/", None)


def test_every_local_file_name_is_checked_before_anything_is_sent(tmp_path):
    d = tmp_path / "ckpt"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "model.safetensors").write_bytes(b"x")
    assert request.check(str(d), "acme/ft", [], [], False).kind == "local"
    (d / 'we"ird.safetensors').write_bytes(b"x")
    with pytest.raises(SettingsError, match="double quote"):
        request.check(str(d), "acme/ft", [], [], False)
    assert request.check(str(d), "acme/ft", [], ["we*"], False).kind == "local"  # --exclude leaves it out
