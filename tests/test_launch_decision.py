"""Where a node loads the weights from: every --source x target x what the bucket holds."""

import pytest

from modelferry.tasks.errors import IntegrityError, NotStaged, SettingsError
from modelferry.tasks.launch.launcher import Staged, choose_weights
from modelferry.tasks.launch.targets import TARGETS

ABSENT = Staged("acme/m", "b")
INTACT = Staged("acme/m", "b", revision="abc")
DAMAGED = Staged("acme/m", "b", revision="abc", problems=("x.safetensors: size 1 != 2",), bad_files=("x.safetensors",))
LOCAL_INTACT = Staged("acme/m", "b", revision="local-1", from_local_dir=True)
LOCAL_DAMAGED = Staged("acme/m", "b", revision="local-1", from_local_dir=True, problems=("extra.bin: not in the manifest",),
                       bad_files=("extra.bin",))
LOCAL_ONLY = "the local target only loads staged weights"

# (source, target, bucket state) -> "r2" / "hub" (with a warning when auto falls back) / the error it raises
TABLE = [
    ("auto", "sky", INTACT, "r2"), ("auto", "local", INTACT, "r2"),
    ("auto", "sky", ABSENT, "hub+warn"), ("auto", "local", ABSENT, SettingsError),
    ("auto", "sky", DAMAGED, "hub+warn"), ("auto", "local", DAMAGED, IntegrityError),
    ("auto", "sky", LOCAL_INTACT, "r2"), ("auto", "local", LOCAL_INTACT, "r2"),
    ("auto", "sky", LOCAL_DAMAGED, IntegrityError), ("auto", "local", LOCAL_DAMAGED, IntegrityError),
    ("r2", "sky", INTACT, "r2"), ("r2", "local", INTACT, "r2"),
    ("r2", "sky", ABSENT, NotStaged), ("r2", "local", ABSENT, NotStaged),
    ("r2", "sky", DAMAGED, IntegrityError), ("r2", "local", DAMAGED, IntegrityError),
    ("r2", "sky", LOCAL_INTACT, "r2"), ("r2", "local", LOCAL_DAMAGED, IntegrityError),
    ("hub", "sky", INTACT, "hub"), ("hub", "local", INTACT, SettingsError),
    ("hub", "sky", ABSENT, "hub"), ("hub", "local", ABSENT, SettingsError),
    ("hub", "sky", DAMAGED, "hub"), ("hub", "local", DAMAGED, SettingsError),
    ("hub", "sky", LOCAL_INTACT, NotStaged), ("hub", "local", LOCAL_INTACT, NotStaged),
]


@pytest.mark.parametrize("source,target,staged,expected", TABLE)
def test_where_the_weights_come_from(source, target, staged, expected):
    serves_hub = TARGETS[target].serves_hub
    if isinstance(expected, type):
        with pytest.raises(expected) as err:
            choose_weights(source, serves_hub, staged)
        message = str(err.value)
        if expected is IntegrityError:
            assert staged.problems[0] in message and "modelferry stage" in message
            assert err.value.bad_files == list(staged.bad_files)
        elif expected is NotStaged:
            assert staged.model in message and ("local directory" in message) == staged.from_local_dir
        else:
            assert LOCAL_ONLY in message
        return
    weights, warning = choose_weights(source, serves_hub, staged)
    assert weights == expected.split("+")[0]
    if expected.endswith("+warn"):
        assert warning and "serving it from the Hub" in warning
        assert (staged.problems[0] in warning) if staged.problems else ("is not staged in bucket b" in warning)
    else:
        assert warning is None


def test_the_table_covers_every_source_target_and_state():
    from modelferry.tasks.launch.options import SOURCES

    states = {ABSENT, INTACT, DAMAGED, LOCAL_INTACT, LOCAL_DAMAGED}
    seen = {(s, t) for s, t, _, _ in TABLE}
    assert seen == {(s, t) for s in SOURCES for t in TARGETS}
    assert {st for s, t, st, _ in TABLE if s == "auto"} == states
