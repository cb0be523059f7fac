"""Which layers a commit works on: resolving `top`/`base` names and checking the request.

Lookups over an open chain, and the node names QMP gives its layers; nothing here
writes to an image.
"""

import os
import re
import weakref
from collections import namedtuple

from qcow.chain import resolve_backing
from qcow.errors import JobError, QcowError

MODES = ("simple", "restartable")  # also block-commit's x-mode and the CLI's --mode


class CommitTarget(namedtuple("CommitTarget", "chain top_path base_path mode active backing_file")):
    """Layers are named by path: reopening (read-write and back) replaces the layer
    objects, and dropping layers shifts indexes, so both are looked up when used.
    top_path: the topmost layer committed (inclusive); base_path: the layer committed
    into; active: top is the active layer (a mirror, then a pivot); backing_file: the
    name to write into top's overlay for base (block-commit's backing-file), or None
    to work one out."""

    __slots__ = ()

    def _index(self, path):
        for i, layer in enumerate(self.chain.layers):
            if layer.path == path:
                return i
        raise JobError(path, "left the chain while the job ran")

    @property
    def top_index(self):
        return self._index(self.top_path)

    @property
    def base_index(self):
        return self._index(self.base_path)

    @property
    def top(self):
        return self.chain.layers[self.top_index]

    @property
    def base(self):
        return self.chain.layers[self.base_index]

    @property
    def range_layers(self):
        """(base, top]: the layers whose content moves into base, top first."""
        return self.chain.layers[self.top_index : self.base_index]


class NodeNames:
    """The QMP node names of one chain's layers. A layer keeps its name while it stays in
    the chain, as in QEMU, so a name a client read before a snapshot or a commit still
    means the same image after it: node0, node1, ... top first as the chain was opened;
    a layer that comes later takes the name asked for (blockdev-snapshot-sync's
    snapshot-node-name) or the next nodeN never given. Keyed by path: reopening a
    layer replaces its object, not its file."""

    def __init__(self, chain):
        # the chain's lock: names are read and given by the trio thread (queries) and
        # worker threads (lookups) alike, and follow the chain's layer list
        self.lock = chain.lock
        self.by_path = {}
        self.given = 0  # nodeN names handed out so far

    def of(self, layer):
        with self.lock:
            name = self.by_path.get(layer.path)
            if name is None:
                while f"node{self.given}" in self.by_path.values():
                    self.given += 1
                name = self.by_path[layer.path] = f"node{self.given}"
                self.given += 1
            return name

    def claim(self, chain, path, name):
        """Give the layer that will be at `path` the name a client chose (QEMU's rules:
        a letter first, then letters, digits, '-', '_' or '.'; at most 31; not the name
        of an image in the chain)."""
        if not _NODE_NAME.fullmatch(name):
            raise JobError(
                name,
                "is not a valid node name (a letter first, at most 31 of "
                "letters, digits, '-', '_', '.')",
            )
        with self.lock:
            live = {layer.path for layer in chain.layers}
            self.by_path = {p: n for p, n in self.by_path.items() if p in live}
            if name in self.by_path.values():
                raise JobError(name, "is the node name of another image already")
            self.by_path[path] = name

    def forget(self, path):
        with self.lock:
            self.by_path.pop(path, None)


_NODE_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_.-]{0,30}")
_node_names = weakref.WeakKeyDictionary()  # chain -> NodeNames


def node_names(chain):
    """The NodeNames of `chain`, made on first use (the chain as it is then: node0 is
    its active image)."""
    with chain.lock:
        names = _node_names.get(chain)
        if names is None:
            names = _node_names[chain] = NodeNames(chain)
            for layer in chain.layers:
                names.of(layer)
        return names


def require_active(chain, name, refusal):
    """QMP's `device` (or `node-name`) where a command works on the chain's root, as
    QEMU looks the root up: None, or a name of the active image; a name of no image of
    the chain is refused as find_layer refuses it, another image with `refusal`.
    Blocking (find_layer may stat the name, which can lie inside the mount itself): a
    worker thread, never the trio thread."""
    if name is not None and find_layer(chain, name) is not chain.active:
        raise JobError(name, refusal)


def find_layer(chain, name):
    """A layer by its file name as shown (filename), its absolute path, its node name,
    or the name written in its overlay's header."""
    if name is None:
        return None
    layers = chain.layers
    names = node_names(chain)
    for i, layer in enumerate(layers):
        if name in (layer.filename, layer.path, names.of(layer)):
            return layer
        if i and layers[i - 1].backing_name == name:
            return layer
    try:
        st = os.stat(name)
    except (OSError, ValueError):  # ValueError: a NUL byte in the name
        st = None
    if st is not None:
        for layer in layers:
            lst = os.fstat(layer.io.fd)
            if (lst.st_dev, lst.st_ino) == (st.st_dev, st.st_ino):
                return layer
    into = _committed_into(chain, name)
    if into is not None:
        raise JobError(
            name,
            f"is no longer an image of this chain: a commit already put its data into "
            f"{into.filename} (it is a leftover of that commit)",
        )
    raise JobError(name, "is not an image of this chain")


def _committed_into(chain, name):
    """The layer of the chain that a finished commit drained the image `name` (a path,
    or a name relative to the active image's directory, as backing names are) into:
    its leftover mark names it. None if it is no such leftover. Only for the error
    message of a commit asked again for an image it already dropped."""
    from qcow.errors import QcowError
    from qcow.header import read_backing_info

    path = os.path.join(os.path.dirname(chain.layers[0].path), name)
    if not os.path.isfile(path):
        path = name
    try:
        into = read_backing_info(path).drained_into
    except (OSError, ValueError, QcowError):
        return None
    if into is None or not os.path.exists(into):
        return None
    for layer in chain.layers:
        if os.path.samefile(layer.path, into):
            return layer
    return None


def resolve_target(
    chain,
    top=None,
    base=None,
    mode="simple",
    active=False,
    default_top_active=False,
    backing_file=None,
):
    """Build the CommitTarget for a request. Without `top`, the CLI commits the active
    image's backing file (as virsh does) and QMP commits the active layer (as QEMU does:
    `default_top_active`); `active` forces the active layer. `backing_file` must lead
    from top's overlay to base (QEMU writes it unchecked; a wrong one breaks the chain)."""
    layers = chain.layers
    if mode not in MODES:
        raise JobError(None, f"unknown commit mode '{mode}' (simple or restartable)")
    if len(layers) < 2:
        raise JobError(layers[0].filename, "has no backing file: nothing to commit")
    base_layer = find_layer(chain, base) if base else layers[-1]
    if active or (top is None and default_top_active):
        top_layer = layers[0]
    elif top is None:
        if len(layers) == 2:
            raise JobError(
                layers[0].filename,
                "nothing below the active image to "
                f"commit (its backing file "
                f"{layers[1].filename} is the base); use "
                "--active",
            )
        top_layer = layers[1]
    else:
        top_layer = find_layer(chain, top)
    ti, bi = chain.index_of(top_layer), chain.index_of(base_layer)
    if ti >= bi:
        raise JobError(base_layer.filename, f"is not below top image {top_layer.filename}")
    is_active = ti == 0
    if is_active and mode == "restartable":
        raise JobError(top_layer.filename, "an active commit cannot use restartable mode")
    if base_layer.format != "qcow2" and base_layer.format != "raw":
        raise JobError(base_layer.filename, "base has an unsupported format")
    if base_layer.virtual_size < top_layer.virtual_size:
        refusal = base_layer.why_not_resizable()
        if refusal:
            # refused before anything is written: the commit would grow base first
            raise JobError(
                base_layer.filename,
                f"is smaller than {top_layer.filename} and this commit would grow it, "
                f"but {refusal}",
            )
    for layer in layers[ti : bi + 1]:
        if getattr(layer, "encrypted", False):
            raise JobError(layer.filename, "encrypted images cannot be committed")
    writable_needed = [base_layer]
    if mode == "restartable":
        writable_needed += layers[ti:bi]
    if not is_active:
        writable_needed.append(layers[ti - 1])  # its backing name is rewritten
    for layer in writable_needed:
        # no write bit at all counts as read-only even for root, who could write anyway
        if not os.access(layer.path, os.W_OK) or not os.stat(layer.path).st_mode & 0o222:
            raise JobError(layer.filename, f"must be writable for this commit ({mode} mode)")
    if backing_file is not None:
        _check_backing_file(layers, ti, base_layer, backing_file)
    return CommitTarget(chain, top_layer.path, base_layer.path, mode, is_active, backing_file)


def _check_backing_file(layers, ti, base_layer, name):
    if ti == 0:
        raise JobError(name, "backing-file: top is the active image, which has no overlay")
    overlay = layers[ti - 1]
    try:
        leads = os.path.samefile(resolve_backing(name, overlay.path), base_layer.path)
    except (OSError, ValueError, QcowError):
        leads = False
    if not leads:
        raise JobError(
            name,
            f"backing-file: does not lead to base {base_layer.filename} from "
            f"{os.path.dirname(overlay.path)} (where {overlay.filename} would look for it)",
        )
