"""The operator as a kopf module, for ``kopf run -m keyroute.controller.standalone`` (the e2e harness,
embedding): the handlers of :mod:`keyroute.controller.handlers` bound to one :class:`Operator` with
the defaults and no leader election, registered on kopf's default registry at import.

``keyroute operator`` does not use this module: it builds its :class:`Operator` from its flags.
"""

from __future__ import annotations

import kopf

from keyroute.controller.handlers import Operator, register
from keyroute.controller.settings import OperatorConfig

OPERATOR = Operator(OperatorConfig())
register(OPERATOR, kopf.get_default_registry())
