"""The private internals klalign relies on (`klalign.internals`) still exist in the installed versions."""

import pytest

from klalign.internals import INTERNALS, installed


def case(internal):
    marks = [pytest.mark.vllm] if internal.package.startswith("vllm") else []
    return pytest.param(internal, id=internal.name.split("(")[0], marks=marks)


@pytest.mark.parametrize("internal", [case(i) for i in INTERNALS])
def test_each_private_internal_is_still_there(internal):
    if not installed(internal.package):
        pytest.skip(f"{internal.package} is not installed")
    internal.check()


def test_a_missing_internal_fails_with_a_message_naming_it():
    gone = INTERNALS[0].__class__("Trainer._no_such_method", "transformers", "klalign.nowhere", "a test",
                                  lambda: hasattr(object, "_no_such_method"))
    with pytest.raises(AssertionError, match=r"transformers \S+ no longer has Trainer._no_such_method.*klalign.nowhere"):
        gone.check()
