"""Changes to the config document that keep the operator's comments, order and formatting.

Each change alters only what it must in the tomlkit document; `config.file` reads the file,
applies the change, checks the result and writes it back.

Servers may be written as mvllm does (`[servers] servers = [{ url = ... }, ...]`, on one
line or many) or as an array of tables (`[[servers.servers]]`); both are edited in place.
"""

from __future__ import annotations

from typing import Any, Callable, Mapping

import tomlkit
from tomlkit.items import AoT, Array, InlineTable, Table, Whitespace
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
