"""Changes to the config document that keep the operator's comments, order and formatting.

Each change alters only what it must in the tomlkit document; `config.file` reads the file,
applies the change, checks the result and writes it back.

Servers may be written as mvllm does (`[servers] servers = [{ url = ... }, ...]`, on one
line or many) or as an array of tables (`[[servers.servers]]`); both are edited in place.
`[[instances]]` entries are found by name (as the config names them) or model, and edited
or appended in place (`set_instance`, for `mvtui assign`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import tomlkit
from tomlkit.items import AoT, Array, Comment, InlineTable, Item, Table, Whitespace
from tomlkit.toml_document import TOMLDocument

from mvtui.config.schema import ServerConfig, normalize_url
from mvtui.errors import ConfigEditError

Change = Callable[[TOMLDocument], None]
Entries = Array | AoT


# --- changes to a document ---------------------------------------------------------------


def add_server(server: ServerConfig) -> Change:
    def change(document: TOMLDocument) -> None:
        entries = _server_entries(document, create=True)
        if _index_of(entries, server.url) is not None:
            raise ConfigEditError(f"{server.url} is already in the config")
        values = server_values(server)
        if isinstance(entries, AoT):
            entries.append(_table(values, after_blank_line=_ends_with_blank_line(entries)))
        else:
            entries.append(_inline_table(values, padded=_padded_style(entries)))

    return change


def remove_server(url: str) -> Change:
    def change(document: TOMLDocument) -> None:
        entries, index = _find(document, url)
        if isinstance(entries, AoT) and len(entries) == 1:
            _remove_server_tables(document)  # tomlkit would leave `servers.servers = []` on top
        elif isinstance(entries, AoT) and index == len(entries) - 1:
            last_ends_blank = _ends_with_blank_line(entries)
            del entries[index]
            if not last_ends_blank:
                _drop_trailing_blank_line(entries[index - 1])
        else:
            del entries[index]

    return change


def _remove_server_tables(document: TOMLDocument) -> None:
    table = document["servers"]
    if isinstance(table, Table) and table.is_super_table() and list(table) == ["servers"]:
        del document["servers"]
    else:
        del table["servers"]


def set_server_value(url: str, key: str, value: Any) -> Change:
    def change(document: TOMLDocument) -> None:
        entries, index = _find(document, url)
        entry = entries[index]
        if key in entry or not isinstance(entry, InlineTable):
            entry[key] = value
        else:
            entries[index] = _with_new_key(entry, key, value)

    return change


def unset_server_value(url: str, key: str, default: Any) -> Change:
    """Back to the default: the key goes where that leaves the rest of the line as it was.
    Inside `{ ... }` only the last key goes cleanly, so an earlier one is set to `default`."""

    def change(document: TOMLDocument) -> None:
        entries, index = _find(document, url)
        entry = entries[index]
        if key not in entry:
            return
        if not isinstance(entry, InlineTable):
            del entry[key]
        elif list(entry)[-1] == key:
            entries[index] = _without_last_key(entry, key)
        else:
            entry[key] = default

    return change


def server_values(server: ServerConfig) -> dict[str, Any]:
    """What a new entry says: the URL and capacity always, the rest when not default."""
    values: dict[str, Any] = {"url": server.url, "max_concurrent_requests": server.max_concurrent_requests}
    if server.name:
        values["name"] = server.name
    if server.api_key is not None:
        values["api_key"] = server.api_key
    if server.models:
        values["models"] = list(server.models)
    if server.drain:
        values["drain"] = True
    return values


def _server_entries(document: TOMLDocument, *, create: bool = False) -> Entries:
    table = document.get("servers")
    if table is None and create:
        table = tomlkit.table()
        document.add("servers", table)
    if not isinstance(table, Table):
        raise ConfigEditError("the config file has no [servers] table")
    entries = table.get("servers")
    if entries is None and create:
        entries = tomlkit.array()
        entries.multiline(True)
        table.add("servers", entries)
    if not isinstance(entries, (Array, AoT)):
        raise ConfigEditError("the config file has no `servers = [...]` list under [servers]")
    return entries


def _index_of(entries: Entries, url: str) -> int | None:
    wanted = normalize_url(url)
    for index, entry in enumerate(entries):
        found = entry.get("url") if isinstance(entry, Mapping) else None
        if isinstance(found, str) and normalize_url(found) == wanted:
            return index
    return None


def _find(document: TOMLDocument, url: str) -> tuple[Entries, int]:
    entries = _server_entries(document)
    index = _index_of(entries, url)
    if index is None:
        raise ConfigEditError(f"{url} is not in the [servers] list of the config file")
    return entries, index


def _toml(value: Any) -> str:
    return str(tomlkit.item(value).as_string())


def _parse_inline(text: str) -> InlineTable:
    item = tomlkit.parse(f"x = {text}")["x"]
    assert isinstance(item, InlineTable)
    return item


def _inline_table(values: Mapping[str, Any], *, padded: bool) -> InlineTable:
    pad = " " if padded else ""
    body = ", ".join(f"{key} = {_toml(value)}" for key, value in values.items())
    return _parse_inline(f"{{{pad}{body}{pad}}}")


def _with_new_key(entry: InlineTable, key: str, value: Any) -> InlineTable:
    """The entry with `key = value` added last, in the entry's own spacing (tomlkit's own
    insert drops the space before a closing `}`)."""
    text = entry.as_string()
    inner = text[1:-1]
    body = inner.rstrip()
    trailing = inner[len(body) :]
    separator = ", " if body.strip() else ""
    body = body.rstrip(",")
    return _parse_inline(f"{{{body}{separator}{key} = {_toml(value)}{trailing}}}")


def _without_last_key(entry: InlineTable, key: str) -> InlineTable:
    """The entry without its last key and the comma before it, spacing kept (tomlkit's
    own delete leaves a stray space when the file was re-read)."""
    text = entry.as_string()
    item: Any = entry.value.item(key)
    written = next(found for found in entry.value.body if found[1] is item)[0]
    assert written is not None
    piece = f"{written.as_string()}{written.sep}{item.as_string()}"
    start = text.rfind(piece)
    if start < 0:  # written in a way we do not recognise: let tomlkit do it
        del entry[key]
        return entry
    before = text[:start].rstrip()
    before = before[:-1] if before.endswith(",") else before
    return _parse_inline(before + text[start + len(piece) :])


def _padded_style(entries: Entries) -> bool:
    """Whether sibling entries are written `{ url = ... }` (the default) or `{url = ...}`."""
    for entry in entries:
        if isinstance(entry, InlineTable):
            return entry.as_string().startswith("{ ")
    return True


def _table(values: Mapping[str, Any], *, after_blank_line: bool) -> Table:
    """A new `[[servers.servers]]` table, set off by a blank line like its siblings: after
    it when the last one ends with a blank line (more follows), else before it."""
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, value)
    if after_blank_line:
        table.add(tomlkit.nl())
    else:
        table.trivia.indent = "\n"
    return table


def _drop_trailing_blank_line(table: Table) -> None:
    """The new last table takes the place of the removed one, which had no blank line after
    it: without this, removing what `add_server` appended would leave one."""
    body = table.value.body
    if table.as_string().endswith("\n\n") and body and body[-1][0] is None and isinstance(body[-1][1], Whitespace):
        body[-1] = (None, Whitespace(body[-1][1].s[:-1]))


def _ends_with_blank_line(entries: AoT) -> bool:
    return bool(entries.body) and entries.body[-1].as_string().endswith("\n\n")


# --- [[instances]] entries ---------------------------------------------------------------


def set_instance(key: str, values: Mapping[str, Any], *, create: bool = False) -> Change:
    """Set `values` on the entry that `key` names (its name, served name or model), each in
    its place, new keys after the entry's last one; with `create`, a missing entry is
    appended (`values` must then hold its `model`)."""

    def change(document: TOMLDocument) -> None:
        entry = find_instance(document, key)
        if entry is None and not create:
            raise ConfigEditError(f"no [[instances]] entry for {key!r} in the config file")
        if entry is None:
            _append_instance(document, values)
            return
        for name, value in values.items():
            _set_in_table(entry, name, value)

    return change


def find_instance(document: TOMLDocument, key: str) -> Table | None:
    """The `[[instances]]` table `key` names: by its label (name, else served name, else
    model) first, then by model; None when none does. Several by model: an error."""
    entries = _instance_tables(document)
    for matches in ([entry for entry in entries if _label(entry) == key], [entry for entry in entries if entry.get("model") == key]):
        if len(matches) == 1:
            return matches[0]
        if matches:
            names = ", ".join(_label(entry) for entry in matches)
            raise ConfigEditError(f"{len(matches)} [[instances]] entries serve {key!r} ({names}); name one of them")
    return None


def instance_text(entry: Table) -> str:
    """The entry as the file writes it, from its `[[instances]]` line to its last key."""
    body = entry.value.body
    trailing = "".join(item.as_string() for _, item in body[_last_key_index(body) + 1 :])
    text = entry.as_string()
    if trailing and text.endswith(trailing):
        text = text[: -len(trailing)]
    return "[[instances]]\n" + text.rstrip("\n") + "\n"


def _instance_tables(document: TOMLDocument) -> list[Table]:
    entries = document.get("instances")
    if entries is None:
        return []
    if not isinstance(entries, AoT):
        raise ConfigEditError("`instances` in the config file is not written as [[instances]] tables; edit it by hand")
    return list(entries)


def _label(entry: Mapping[str, Any]) -> str:
    return str(entry.get("name") or entry.get("served_model_name") or entry.get("model") or "")


def _last_key_index(body: list[tuple[Any, Item]]) -> int:
    return max((index for index, (key, _) in enumerate(body) if key is not None), default=-1)


def _set_in_table(table: Table, key: str, value: Any) -> None:
    """`key = value`: in place (its comment kept) when present, else after the last key, so
    comments and blank lines that introduce what follows stay where they are."""
    body = table.value.body
    last = _last_key_index(body)
    last_key = body[last][0] if last >= 0 else None
    if key in table or last_key is None:
        table[key] = value
    else:
        table.value._insert_after(last_key, key, value)


def _append_instance(document: TOMLDocument, values: Mapping[str, Any]) -> None:
    if "model" not in values:
        raise ConfigEditError("a new [[instances]] entry needs its model")
    table = tomlkit.table()
    for key, value in values.items():
        table.add(key, value)
    entries = document.get("instances")
    if entries is None:
        table.trivia.indent = "" if document.as_string().endswith("\n\n") or not document.as_string() else "\n"
        entries = tomlkit.aot()
        entries.append(table)
        document.add("instances", entries)
        return
    if not isinstance(entries, AoT):
        raise ConfigEditError("`instances` in the config file is not written as [[instances]] tables; edit it by hand")
    if len(entries):
        for item in _take_trailing_lines(entries[-1]):  # they introduce what follows: they go after the new entry
            table.add(item)
    table.trivia.indent = "\n"
    entries.append(table)


def _take_trailing_lines(table: Table) -> list[Comment | Whitespace]:
    """From the table's first blank line after its last key: the blank lines and comments
    that separate it from (and introduce) whatever the file has next."""
    body = table.value.body
    start = next(
        (index for index in range(_last_key_index(body) + 1, len(body)) if isinstance(body[index][1], Whitespace)),
        len(body),
    )
    taken = [item for _, item in body[start:] if isinstance(item, (Comment, Whitespace))]
    if len(taken) == len(body) - start:  # only blank lines and comments, as expected
        del body[start:]
        return taken
    return []


def instance_labels(document: TOMLDocument) -> list[str]:
    """Every entry's name and model, for near-name suggestions."""
    return [name for entry in _instance_tables(document) for name in (_label(entry), str(entry.get("model") or "")) if name]
