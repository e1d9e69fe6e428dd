"""The one exception type for user mistakes (bad config, missing files, bad data)."""


class UserError(Exception):
  """A problem with what the user asked for; the CLI prints it and exits with code 2.

  Raise it for anything the user can fix by changing a flag, a config key or a
  file. Bugs in jaxft itself should stay ordinary exceptions with tracebacks.
  """
