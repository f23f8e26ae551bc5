"""Pure functions, no root needed."""

import pytest

from migrator import aufs, containers, linkid, overlay


def test_driver_is_changed_and_nothing_else():
    raw = (b'{"ID":"x", "Driver" : "aufs","Big":18446744073709551615,"Html":"<a&b>\\u00e9",'
           b'"MountPoints":{"/d":{"Driver":"aufs"}},"Name":"caf\xc3\xa9"}\n')
    new = containers.with_driver(raw, "overlay2")
    assert new == raw.replace(b'"Driver" : "aufs"', b'"Driver" : "overlay2"')


def test_last_driver_key_wins_like_go():
    raw = b'{"Driver":"x","Driver":"aufs"}'
    assert containers.locate_driver(raw.decode())[0] == "aufs"
    assert containers.with_driver(raw, "overlay2") == b'{"Driver":"x","Driver":"overlay2"}'


@pytest.mark.parametrize("bad", [b"", b"[]", b'{"Driver":1}', b'{"A":1}', b'{"Driver":"aufs"', b'{"Driver":"a"} x'])
def test_bad_configs_are_rejected(bad):
    with pytest.raises(ValueError):
        containers.locate_driver(bad.decode())


def test_layers_file_parsing():
    assert aufs.parse_layers_file(b"") == []
    assert aufs.parse_layers_file(b"a1\nb2\n") == ["a1", "b2"]
    assert aufs.parse_layers_file(b"a1\nb2") == ["a1", "b2"]
    for bad in (b"a1\n\nb2\n", b"../x\n", b"a b\n"):
        with pytest.raises(ValueError):
            aufs.parse_layers_file(bad)
    with pytest.raises(UnicodeDecodeError):
        aufs.parse_layers_file(b"\xff\n")


def test_link_ids_look_like_dockerds():
    ids = linkid.new_link_ids(500)
    assert len(set(ids)) == 500
    assert all(linkid.LINK_ID_RE.match(i) for i in ids)


def test_lower_value_has_no_newline():
    assert overlay.lower_value(["A" * 26, "B" * 26]) == b"l/" + b"A" * 26 + b":l/" + b"B" * 26


def test_layer_ids():
    assert aufs.valid_id("a" * 64) and aufs.valid_id("a" * 64 + "-init")
    for bad in ("", ".", "..", "a/b", "a b", "a\nb", "caf\udce9", "-x"):
        assert not aufs.valid_id(bad)
