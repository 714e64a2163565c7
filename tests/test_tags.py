"""Tagged text: parsing, exact round-trips, validation errors, escaping."""

import pytest
from hypothesis import given, settings, strategies as st

from prealign_jax import modes, tags

# Text that is dense in the characters tag-like strings are made of.
tricky_text = st.text(alphabet=st.sampled_from(list("<>/aihumnqotedr ") + [tags.JOINER, "é"]),
                      max_size=40) | st.text(max_size=20)


@st.composite
def node_list(draw, mode="doc", depth=0):
    """A random well-formed node list for the content of `mode`."""
    children = []
    for _ in range(draw(st.integers(0, 4))):
        kind = draw(st.sampled_from(["text", "span"]))
        if kind == "text" or depth >= 2:
            if mode == "quote" and draw(st.booleans()):
                children.append(tags.REDACTED)
            else:
                children.append(draw(tricky_text))
            continue
        if mode == "doc":
            child_mode = draw(st.sampled_from(["human", "ai"]))
        elif mode == "ai":
            child_mode = "quote"
        else:
            continue
        children.append(tags.Span(child_mode, tuple(draw(node_list(child_mode, depth + 1)))))
    return children


def normalise(nodes):
    """Merge adjacent strings, drop empty ones: the canonical form `parse` returns."""
    out = []
    for n in nodes:
        if isinstance(n, tags.Span):
            n = tags.Span(n.mode, tuple(normalise(n.children)))
        if isinstance(n, str):
            if not n:
                continue
            if out and isinstance(out[-1], str):
                out[-1] += n
                continue
        out.append(n)
    return out


@settings(max_examples=300, deadline=None)
@given(tricky_text)
def test_escape_round_trips_and_leaves_no_tag(x):
    escaped = tags.escape(x)
    assert tags.unescape(escaped) == x
    assert not any(is_tag for _, _, is_tag in tags.pieces(escaped))


def test_escape_examples():
    assert tags.escape("say <ai> now") == f"say <{tags.JOINER}ai> now"
    assert tags.escape(f"<{tags.JOINER}ai>") == f"<{tags.JOINER}{tags.JOINER}ai>"
    assert tags.escape("a < b > c") == "a < b > c"  # ordinary text is untouched


@settings(max_examples=300, deadline=None)
@given(node_list())
def test_serialize_parse_round_trip(nodes):
    text = tags.serialize(nodes)
    parsed = tags.parse(text)
    assert parsed == normalise(nodes)
    assert tags.serialize(parsed) == text


def test_parse_known_document():
    text = ("<human>I kept the change.</human>\n<ai>You said: <quote>call <redacted/> at "
            "home</quote>. I can't share that.</ai>")
    nodes = tags.parse(text)
    assert [type(n).__name__ for n in nodes] == ["Span", "str", "Span"]
    ai = nodes[2]
    assert ai.mode == "ai" and ai.children[1].children[1] is tags.REDACTED
    assert ai.text() == "You said: call  at home. I can't share that."
    assert tags.serialize(nodes) == text


@pytest.mark.parametrize("text, offset, tag", [
    ("<ai>hi<human>x</human></ai>", 6, "<human>"),
    ("<human>x<redacted/></human>", 8, "<redacted/>"),
    ("<quote>x</quote>", 0, "<quote>"),
    ("<ai>x</human>", 5, "</human>"),
    ("hello <ai>unclosed", 6, "<ai>"),
    ("<ai><quote>x</ai>", 12, "</ai>"),
])
def test_validation_errors_name_offset_and_tag(text, offset, tag):
    with pytest.raises(tags.TagError) as e:
        tags.validate(text)
    assert e.value.offset == offset and e.value.tag == tag
    assert "offset" in str(e.value) and tag in str(e.value) and "\n" not in str(e.value)


def test_validation_under_a_policy():
    tags.validate("<ai>sure</ai>", "assistant")
    with pytest.raises(tags.TagError, match="policy 'assistant'"):
        tags.validate("<human>x</human>", "assistant")
    with pytest.raises(tags.TagError, match="cannot end"):
        tags.validate("question?", "assistant")  # the assistant must answer before EOS


def test_token_classes_follow_the_grammar_module():
    classes = tags.token_classes("<ai>a<quote><redacted/></quote></ai>")
    assert modes.is_well_formed(modes.GRAMMAR.compile(), classes)
