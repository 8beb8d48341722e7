"""A label table's slide ids matched to file names, so that TCGA slides named as the GDC serves them work.

The GDC names a slide file `<slide barcode>.<UUID>.svs` (and `preprocess` names its features after the file),
while clinical tables and cBioPortal name the barcode alone. An id matches the file named exactly after it,
or else the one file named `<id>.<anything>`; a file named exactly after another id of the table is that
id's, and a file two ids could claim, or two files one id could, is ambiguous: reported, never guessed.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable


def match_ids(ids: Iterable[str], names: Iterable[str]) -> tuple[dict[str, str], dict[str, str]]:
    """({id: name} for the ids found, {id: why not} for the ambiguous ones); ids with no candidate are in
    neither. Runs in time linear in the names (an index of their prefixes at each '.')."""
    ids, names = list(dict.fromkeys(ids)), set(names)
    claimed = set(ids)                                  # a name equal to an id belongs to that id
    by_prefix = defaultdict(list)
    for name in names - claimed:
        for i, ch in enumerate(name):
            if ch == ".":
                by_prefix[name[:i]].append(name)
    found, problems = {}, {}
    for key in ids:
        if key in names:
            found[key] = key
        elif len(candidates := sorted(by_prefix.get(key, ()))) == 1:
            found[key] = candidates[0]
        elif candidates:
            problems[key] = (f"{len(candidates)} files are named {key}.<suffix> ({', '.join(candidates[:3])}); "
                             "put the full name of the one to use in slide_id")
    owners = defaultdict(list)
    for key, name in found.items():
        owners[name].append(key)
    for name, keys in owners.items():
        if len(keys) > 1:
            for key in keys:
                del found[key]
                problems[key] = f"{name} could be the file of {' or '.join(keys)}; put its full name in slide_id"
    return found, problems
