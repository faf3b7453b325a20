"""Error kinds. Why they are split: a caller's mistake must be loud, while a pool that is down or a
block that fails validation must become a miss and a metric, never a failure of the engine above.

- `UsageError`: the caller did something wrong (bad argument, wrong state). Raise, never swallow.
- `ServerUnavailable`: a peer or server did not answer, or the connection broke. Callers turn it into a miss.
- `CorruptBlock`: bytes read do not validate (key, generation, checksum, torn read). Always a miss.
- `TransportError`: an operation completed with an error status (bad key, out of bounds, QP error).
- `ProtocolError`: a peer sent a frame that does not follow the control protocol.
- `AuthError`: missing or wrong credentials on a control connection.
"""


class RdmapoolError(Exception):
    """Base of every error rdmapool raises on purpose."""


class UsageError(RdmapoolError, ValueError):
    """The caller passed something invalid; the message names the problem."""


class ServerUnavailable(RdmapoolError, ConnectionError):
    """A server or peer cannot be reached in time; callers degrade to a miss."""


class CorruptBlock(RdmapoolError):
    """A block read back fails validation; it is reported and treated as a miss."""


class TransportError(RdmapoolError):
    """A transport operation failed (error completion, endpoint in error state)."""


class ProtocolError(RdmapoolError):
    """A control-protocol frame is malformed, truncated, oversized or of an unknown version."""


class AuthError(RdmapoolError, PermissionError):
    """A control connection failed authentication."""


class NoDevice(UsageError):
    """A requested transport or device is not available on this machine."""


class InternalError(RdmapoolError):
    """A server-side bug hit while serving a request: that request fails and its session ends, nothing else."""
