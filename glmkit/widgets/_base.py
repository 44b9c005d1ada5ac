"""What every glmkit widget tool shares: a root widget, an error panel, and background generation."""
from __future__ import annotations

import functools
import html
import threading
import traceback
import weakref
from typing import Callable, TypeVar

import ipywidgets as w

# One lock per backend, so two tools sharing a model (or a cluster) never generate at the same time:
# a cluster's engines run one lockstep call at a time, and two CPU generations would only thrash.
_BACKEND_LOCKS: "weakref.WeakKeyDictionary[object, threading.Lock]" = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()

Checked = TypeVar("Checked")


def backend_lock(backend) -> threading.Lock:
    """The lock that serialises generation on `backend` across all widget tools."""
    with _LOCKS_GUARD:
        try:
            return _BACKEND_LOCKS.setdefault(backend, threading.Lock())
        except TypeError:  # not weak-referenceable: lock per tool only
            return threading.Lock()


class LockPair:
    """Two backends' locks taken as one (compare mode): both or neither, so two tools comparing the same
    two backends in opposite order cannot deadlock."""

    def __init__(self, first: threading.Lock, second: threading.Lock):
        self.first, self.second = first, second

    def acquire(self, timeout: float = -1) -> bool:
        if not self.first.acquire(timeout=timeout):
            return False
        if self.second is self.first or self.second.acquire(timeout=timeout):
            return True
        self.first.release()  # back off, so whoever holds the second can take the first
        return False

    def release(self) -> None:
        if self.second is not self.first:
            self.second.release()
        self.first.release()


def error_html(message: str) -> str:
    """A status line for an error message (escaped)."""
    return f'<span style="color:#b00020"><b>Error:</b> {html.escape(message)}</span>'


def info_html(message: str) -> str:
    """A status line for an informational message (escaped)."""
    return f'<span style="color:#555">{html.escape(message)}</span>'


class Tool:
    """Base of the widget tools: `root` is what Jupyter displays; errors land in `errors`, never vanish.

    Subclasses build their widgets, then call `_finish(children)`. Callbacks are wrapped with
    `self._guarded`; a Run button checks the controls with `self._begin(validate)`, then generation runs
    through `self._start(work)` on a background thread, so the kernel stays free (the Stop button must be
    clickable while the model runs).
    """

    def __init__(self):
        self.status = w.HTML(layout=w.Layout(min_height="1.5em"))
        self.errors = w.Output(layout=w.Layout(max_height="16em", overflow="auto"))
        # A bug's traceback is worth having for a report, but not in the user's face: it sits folded
        # under the one-line message, and only for errors that are not glmkit's own input checks.
        self.error_details = w.Accordion([self.errors], titles=("traceback (for a bug report)",),
                                         selected_index=None, layout=w.Layout(display="none"))
        self.last_error: BaseException | None = None
        # Widgets that show the last answer; emptied on an error so an old answer never looks current.
        self.answer_views: list[w.Widget] = []
        self._thread: threading.Thread | None = None
        self._abort = threading.Event()
        self.root: w.Widget | None = None

    def _finish(self, children: list[w.Widget]) -> None:
        self.root = w.VBox(children + [self.status, self.error_details], layout=w.Layout(width="100%"))

    # ----- display and lifetime -------------------------------------------------------------------

    def _repr_mimebundle_(self, **kwargs):
        return self.root._repr_mimebundle_(**kwargs)

    def close(self) -> None:
        """Stop any generation and close every widget of the tool."""
        self.stop()
        self.wait(5)
        self.root.close()
        for child in _descendants(self.root):
            child.close()

    # ----- errors ---------------------------------------------------------------------------------

    def report_error(self, error: BaseException, context: str = "") -> None:
        """Show an error as one message in the status line and empty the stale answer; see `last_error`."""
        self.last_error = error
        self._clear_answer()
        user_error = is_user_error(error)
        message = str(error) if user_error else f"{type(error).__name__}: {error}"
        self.status.value = error_html(f"{context}{message}")
        self.errors.outputs = ()
        if not user_error:  # a bug: keep its traceback, folded away
            self.errors.append_stderr("".join(traceback.format_exception(type(error), error,
                                                                         error.__traceback__)))
            self.error_details.layout.display = None

    def clear_errors(self) -> None:
        """Forget the last error and empty its (folded) traceback."""
        self.last_error = None
        self.errors.outputs = ()
        self.error_details.selected_index = None
        self.error_details.layout.display = "none"

    def _clear_answer(self) -> None:
        """Empty every widget in `answer_views` (subclasses also forget their result)."""
        for view in self.answer_views:
            if isinstance(view, w.Output):
                view.outputs = ()
            else:
                view.value = ""

    def _guarded(self, callback: Callable) -> Callable:
        """Wrap a widget callback so an exception is shown in the tool instead of being logged away."""
        @functools.wraps(callback)
        def run(*args, **kwargs):
            try:
                return callback(*args, **kwargs)
            except Exception as error:  # noqa: BLE001 - shown to the user, never swallowed silently
                self.report_error(error)
        return run

    # ----- background generation ------------------------------------------------------------------

    @property
    def running(self) -> bool:
        """True while a background generation is in progress."""
        return self._thread is not None and self._thread.is_alive()

    def stop(self) -> None:
        """Ask the running generation to stop after its current token."""
        self._abort.set()

    def wait(self, timeout: float | None = None) -> bool:
        """Wait for the background generation; True when none is running any more."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)
        return not self.running

    def _begin(self, validate: Callable[[], Checked], busy: str = "already running: press Stop first"
               ) -> Checked | None:
        """What a Run button does before starting: `validate()`'s (not None) result, or None after saying why
        not: `busy` while a run is in progress, glmkit's message when the controls hold bad input. Input
        errors are checked here, in the kernel's thread, so they show at once and nothing starts."""
        if self.running:
            self.status.value = info_html(busy)
            return None
        self.clear_errors()
        try:
            return validate()
        except (ValueError, TypeError) as error:
            self.report_error(error)
            return None

    def _start(self, work: Callable[[threading.Event], None], lock: threading.Lock,
               on_done: Callable[[], None]) -> None:
        """Run `work(abort_event)` on a daemon thread holding `lock`; `on_done()` always runs after."""
        if self.running:
            raise RuntimeError("a generation is already running: press Stop or wait for it")
        self._abort = abort = threading.Event()

        def body():
            try:
                while not lock.acquire(timeout=0.1):
                    if abort.is_set():
                        return
                    self.status.value = info_html("waiting for another tool's generation to finish…")
                try:
                    work(abort)
                finally:
                    lock.release()
            except Exception as error:  # noqa: BLE001 - shown in the widget
                self.report_error(error)
            finally:
                try:
                    on_done()
                except Exception as error:  # noqa: BLE001
                    self.report_error(error)

        self._thread = threading.Thread(target=body, name=f"glmkit-{type(self).__name__}", daemon=True)
        self._thread.start()


def is_user_error(error: BaseException) -> bool:
    """True for errors whose message says what to change (bad input, a missing file, glmkit's own errors)."""
    if isinstance(error, (ValueError, TypeError, OSError)):
        return True
    return type(error).__module__.split(".")[0] == "glmkit"


def _descendants(widget: w.Widget):
    for child in getattr(widget, "children", ()):
        yield child
        yield from _descendants(child)


def labelled(widget: w.Widget, description: str, tooltip: str = "", width: str = "11em") -> w.Widget:
    """Give a stock widget a description wide enough to read, and a hover tooltip."""
    widget.description = description
    widget.description_allow_html = False
    if tooltip:
        widget.tooltip = tooltip
    widget.style = {"description_width": width}
    return widget
