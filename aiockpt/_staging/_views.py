"""The views of staging arenas that this (worker) process holds, announced to whoever wants
to prepare for them: the zip writer precomputes how to pickle each one. The engine announces,
the file format subscribes, and neither imports the other."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator

import torch

OnViews = Callable[[int, list[torch.Tensor]], None]
OnForget = Callable[[int], None]

_current: dict[int, list[torch.Tensor]] = {}
_listeners: list[tuple[OnViews, OnForget]] = []
_trusted = [True]  # whether the views are as announced (see trusting)


@contextlib.contextmanager
def trusting(trusted: bool) -> Iterator[None]:
    """Within: what was prepared for the announced views may be used only if ``trusted``
    (the running request is aiockpt's own writer, which never changes the views it is
    given; a user's function may, before it saves them)."""
    before, _trusted[0] = _trusted[0], trusted
    try:
        yield
    finally:
        _trusted[0] = before


def trusted() -> bool:
    """Whether the announced views may be taken to be as they were announced."""
    return _trusted[0]


def subscribe(on_views: OnViews, on_forget: OnForget) -> None:
    """Call ``on_views(arena_id, views)`` for every arena laid out now and from now on, and
    ``on_forget(arena_id)`` when one goes away."""
    _listeners.append((on_views, on_forget))
    for arena_id, views in list(_current.items()):
        on_views(arena_id, views)


def announce(arena_id: int, views: list[torch.Tensor]) -> None:
    """The views of ``arena_id`` are laid out (replacing any earlier layout of it)."""
    _current[arena_id] = views
    for on_views, _ in _listeners:
        on_views(arena_id, views)


def withdraw(arena_id: int) -> None:
    """``arena_id`` is gone: its views must no longer be recognised."""
    _current.pop(arena_id, None)
    for _, on_forget in _listeners:
        on_forget(arena_id)
