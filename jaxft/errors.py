"""The one exception type for user mistakes (bad config, missing files, bad data), and
`caused_by`, which looks through an error's causes."""


class UserError(Exception):
  """A problem with what the user asked for; the CLI prints it and exits with code 2.

  Raise it for anything the user can fix by changing a flag, a config key or a
  file. Bugs in jaxft itself should stay ordinary exceptions with tracebacks.
  """


def caused_by(error: BaseException | None, kind: type[BaseException]) -> bool:
  """Whether `error`, or an exception it was raised from or during, is a `kind`."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, kind):
      return True
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return False
