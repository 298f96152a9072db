"""Which names keyroute's objects may have, and why: one rule per kind, checked in three places.

A **ProviderChain**'s name is the value of the ``keyroute.dev/chain`` label: on the pods that select
the chain (the injection webhook checks it, :func:`keyroute.core.inject.check_chain_name`) and on
the chain's rendered config Secret ``<chain>-keyroute`` (:mod:`keyroute.core.objects`). A label
value is at most 63 characters, and the webhook has only ever accepted a DNS-1123 label there
(lowercase letters, digits and ``-``; no dots), as Kubernetes does for names that end up in labels
and generated names (a Service's, a Job's). The API server accepts any DNS subdomain for a custom
resource (253 characters, dots allowed), so without a rule of our own a chain named ``agents.v1``
was accepted and rendered, and then every pod that named it was refused; and a 64-character name
was accepted and then could never be used. So:

- the CRD refuses such a name when it is applied: :data:`CHAIN_NAME_RULE`, a CEL rule at the schema
  root (the only place a rule may read ``self.metadata.name``), with :data:`CHAIN_NAME_MESSAGE`;
- the operator gives a chain that already exists with such a name (stored before the CRD carried the
  rule) ``Ready=False``, reason ``InvalidName``, renders nothing and does not retry;
- the webhook refuses a pod label that breaks it, with the same limits.

A **CredentialPool**'s name is referenced by a chain's ``credentialPoolRef.name``, which is at most 63
characters (every keyroute name in a spec is), and is never a label value nor the stem of a generated
name; dots are fine. A pool named with more than 63 characters could never be referenced, so the CRD
says so (:data:`POOL_NAME_RULE`) and the operator reports an existing one as ``InvalidName`` too.

Pure and without pydantic: the webhook, the operator, the CRD generator and the models import it.
"""

from __future__ import annotations

import re

CHAIN_LABEL = "keyroute.dev/chain"

#: Kubernetes' limit on a label value, hence on a chain name.
LABEL_VALUE_MAX = 63
#: A DNS-1123 label: what a chain name must be (``[a-z0-9]``, inner ``-``, no dots).
DNS1123_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
CHAIN_NAME_MAX = LABEL_VALUE_MAX
#: ``credentialPoolRef.name`` is at most this long, so a pool's name must be too.
POOL_NAME_MAX = 63

_DNS1123_LABEL = re.compile(DNS1123_LABEL)

INVALID_NAME = "InvalidName"

CHAIN_NAME_RULE = (
    f"size(self.metadata.name) <= {CHAIN_NAME_MAX} && self.metadata.name.matches('{DNS1123_LABEL}')"
)
CHAIN_NAME_MESSAGE = (
    f"a ProviderChain name must be at most {CHAIN_NAME_MAX} characters of lowercase letters, digits "
    "and '-', starting and ending with a letter or digit (a DNS-1123 label: no dots), because pods "
    f"select the chain with the label {CHAIN_LABEL}=<name>, whose value cannot be longer"
)
POOL_NAME_RULE = f"size(self.metadata.name) <= {POOL_NAME_MAX}"
POOL_NAME_MESSAGE = (
    f"a CredentialPool name must be at most {POOL_NAME_MAX} characters, because chains refer to it in "
    f"credentialPoolRef.name, which cannot be longer"
)
_RENAME = "names cannot be changed: delete it and create it again under a valid name"


def is_chain_name(name: str) -> bool:
    """Whether ``name`` can name a ProviderChain (and be the value of :data:`CHAIN_LABEL`)."""
    return len(name) <= CHAIN_NAME_MAX and _DNS1123_LABEL.match(name) is not None


def chain_name_problem(name: str) -> str | None:
    """Why an existing ProviderChain's ``name`` cannot work (a status message), or ``None``."""
    if is_chain_name(name):
        return None
    return f"{_shown(name)} cannot work: {CHAIN_NAME_MESSAGE}; {_RENAME}"


def pool_name_problem(name: str) -> str | None:
    """Why an existing CredentialPool's ``name`` cannot work (a status message), or ``None``."""
    if len(name) <= POOL_NAME_MAX:
        return None
    return f"{_shown(name)} cannot work: {POOL_NAME_MESSAGE}; {_RENAME}"


def _shown(name: str) -> str:
    # A 253-character name in full would bury the reason; its length is what matters then.
    if len(name) > LABEL_VALUE_MAX:
        return f"the name {name[:40]!r}... ({len(name)} characters)"
    return f"the name {name!r}"
