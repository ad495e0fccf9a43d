"""JSON and YAML from the user's files, parsed within limits: every failure is one line naming the file.

Two kinds of small input take a parser down instead of being refused by it. Nesting: `[[[[...]]]]` a few
thousand levels deep makes json's scanner and PyYAML's composer (both recursive) raise RecursionError, a
traceback. Aliases: a YAML "billion laughs" file of a few hundred bytes (`b: [*a, *a, ...]`, `c: [*b, *b,
...]`) parses into shared references, cheaply, and then expands to gigabytes in whatever walks it (the
`--set` deep copy, the typed config, the resolved config written back). `parse_yaml` composes the node
graph first, counts the values it stands for with every alias expanded (linear in the file, each node once)
and refuses more than MAX_YAML_VALUES, or a deeper nesting than MAX_YAML_DEPTH, or an alias inside itself,
before anything is built from it. A params file holds a few hundred values nested a few levels.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from pipeline.errors import ConfigError, InputError

MAX_YAML_VALUES = 100_000  # scalars, lists and mappings after alias expansion
MAX_YAML_DEPTH = 64


def parse_json(text: str, where: str, first_line: int = 1) -> Any:
    """A JSON document; malformed or absurdly nested text is an InputError naming `where` (and the line, counted
    from `first_line`: a JSON Lines record is line N of its file)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        line = first_line + err.lineno - 1
        raise InputError(f"{where} line {line} column {err.colno}: malformed JSON ({err.msg})") from None
    except RecursionError:
        raise InputError(
            f"{where}: JSON arrays or objects nested thousands of levels deep, more than Python's parser "
            "takes; this is not a file kdpipe reads"
        ) from None


def read_json(path: Path | str) -> Any:
    """The JSON document in file `path`, which must be UTF-8 text (else an InputError naming the byte)."""
    data = Path(path).read_bytes()
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise InputError(f"{path}: not UTF-8 text ({err.reason} at byte {err.start})") from None
    return parse_json(text, str(path))


def parse_yaml(text: str, where: str) -> Any:
    """A YAML document with the safe loader, refused (ConfigError naming `where`) when malformed, nested
    deeper than MAX_YAML_DEPTH or standing for more than MAX_YAML_VALUES values once its aliases expand."""
    loader = yaml.SafeLoader(text)
    try:
        node = loader.get_single_node()
        if node is None:
            return None
        _check_expansion(node, where)
        return loader.construct_document(node)
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" line {mark.line + 1}" if mark else ""
        raise ConfigError(f"{where}{line}: not valid YAML ({getattr(err, 'problem', None) or err})") from None
    except RecursionError:
        raise ConfigError(f"{where}: YAML nested thousands of levels deep; write it flat") from None
    finally:
        loader.dispose()


def _check_expansion(root: yaml.Node, where: str) -> None:
    """Values and depth of the node graph with every alias expanded, without expanding it: each node's
    (values, depth) once, from its children's (an iterative post-order walk; an alias is a shared node)."""
    done: dict[int, tuple[int, int]] = {}  # id(node) -> (values, depth) of its expansion
    on_path: set[int] = set()  # nodes whose expansion is being computed: the current walk's ancestors
    stack: list[tuple[yaml.Node, bool]] = [(root, False)]
    while stack:
        node, children_done = stack.pop()
        key = id(node)
        kids = _children(node)
        if children_done:
            on_path.discard(key)
            values = 1 + sum(done[id(k)][0] for k in kids)
            depth = 1 + max((done[id(k)][1] for k in kids), default=0)
            if values > MAX_YAML_VALUES:
                raise ConfigError(
                    f"{where}: stands for more than {MAX_YAML_VALUES:,} values once its aliases (*name) are "
                    "expanded, where a params file holds a few hundred (an alias bomb?); write it out plainly"
                )
            if depth > MAX_YAML_DEPTH:
                raise ConfigError(f"{where}: nested more than {MAX_YAML_DEPTH} levels deep; write it flatter")
            done[key] = (values, depth)
        elif key not in done:
            if key in on_path:
                raise ConfigError(f"{where}: an alias (*name) inside the value it names; YAML here must be a tree")
            on_path.add(key)
            stack.append((node, True))
            stack.extend((k, False) for k in kids if id(k) not in done)


def _children(node: yaml.Node) -> list[yaml.Node]:
    if isinstance(node, yaml.MappingNode):
        return [n for pair in node.value for n in pair]
    if isinstance(node, yaml.SequenceNode):
        return list(node.value)
    return []


__all__ = ["MAX_YAML_VALUES", "MAX_YAML_DEPTH", "parse_json", "read_json", "parse_yaml"]
