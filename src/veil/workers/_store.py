"""A worker's object store: id -> object, with tags, description and permission."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

from veil._errors import ObjectNotFound, PermissionDenied


class Permission(NamedTuple):
    """Who may take an object home: ``allowed`` requesters. ``owners`` decided it.

    Public objects have no Permission at all (``None``) so the common case costs nothing.
    """

    owners: frozenset[str]
    allowed: frozenset[str]

    def merge(self, other: Permission | None) -> Permission:
        """The permission of a value computed from objects with ``self`` and ``other``."""
        if other is None or other is self:
            return self
        return Permission(self.owners | other.owners, self.allowed & other.allowed)

    def check(self, requester: str, what: str) -> None:
        """Raise :class:`PermissionDenied` unless ``requester`` may take ``what``."""
        if requester not in self.allowed:
            owners = ", ".join(sorted(self.owners))
            raise PermissionDenied(
                f"{requester!r} may not take {what}: it is private to {owners}"
                + (f" (allowed: {', '.join(sorted(self.allowed))})" if self.allowed else "")
            )


def merge(a: Permission | None, b: Permission | None) -> Permission | None:
    """Combine two permissions (``None`` is public)."""
    if a is None:
        return b
    return a.merge(b)


@dataclass(slots=True)
class Info:
    """Search metadata of an object a worker hosts."""

    tags: tuple[str, ...]
    description: str


class ObjectStore:
    """Objects by id. Permissions and search metadata are kept only for objects that have them."""

    __slots__ = ("infos", "objects", "perms")

    def __init__(self) -> None:
        self.objects: dict[bytes, Any] = {}
        self.perms: dict[bytes, Permission] = {}
        self.infos: dict[bytes, Info] = {}

    def __len__(self) -> int:
        return len(self.objects)

    def __contains__(self, oid: bytes) -> bool:
        return oid in self.objects

    def put(self, oid: bytes, obj: Any, perm: Permission | None = None,
            info: Info | None = None) -> None:
        self.objects[oid] = obj
        if perm is None:
            self.perms.pop(oid, None)
        else:
            self.perms[oid] = perm
        if info is not None:
            self.infos[oid] = info

    def get(self, oid: bytes) -> Any:
        try:
            return self.objects[oid]
        except KeyError:
            raise ObjectNotFound(f"no object with id {oid.hex()[:12]}… on this worker") from None

    def pop(self, oid: bytes) -> tuple[Any, Permission | None, Info | None]:
        obj = self.get(oid)
        del self.objects[oid]
        return obj, self.perms.pop(oid, None), self.infos.pop(oid, None)

    def delete(self, oid: bytes) -> None:
        if self.objects.pop(oid, None) is not None:
            self.perms.pop(oid, None)
            self.infos.pop(oid, None)

    def search(self, tags: tuple[str, ...]) -> list[bytes]:
        wanted = set(tags)
        return [oid for oid, info in self.infos.items() if wanted.issubset(info.tags)]
