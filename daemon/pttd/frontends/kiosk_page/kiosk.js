// pttd kiosk page: the mic button, the state LED, live transcript, error banner, auto-reconnect.
// Speaks the kiosk WebSocket (/ws): control requests out ({"cmd": "press"} ...), events in.
// No build step, no dependencies.
'use strict';

(() => {
  const TAP_MS = 300;            // a press shorter than this is a tap: it toggles listening on/off
  const BACKOFF_MIN_MS = 500;    // reconnect delay doubles from here ...
  const BACKOFF_MAX_MS = 10000;  // ... up to here, with +-20% jitter
  const HISTORY = 5;             // earlier finals kept under the current line
  const ACTIVE = new Set(['connecting', 'listening']);
  const ENDED = new Set(['finalizing', 'idle', 'error', 'offline']);

  const $ = (id) => document.getElementById(id);
  const mic = $('mic');
  const transcript = $('transcript');

  let ws = null;
  let backoff = BACKOFF_MIN_MS;
  let holding = false;      // pointer/key is down on the button and we sent "press"
  let latched = false;      // a tap started listening; the next tap stops it
  let turnSeen = false;     // the daemon has been connecting/listening since our last press
  let swallowUp = false;    // the pointerdown that ended a latch: ignore its pointerup
  let downAt = 0;

  // --- connection ------------------------------------------------------------------------

  function wsUrl() {
    const scheme = location.protocol === 'https:' ? 'wss:' : 'ws:';
    const token = new URLSearchParams(location.search).get('token');
    return `${scheme}//${location.host}/ws` + (token ? `?token=${encodeURIComponent(token)}` : '');
  }

  function connect() {
    setConn('connecting', 'connecting…');
    let sock;
    try {
      sock = new WebSocket(wsUrl());
    } catch (err) {
      scheduleReconnect();
      return;
    }
    ws = sock;
    sock.onopen = () => { backoff = BACKOFF_MIN_MS; setConn('connected', ''); };
    sock.onmessage = (m) => {
      let msg;
      try { msg = JSON.parse(m.data); } catch (err) { return; }
      onMessage(msg);
    };
    sock.onclose = () => {
      if (ws !== sock) return;
      ws = null;
      holding = latched = swallowUp = false;  // the daemon releases a dropped client's press
      renderButton();
      scheduleReconnect();
    };
  }

  function scheduleReconnect() {
    const delay = Math.round(backoff * (0.8 + 0.4 * Math.random()));
    backoff = Math.min(backoff * 2, BACKOFF_MAX_MS);
    setConn('disconnected', `disconnected, reconnecting in ${(delay / 1000).toFixed(1)} s`);
    setState('offline');
    setTimeout(connect, delay);
  }

  function send(cmd) {
    if (!ws || ws.readyState !== WebSocket.OPEN) {
      showBanner('not connected to pttd');
      return;
    }
    ws.send(JSON.stringify({ cmd }));
  }

  // --- incoming --------------------------------------------------------------------------

  function onMessage(msg) {
    switch (msg.event) {
      case 'snapshot':
        setState(msg.state);
        if (msg.last_final) showFinal(msg.last_final.text, false);
        break;
      case 'state':
        setState(msg.state);
        if (msg.state === 'listening') hideBanner();
        break;
      case 'partial':
        showPartial(msg.text);
        break;
      case 'final':
        showFinal(msg.text, true);
        hideBanner();
        break;
      case 'error':
        showBanner(errorText(msg));
        break;
      default:
        if (msg.ok === false) showBanner(msg.error || 'request refused');
    }
  }

  function errorText(msg) {
    let text = msg.message || 'error';
    if (msg.code !== null && msg.code !== undefined) text = `[${msg.code}] ${text}`;
    if (msg.retry_in_s !== null && msg.retry_in_s !== undefined) {
      text += ` (retrying in ${Number(msg.retry_in_s).toFixed(0)} s)`;
    }
    return text;
  }

  function setState(state) {
    document.body.dataset.state = state || 'offline';
    $('state').textContent = state || 'offline';
    if (ACTIVE.has(state)) turnSeen = true;
    if (latched && turnOver()) latched = false;  // stopped elsewhere, or failed
    renderButton();
  }

  function setConn(conn, text) {
    document.body.dataset.conn = conn;
    $('conn').textContent = text;
  }

  // --- transcript ------------------------------------------------------------------------

  function showPartial(text) {
    if (transcript.classList.contains('final')) archive(transcript.textContent);
    setTranscript(text, 'partial');
  }

  function showFinal(text, live) {
    if (!live && transcript.textContent) return;  // a reconnect snapshot keeps the live view
    setTranscript(text, 'final');
  }

  function setTranscript(text, kind) {
    transcript.textContent = text;
    transcript.className = text ? kind : 'empty';
  }

  function archive(text) {
    if (!text) return;
    const item = document.createElement('li');
    item.textContent = text;
    const history = $('history');
    history.prepend(item);
    while (history.children.length > HISTORY) history.lastElementChild.remove();
  }

  // --- banner ----------------------------------------------------------------------------

  function showBanner(text) {
    $('banner-text').textContent = text;
    $('banner').hidden = false;
  }

  function hideBanner() {
    $('banner').hidden = true;
  }

  // --- the button: press-and-hold, or tap to toggle --------------------------------------

  function down() {
    if (latched) {                   // second tap: stop listening
      latched = false;
      swallowUp = true;
      send('release');
    } else if (!holding) {
      holding = true;
      turnSeen = false;
      downAt = performance.now();
      send('press');
    }
    renderButton();
  }

  function up(cancelled) {
    if (swallowUp) {
      swallowUp = false;
      return;
    }
    if (!holding) return;
    holding = false;
    if (!cancelled && performance.now() - downAt < TAP_MS) {
      latched = !turnOver();         // a tap: keep listening until the next tap
    } else {
      send('release');
    }
    renderButton();
  }

  // The turn we started is over (e.g. refused) once the daemon went active and then left it.
  function turnOver() {
    return turnSeen && ENDED.has(document.body.dataset.state);
  }

  function renderButton() {
    const on = holding || latched;
    mic.setAttribute('aria-pressed', String(on));
    $('mic-label').textContent = latched ? 'tap to stop' : holding ? 'release to send'
      : 'hold to talk \u00b7 tap to toggle';
  }

  mic.addEventListener('pointerdown', (e) => {
    if (e.pointerType === 'mouse' && e.button !== 0) return;
    e.preventDefault();
    try { mic.setPointerCapture(e.pointerId); } catch (err) { /* pointer already gone */ }
    down();
  });
  mic.addEventListener('pointerup', () => up(false));
  mic.addEventListener('pointercancel', () => up(true));
  mic.addEventListener('lostpointercapture', () => { if (holding) up(true); });
  mic.addEventListener('contextmenu', (e) => e.preventDefault());  // long touch: no menu
  mic.addEventListener('keydown', (e) => {
    if ((e.key === ' ' || e.key === 'Enter') && !e.repeat) { e.preventDefault(); down(); }
  });
  mic.addEventListener('keyup', (e) => {
    if (e.key === ' ' || e.key === 'Enter') { e.preventDefault(); up(false); }
  });
  $('banner-close').addEventListener('click', hideBanner);

  renderButton();
  connect();
})();
