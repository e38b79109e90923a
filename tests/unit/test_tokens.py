"""The tokens file (service.auth): parsing, hashing at rest, lookups."""

from __future__ import annotations

import json

import pytest

from service.auth import (
    Caller,
    TokenStore,
    add_token,
    format_entry,
    hash_token,
    new_token,
    parse_tokens,
    visible,
)

DIGEST = "a" * 64


def test_new_tokens_are_long_random_and_prefixed():
    tokens = {new_token() for _ in range(100)}
    assert len(tokens) == 100
    assert all(t.startswith("secant_") and len(t) >= 50 for t in tokens)


def test_yaml_lists_json_lines_and_appended_entries_all_load(tmp_path):
    yaml_text = f"- caller: alice\n  roles: [solve, train]\n  sha256: {DIGEST}\n"
    json_lines = json.dumps({"caller": "bob", "roles": "solve,admin", "sha256": "b" * 64})
    (alice,) = parse_tokens(yaml_text)
    (bob,) = parse_tokens(json_lines + "\n# a comment\n")
    assert alice.roles == {"solve", "train"} and bob.roles == {"solve", "admin"}
    assert parse_tokens(format_entry(alice) + format_entry(bob)) == [alice, bob]
    assert parse_tokens("") == []


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (f"- {{caller: a, roles: [root], sha256: {DIGEST}}}", "unknown"),
        (f"- {{caller: 'a b', roles: [solve], sha256: {DIGEST}}}", "caller"),
        ("- {caller: a, roles: [solve], sha256: abc}", "sha256"),
        (f"- {{caller: a, roles: [solve], sha256: {DIGEST}, token: x}}", "unknown keys"),
        (f"- {{caller: a, sha256: {DIGEST}}}\n- {{caller: b, sha256: {DIGEST}}}", "twice"),
        ("not: [valid", "not a JSON/YAML mapping"),
    ],
)
def test_a_bad_tokens_file_is_refused_with_a_reason(text, message):
    with pytest.raises(ValueError, match=message):
        parse_tokens(text)


def test_only_the_hash_is_stored_and_lookups_find_the_caller(tmp_path):
    path = tmp_path / "tokens.yaml"
    token = add_token(path, "alice", ["solve"])
    assert token not in path.read_text() and hash_token(token) in path.read_text()
    store = TokenStore(path)
    assert store.lookup(token) == Caller("alice", frozenset({"solve"}))
    assert store.lookup(token[:-1]) is None and store.lookup("") is None


def test_admin_sees_every_owner_and_others_only_their_own():
    admin = Caller("ops", frozenset({"admin"}))
    alice = Caller("alice", frozenset({"solve"}))
    assert visible(None, "anyone") and visible(admin, "alice")
    assert visible(alice, "alice") and not visible(alice, "bob") and not visible(alice, "")
