"""The operator: kopf handlers (``handlers``) that call reconcile functions (``reconcile``) that call the
pure core. ``keyroute.controller.handlers.register`` binds the handlers to an operator object;
importing ``keyroute.controller.standalone`` registers a default one with kopf (``kopf run -m``)."""
