"""The one record of what tracesock changed in other people's objects.

Every attribute tracesock sets on a standard-library or third-party object
goes through ``UNDO.set``, which saves the entry it shadows (or that there
was none); ``UNDO.restore()`` puts them all back, newest first, so that
``uninstrument()`` leaves every object exactly as it found it.  (gevent's
``monkey`` keeps the same kind of store: one ``saved`` dict.)

An entry set with ``only_if_ours`` is put back only if it is still ours: a
module function that another patcher (gevent's resolver) replaced after us
stays theirs.
"""

from __future__ import annotations

import threading

__all__ = ["MISSING", "UNDO", "UndoLog"]

MISSING = object()  # "there was no entry": restoring deletes ours


class UndoLog:
    __slots__ = ("_entries", "_ours", "lock")

    def __init__(self):
        # (owner, name, original entry or MISSING, value, only_if_ours, what owner.name was) or (undo,)
        self._entries = []
        self._ours = {}  # id(value) -> value, for every value set and not yet restored
        self.lock = threading.RLock()

    def set(self, owner, name, value, only_if_ours=False):
        """``setattr(owner, name, value)``, undone by ``restore()``."""
        with self.lock:
            self._entries.append((owner, name, vars(owner).get(name, MISSING), value, only_if_ours,
                                  getattr(owner, name, MISSING)))
            self._ours[id(value)] = value
            setattr(owner, name, value)

    def on_restore(self, undo):
        """Call ``undo()`` at ``restore()``, in order with the attributes set before and after."""
        with self.lock:
            self._entries.append((undo,))

    def reassert(self, owner):
        """Set again what another patcher's own "restore" put back over us: an
        attribute of ``owner`` that is once more exactly what it was before
        tracesock set it (pytest-socket's teardown puts ``socket.socket.connect``
        back to the method it saved at import, over ours).  Anything else that
        replaced ours is left alone."""
        with self.lock:
            for entry in self._entries:
                if len(entry) > 1 and entry[0] is owner:
                    _owner, name, _original, value, _only, before = entry
                    current = getattr(owner, name, MISSING)
                    if current is before and current is not value:
                        setattr(owner, name, value)

    def is_ours(self, value):
        """Was ``value`` set by tracesock (and not restored since)?"""
        return self._ours.get(id(value)) is value

    def patched(self, owner):
        """Has anything been set on ``owner``?"""
        return any(len(e) > 1 and e[0] is owner for e in self._entries)

    def restore(self):
        """Undo everything, newest first.  Never raises."""
        with self.lock:
            while self._entries:
                entry = self._entries.pop()
                try:
                    if len(entry) == 1:
                        entry[0]()
                        continue
                    owner, name, original, value, only_if_ours, _before = entry
                    if only_if_ours and vars(owner).get(name, MISSING) is not value:
                        continue
                    if original is MISSING:
                        if name in vars(owner):
                            delattr(owner, name)
                    else:
                        setattr(owner, name, original)
                except Exception:
                    pass
            self._ours.clear()


UNDO = UndoLog()
