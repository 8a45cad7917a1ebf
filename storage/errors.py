"""The one base class for errors a user can fix.

Bad config, data, model folders, label manifests and registry state all raise a
subclass of `UserError` with a message that names the field or file and the fix.
The CLI prints these as one line and exits 2; anything else is a bug and keeps
its traceback. It lives in `storage/`, the lowest layer, so every layer can
raise it without importing upwards.
"""

from __future__ import annotations


class UserError(ValueError):
    """Something the user can fix; `str(error)` is the whole message (field or file, what is wrong, what to do)."""

    exit_code = 2
