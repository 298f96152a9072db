"""The operator: kopf handlers (``handlers``) that call reconcile functions (``reconcile``) that call the
pure core. Importing ``keyroute.controller.handlers`` registers the handlers with kopf."""
