from __future__ import annotations

from portfwd.config.tomlpos import locate

TEXT = '''\
# comment with "quotes" and [brackets]
[options]
table = "x"   # trailing
"quoted key" = 'lit'

[[forward]]
ports = [
  "a", # one
  { host = 1, guest = 2 },
  """multi
line""",
  [1, [2, 3]],
]
a.b = 1

[[forward]]
ports = ['b']
'''


def test_positions_of_keys_and_values() -> None:
    p = locate(TEXT)
    assert p.of(("options", "table")) == (3, 9)
    assert p.of_key(("options", "table")) == (3, 1)
    assert p.of_key(("options", "quoted key")) == (4, 1)
    assert p.of(("forward", 0, "ports", 0)) == (8, 3)
    assert p.of(("forward", 0, "ports", 1, "guest")) == (9, 23)
    assert p.of(("forward", 0, "ports", 2)) == (10, 3)
    assert p.of(("forward", 0, "ports", 3, 1, 0)) == (12, 8)
    assert p.of(("forward", 0, "a", "b")) == (14, 7)
    assert p.of(("forward", 1, "ports", 0)) == (17, 10)
    assert p.of_key(("forward", 1)) == (16, 3)


def test_unknown_path_falls_back_to_parent() -> None:
    p = locate(TEXT)
    assert p.of(("forward", 1, "ports", 7)) == (17, 9)
    assert p.of(("nowhere",)) == (1, 1)
