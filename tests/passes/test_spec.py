from __future__ import annotations

import pytest

from passforge.passes.cleanup import Cleanup
from passforge.passes.precision import Cast
from passforge.passes.spec import MAX_SPEC_CHARS, SpecError, format_pipeline, parse_pipeline


def test_good_specs_build_configured_passes():
    passes = parse_pipeline("cleanup, cast(dtype=fp16) ,cleanup(fold=false,cse=true)")
    assert passes == [Cleanup(), Cast(dtype="fp16"), Cleanup(fold=False)]
    assert format_pipeline(passes) == "cleanup,cast(dtype=fp16),cleanup(fold=false)"
    assert parse_pipeline(format_pipeline(passes)) == passes  # the spec round-trips
    assert parse_pipeline("cast()") == [Cast()]
    odd = parse_pipeline("quantize(skip='')")
    assert odd[0].spec == "quantize(skip='')" and parse_pipeline(odd[0].spec) == odd
    assert parse_pipeline("cast(dtype='BF16')") == [Cast(dtype="bf16")]


@pytest.mark.parametrize(
    ("spec", "message", "column"),
    [
        ("cleanup,cats(dtype=bf16)", "unknown pass 'cats'; did you mean 'cast'?", 8),
        ("cleanup,cast(dtpe=bf16)", "no option 'dtpe'; did you mean 'dtype'?", 13),
        ("cast(dtype=bf17)", "'bf17' is not one of bf16, fp16; did you mean 'bf16'?", 11),
        ("cleanup(fold=maybe)", "expected true or false, got 'maybe'", 13),
        ("cleanup,", "trailing ','", 8),
        ("cleanup cast", "expected ',' between passes", 8),
        ("cast(dtype=bf16", "unclosed '('", 15),
        ("cast(dtype)", "expected '=' and a value after 'dtype'", 10),
        ("cast(dtype=bf16,dtype=fp16)", "option 'dtype' given twice", 16),
        ("cleanup,#", "unexpected character '#'", 8),
        ("   ", "empty pipeline", 0),
        ("cleanup(zzz=1)", "has no option 'zzz'; 'cleanup' takes options fold, cse", 8),
    ],
)
def test_bad_specs_point_at_the_token(spec, message, column):
    with pytest.raises(SpecError) as info:
        parse_pipeline(spec)
    text = str(info.value)
    assert message in text
    caret_line = text.splitlines()[-1]
    assert caret_line.index("^") - 2 == column  # "  " indent, then the caret under the bad token


def test_huge_spec_is_refused_quickly():
    with pytest.raises(SpecError, match=f"limit is {MAX_SPEC_CHARS}"):
        parse_pipeline("cleanup," * 5000)
