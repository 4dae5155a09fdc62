"""Where events go: the ``Sink`` protocol and the fan-out (fanout.py), and one module per sink
(stdout, journald, the hook command, typing). Adding a sink is a new module here plus one line
where the daemon builds its sinks (docs/architecture.md, "Add an output sink")."""
