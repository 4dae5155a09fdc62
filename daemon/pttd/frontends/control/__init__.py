"""The local control socket (the interface contract, docs/contract.md, "Control socket").

One JSON object per line each way: ``{"cmd": "press"}`` gets one reply, ``{"cmd": "subscribe"}``
gets ``{"ok": true}`` and then every event until the client closes.

* ``protocol``: the request and reply lines (shared with the kiosk's WebSocket) and the errors;
* ``server``: ``ControlServer``, the daemon's side, on one selector thread;
* ``connection``: one client connection's buffers and non-blocking I/O (the server's);
* ``subscribers``: the subscriber list, the one part the controller's thread touches (publish);
* ``socket_file``: binding the socket path safely (a stale file is replaced, a live one kept);
* ``client``: ``request`` and ``subscribe``, the CLI's side.
"""
