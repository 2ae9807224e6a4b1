"""Every op of gradfuse, one record each; importing this package registers them all."""

from . import collective, conv, elementwise, linalg, nn, random, reduction, shape  # noqa: F401
