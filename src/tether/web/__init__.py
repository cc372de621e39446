"""Browser pages as tether peers: ``Main.listen("ws://127.0.0.1:0", static=DIR)``.

:mod:`tether.web.server` serves a folder of pages, the client library
(``/tether.js``, typed by ``/tether.d.ts``, both in ``static/`` here) and a
WebSocket endpoint (``/tether``) on one port, behind a secret made at each
start. :mod:`tether.web.stream` makes each WebSocket a transport for an
ordinary :class:`~tether.Peer` of role ``web`` (docs/protocol.md, 1.1;
docs/security.md, "Web pages"). Needs the ``websockets`` package
(``pip install tether-ipc[web]``), imported only when a ``ws://`` listener starts.
"""
