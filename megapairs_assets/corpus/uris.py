"""How the corpus writes down where an item lives (`source_uri`), and how it reads that back.

The one home of these rules; sources write uris with them and every reader parses with them.
A `source_uri` is one of:

- an absolute local path: `/data/photos/cat.jpg`;
- a member of a webdataset tar: `<absolute tar path>#<member name>`, for example
  `/data/shards/00000.tar#000000012.jpg` (the first `.tar#`, in any letter case, splits the two);
- a remote URL (`https://...`), recorded so the row can be reported, never fetched.

Locations given by a user (manifest rows) may also be `file://` URIs (percent escapes such as
`%20` decoded, a `localhost` host dropped) or start with `~` (the user's home folder).
"""

from __future__ import annotations

import os
import re
from pathlib import Path
from urllib.parse import unquote

TAR_SUFFIX = ".tar"
_MEMBER_MARK = "#"
_TAR_MEMBER_SPLIT_ANY_CASE = re.compile(re.escape(TAR_SUFFIX + _MEMBER_MARK), re.IGNORECASE)
_URL_SCHEME = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")
_FILE_SCHEME = "file://"
_LOCALHOST = "localhost/"


def tar_member_uri(tar_uri: str, member_name: str) -> str:
    """The uri of one member of a tar whose own uri (absolute path) is `tar_uri`."""
    return f"{tar_uri}{_MEMBER_MARK}{member_name}"


def split_tar_member(uri: str) -> tuple[str, str] | None:
    """(tar path, member name) for a tar member uri, None for any other uri. The suffix may be
    in any letter case (`UP.TAR#x.jpg`), as the sources accept shards named so."""
    split = _TAR_MEMBER_SPLIT_ANY_CASE.search(uri)
    if split is None:
        return None
    tar_end = split.start() + len(TAR_SUFFIX)
    return uri[:tar_end], uri[tar_end + len(_MEMBER_MARK) :]


def is_remote(location: str) -> bool:
    """Whether a location names another machine (any URL scheme except `file://`)."""
    return bool(_URL_SCHEME.match(location)) and not _is_file_uri(location)


def without_file_scheme(location: str) -> str:
    """A local location without its optional `file://` prefix.

    A file URI is read as RFC 8089 writes it: `file:///data/my%20photos/a.jpg` and
    `file://localhost/data/...` both name `/data/my photos/a.jpg`. Any other location is
    returned unchanged (a plain path's `%` is part of its name).
    """
    if not _is_file_uri(location):
        return location
    rest = location[len(_FILE_SCHEME) :]
    if rest[: len(_LOCALHOST)].lower() == _LOCALHOST:
        rest = rest[len(_LOCALHOST) - 1 :]
    return unquote(rest)


def _is_file_uri(location: str) -> bool:
    return location[: len(_FILE_SCHEME)].lower() == _FILE_SCHEME


def resolve_local(
    location: str, base_dir: Path, resolved_folders: dict[str, str] | None = None
) -> str:
    """The absolute `source_uri` of a local location given relative to `base_dir`.

    A `<tar>#<member>` location keeps its member part as written; only the file is resolved.
    `~` and `~user` at the start name a home folder, as a shell would read them.
    `resolved_folders`: a dict the caller keeps for one pass over many locations (a manifest's
    rows), so each folder is resolved once (`Path.resolve` costs a stat per path part, most
    of a manifest's parse); the result is the same string either way.
    """
    location = without_file_scheme(location)
    if location.startswith("~"):
        location = os.path.expanduser(location)
    parts = split_tar_member(location)
    if parts is None:
        return resolved_path(base_dir / location, resolved_folders)
    tar_path, member_name = parts
    return tar_member_uri(resolved_path(base_dir / tar_path, resolved_folders), member_name)


def resolved_path(path: Path, resolved_folders: dict[str, str] | None = None) -> str:
    """`str(path.resolve())` (a symbolic link loop: the absolute path as written).

    With `resolved_folders`, a dict the caller keeps for one pass over many paths, the folder
    is looked up there (resolved and stored the first time) and only the last part is checked:
    a name that is no symbolic link (nor `.` or `..`) resolves to itself inside its resolved
    folder. Same string, one lstat instead of one per path part."""
    name = path.name
    if resolved_folders is None or name in ("", ".", "..") or os.path.islink(path):
        return _resolved_or_absolute(path)
    folder = str(path.parent)
    resolved = resolved_folders.get(folder)
    if resolved is None:
        resolved = resolved_folders[folder] = _resolved_or_absolute(path.parent)
    return os.path.join(resolved, name)


def _resolved_or_absolute(path: Path) -> str:
    try:
        return str(path.resolve())
    except RuntimeError:
        # A symbolic link loop (Python < 3.13 raises): the path as written, whose read then
        # fails with a reason ("Too many levels of symbolic links") instead of ending the run.
        return os.path.abspath(path)
