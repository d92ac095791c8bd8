"""Typed errors. The CLI and the HTTP layer each map these to one message and one status."""


class LookalikeError(Exception):
    """Base class for errors a user can act on."""


class ImageRejected(LookalikeError):
    """An input file is not an image lookalike can decode (corrupt, unsupported, too large...)."""


class UnsupportedImage(ImageRejected):
    """The bytes are not in any image format lookalike accepts."""


class BackboneMismatch(LookalikeError):
    """The home folder's index was built with a different backbone than the one asked for."""


class UnknownBackbone(LookalikeError):
    """No backbone is registered under the requested name."""


class NotIndexed(LookalikeError):
    """An image id or path that the index does not hold."""


class IndexBusy(LookalikeError):
    """Another process holds the home folder's write lock."""


class BadQuery(LookalikeError):
    """A query that cannot be answered as asked (no examples, examples that cancel out...)."""


class BadExamples(LookalikeError):
    """Examples a head cannot take: a label its type forbids, a type that disagrees with the head's..."""


class Conflict(LookalikeError):
    """The request is valid but the state forbids it now (a training already running, a folder's image)."""
