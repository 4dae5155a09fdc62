"""The ways in that are not audio: the control socket (``control/``), the kiosk page and its
WebSocket, MQTT, and the button and LEDs (peripherals.py). Their callbacks only hand commands
to the controller; the kiosk and MQTT are output sinks too."""
