"""Facts of AssemblyAI's Universal Streaming v3 wire protocol, as the server side keeps them.

Why a module of their own: the offline engine must speak the protocol exactly as the service
does, and the tests' fake server reuses this server, so these facts come from AssemblyAI's specs
(tests/spec/usm-streaming*.yml) and docs, never from pttd's client: a client bug cannot become a
server that agrees with it.
"""

from __future__ import annotations

from array import array

#: The version the SDK pins and the service echoes in Begin.
API_VERSION = "2025-05-12"
DEFAULT_PATH = "/v3/ws"
#: "audio data between 50ms and 1000ms in length" (usm-streaming.yml, sendAudio).
MIN_FRAME_MS = 50
MAX_FRAME_MS = 1000
#: The Universal-3 Pro family: U3 shaping, SpeechStarted, format_turns ignored.
U3_MODELS = frozenset(
    {"u3-rt-pro", "u3-rt-pro-beta-1", "u3-pro", "universal-3-5-pro", "universal-3-6-pro"}
)
#: The newest docs: a connection that names no model gets this one.
DEFAULT_SPEECH_MODEL = "universal-3-5-pro"

#: Defaults per model family (the docs' parameter table).
US_DEFAULTS = {"max_turn_silence": 1280, "min_turn_silence": 400}
U3_DEFAULTS = {"max_turn_silence": 1000, "min_turn_silence": 100}
U3_EARLY_PARTIAL_MS = 750  # an early partial after ~750 ms of continuous speech
U3_CONTINUOUS_PARTIAL_MS = 3000  # then continuous partials about every 3 s

CLIENT_MESSAGE_TYPES = frozenset({"UpdateConfiguration", "ForceEndpoint", "KeepAlive", "Terminate"})
BYTES_PER_SAMPLE = {"pcm_s16le": 2, "pcm_mulaw": 1}
#: Encodings the real service accepts but this server cannot decode.
UNSUPPORTED_ENCODINGS = frozenset({"opus", "ogg_opus", "aac"})

#: WebSocket close reasons are capped at 123 bytes; longer texts close with LONG_REASON.
MAX_CLOSE_REASON_BYTES = 123
LONG_REASON = "See Error message for details"
AUTH_ERROR = "Unauthorized Connection: Missing Authorization header"
EXPIRED_ERROR = "Session Expired: Maximum session duration exceeded"
GENERIC_ERROR = "Session Cancelled: An error occurred"


def close_reason(text: str) -> str:
    """The close reason for an Error text: itself, or LONG_REASON when it is over 123 bytes."""
    return text if len(text.encode("utf-8")) <= MAX_CLOSE_REASON_BYTES else LONG_REASON


def frame_duration_ms(nbytes: int, encoding: str, sample_rate: int) -> float:
    """Duration of one binary frame, from its byte length."""
    return nbytes * 1000.0 / (BYTES_PER_SAMPLE[encoding] * sample_rate)


def frame_error(
    duration_ms: float, audio_s: float, elapsed_s: float, max_lead_s: float
) -> str | None:
    """The 3007 text for a frame outside 50-1000 ms, or for audio (``audio_s`` received, this
    frame included) running over ``max_lead_s`` ahead of the ``elapsed_s`` since the first frame."""
    if not MIN_FRAME_MS <= duration_ms <= MAX_FRAME_MS:
        return (
            f"Input duration violation: {fmt_number(duration_ms)} ms. "
            f"Expected between {MIN_FRAME_MS} and {MAX_FRAME_MS} ms"
        )
    if audio_s - elapsed_s > max_lead_s:
        return (
            f"Audio Transmission Rate Exceeded: Received {audio_s:.1f} sec. "
            f"audio in {elapsed_s:.6f} sec"
        )
    return None


def fmt_number(value: float) -> str:
    """A number as the service writes it in error texts: ``20``, ``49.97``."""
    return str(int(value)) if float(value).is_integer() else f"{value:.2f}".rstrip("0")


def _mulaw_table() -> list[int]:
    table = []
    for byte in range(256):
        value = ~byte & 0xFF
        magnitude = (((value & 0x0F) << 3) + 0x84) << ((value & 0x70) >> 4)
        table.append(0x84 - magnitude if value & 0x80 else magnitude - 0x84)
    return table


_MULAW = _mulaw_table()


def mulaw_to_pcm16(data: bytes) -> bytes:
    """G.711 mu-law to PCM16LE, so recognizers only ever see one format."""
    samples = array("h", (_MULAW[b] for b in data))
    if samples.itemsize != 2:  # pragma: no cover - exotic platforms
        raise RuntimeError("array('h') is not 16-bit")
    return samples.tobytes()


#: The JSON ``error`` of an upgrade refused at the HTTP stage, by status.
HTTP_ERRORS = {
    400: "Bad request",
    401: "Invalid API key",
    403: "Forbidden",
    404: "Not found",
    429: "Too many requests",
    500: "Internal server error",
    502: "Bad gateway",
    503: "Service unavailable",
}
