import pytest

from weightshare.errors import LIMIT, MARK, clip
from weightshare.space import config_from_dict


def test_clip_leaves_text_within_the_limit_alone():
    assert clip("") == ""
    assert clip("bits\n  expected: 1..8\n  got: 9") == "bits\n  expected: 1..8\n  got: 9"
    exact = "x" * LIMIT
    assert clip(exact) is exact


def test_clip_cuts_to_the_limit_and_marks_the_cut():
    text = "rank\n  expected: an integer\n  got: " + "9" * 10_000
    cut = clip(text)
    assert len(cut) == LIMIT
    assert cut.endswith(MARK)
    assert text.startswith(cut[:-len(MARK)])
    assert cut.splitlines()[:2] == ["rank", "  expected: an integer"]  # the message's lines stay


def test_clip_takes_another_limit():
    assert clip("abcdefghij", limit=8) == "abcde" + MARK
    assert clip("abcdefgh", limit=8) == "abcdefgh"


def test_an_error_quoting_a_huge_value_is_clipped():
    with pytest.raises(ValueError) as info:
        config_from_dict("x" * 100_000)  # a packed file's config field: untrusted, any size
    message = str(info.value)
    assert len(message) == LIMIT and message.endswith(MARK)
    assert message.startswith("sharing config\n  expected: a JSON object\n  got: 'xxx")
